//! The `store` layer: objects (blobs and commit records), refs and the step
//! index in RocksDB, plus the writer lock. It knows nothing about tensors
//! beyond the record types it persists; operations live in `repo`.
//!
//! On disk (docs/format.md has the byte-level layout):
//! ```text
//! <repo>/FORMAT      magic line and store format version
//! <repo>/lock        advisory lock file, held exclusively by the one writer
//! <repo>/view.lock   orders readers' opens against a writer's publishing
//! <repo>/db/         RocksDB: column families blobs, blob_sizes, commits, refs, steps, meta
//! <repo>/cache/      reconstruction cache of branch tips (safe to delete)
//! ```

pub mod db;
pub mod lock;
pub mod object;
pub mod refs;

pub use db::{Store, StoreConfig};
pub use object::{
    ChunkRef, CommitRecord, CommitSummary, FileContent, FileEntry, ObjectId, PairingRecord,
    TensorEntry, TorchContent,
};
pub use refs::RefEdit;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no ckptvc store at {} (run `ckptvc init` first, or pass --repo)", .0.display())]
    Missing(PathBuf),
    #[error("a ckptvc store already exists at {}", .0.display())]
    AlreadyExists(PathBuf),
    #[error("{} is not a ckptvc store: {what}", path.display())]
    NotAStore { path: PathBuf, what: String },
    #[error(
        "store is locked by another writer ({holder}); try again when it has finished, or pass --wait SECONDS"
    )]
    Locked { holder: String },
    #[error("store database error: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt {what}: {detail}")]
    Corrupt { what: String, detail: String },
}

impl StoreError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StoreError::Io {
            path: path.into(),
            source,
        }
    }
}
