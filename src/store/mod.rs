//! The `store` layer: where a store's objects (blobs and commit records),
//! refs and step index are kept, behind the traits of [`backend`]. It knows
//! nothing about tensors beyond the record types it persists; operations
//! live in `repo`.
//!
//! - [`backend`]: the seam, [`BlobStore`], [`MetaStore`] and [`Backend`];
//! - [`rocks`]: the embedded default, one local directory in RocksDB;
//! - [`pending`]: steps committed shard by shard, before they are sealed;
//! - [`object`]: the records every backend stores; [`refs`]: ref edits;
//!   [`config`]: the settings fixed at `init`.

pub mod backend;
pub mod bucket;
pub mod config;
pub mod object;
pub mod pending;
pub mod refs;
pub mod rocks;

pub use backend::{Backend, BlobStore, MetaStore, PublishGuard, RefKind};
pub use bucket::BucketStore;
pub use config::StoreConfig;
pub use object::{
    ChunkRef, CommitRecord, CommitSummary, FileContent, FileEntry, ObjectId, PairingRecord,
    TensorEntry, TorchContent,
};
pub use refs::RefEdit;
pub use rocks::{RocksStore, dir_size};

use std::path::PathBuf;

/// What can go wrong below the repo layer. Callers branch on the variant:
/// [`StoreError::Locked`] to wait and retry, [`StoreError::RefMoved`] to
/// fetch and try again, [`StoreError::Corrupt`] to run `fsck`,
/// [`StoreError::TooNew`] to upgrade.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no ckptvc store at {}", .0.display())]
    Missing(PathBuf),
    #[error("a ckptvc store already exists at {}", .0.display())]
    AlreadyExists(PathBuf),
    #[error("{} is not a ckptvc store: {what}", path.display())]
    NotAStore { path: PathBuf, what: String },
    #[error("store is locked by another writer ({holder}); try again when it has finished")]
    Locked { holder: String },
    /// A compare-and-swap found the ref elsewhere than expected.
    #[error("{what} has moved (expected {}, found {})", show_id(.expected), show_id(.found))]
    RefMoved {
        what: String,
        expected: Option<ObjectId>,
        found: Option<ObjectId>,
    },
    /// The embedded database failed (its own message).
    #[error("store database error: {0}")]
    Db(String),
    /// A remote object store failed: `remote` names it, `detail` says how.
    #[error("remote {remote}: {detail}")]
    Remote { remote: String, detail: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt {what}: {detail}")]
    Corrupt { what: String, detail: String },
    /// A record written by a newer build, in a layout this one cannot read.
    #[error(
        "{what} was written by a newer ckptvc (record version {version}; this build reads up to {newest})"
    )]
    TooNew {
        what: String,
        version: u32,
        newest: u32,
    },
}

fn show_id(id: &Option<ObjectId>) -> String {
    id.map_or_else(|| "nothing".into(), |id| id.short())
}

impl From<rocksdb::Error> for StoreError {
    fn from(e: rocksdb::Error) -> Self {
        StoreError::Db(e.into_string())
    }
}

impl StoreError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StoreError::Io {
            path: path.into(),
            source,
        }
    }
}
