//! Tools built on the layers below: CI sandboxes inside stored trees, and the dedup report.

pub mod dedup;
pub mod sandbox;
