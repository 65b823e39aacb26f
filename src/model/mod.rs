//! The data model: digests, directories, roots and blob indexes (the castore), and how file
//! content is cut into chunks. No I/O.

pub mod castore;
pub mod chunking;
pub mod times;
pub mod trace;
