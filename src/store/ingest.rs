//! Ingest sessions: a whole tree handed to the store in one upload, which the store imports on
//! its side and which outlives the uploading client. This file is the contract; only a remote
//! daemon offers it (`Store::ingest` is `None` elsewhere, and importing walks the tree
//! locally through the blob and directory services instead).

use std::path::Path;

use async_trait::async_trait;

use super::Result;
use crate::model::castore::Node;

/// Where an ingest session is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngestStatus {
    Running { bytes_done: u64, bytes_total: u64 },
    Done(Node),
    Failed(String),
}

/// How an upload is checked and what it records.
#[derive(Debug, Clone, Copy, Default)]
pub struct IngestOptions {
    /// Leave out devices, fifos and sockets (with a warning) instead of refusing the tree.
    pub skip_special: bool,
    /// Record no modification times (the tree gets no times table).
    pub no_times: bool,
}

/// Uploads of whole trees.
#[async_trait]
pub trait IngestService: Send + Sync {
    /// Uploads the tree at `path` (checked as `granary import` checks it: no special files
    /// unless `opts.skip_special`), to be recorded as root `root_name` if given, with its
    /// times unless `opts.no_times`. Returns as soon as the store has accepted the upload,
    /// with the session's token.
    async fn start(
        &self,
        path: &Path,
        root_name: Option<&str>,
        opts: IngestOptions,
    ) -> Result<String>;

    /// A session's state. An unknown (or forgotten) token is an error.
    async fn status(&self, token: &str) -> Result<IngestStatus>;

    /// Waits until the session ends; `progress` sees (bytes done, bytes total) meanwhile.
    async fn wait(&self, token: &str, progress: &(dyn Fn(u64, u64) + Send + Sync)) -> Result<Node>;
}
