//! Steps committed by several processes at once, one *shard* each (the ranks
//! of a distributed training job), before they are *sealed* into one commit.
//!
//! A shard's blobs go to a [`ShardSink`] that needs no writer lock: each
//! rank encodes and stores its part of the step in parallel with the others.
//! [`ShardSink::finish`] makes its blobs durable, then publishes the shard's
//! *manifest* (its part of the commit record, opaque bytes to this layer)
//! in one atomic step. Nothing a shard stages is visible to readers: only
//! sealing (`repo::shard`) publishes a commit, through the usual
//! [`super::MetaStore::publish_commit`], after [`super::Backend::adopt_shards`]
//! has made the staged blobs part of the store.
//!
//! Where the staging lives is the backend's business: a local store keeps
//! each shard's blobs in RocksDB table files under `pending/`, ingested at
//! sealing without a copy; a bucket writes them as ordinary packs and the
//! manifests under `pending/`.

use serde::{Deserialize, Serialize};

use super::StoreError;
use super::object::ObjectId;

/// Which pending step: a step of a branch, within a commit group (e.g. one
/// run of a job; retries of a crashed step use a new group so that their
/// shards never mix with the crashed attempt's).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PendingKey {
    pub branch: String,
    pub step: u64,
    pub group: String,
}

impl PendingKey {
    /// A name for the key that is safe as a file or object name: the step,
    /// then a hash of branch and group.
    pub fn dir_name(&self) -> String {
        let mut hashed = self.branch.as_bytes().to_vec();
        hashed.push(0);
        hashed.extend_from_slice(self.group.as_bytes());
        format!(
            "{:020}-{}",
            self.step,
            &ObjectId::of(&hashed).to_hex()[..16]
        )
    }
}

/// A pending step as a backend lists it.
#[derive(Debug, Clone)]
pub struct PendingInfo {
    pub key: PendingKey,
    /// Shards whose manifest has arrived.
    pub shards: Vec<u32>,
    /// Seconds since the newest thing staged for it was written.
    pub age_secs: u64,
}

/// Where encoded chunks go.
pub trait BlobSink: Send + Sync {
    /// Whether the blob is stored already (in the store or staged here).
    fn has_blob(&self, id: &ObjectId) -> Result<bool, StoreError>;
    fn put_blob(&self, id: &ObjectId, bytes: &[u8]) -> Result<(), StoreError>;
}

/// One shard's staging area (see the module documentation).
pub trait ShardSink: BlobSink {
    /// Makes every blob put so far durable, then publishes `manifest` as
    /// this shard's, replacing an earlier manifest of the same shard.
    fn finish(self: Box<Self>, manifest: Vec<u8>) -> Result<(), StoreError>;
}

/// Where the writer's commit puts its new blobs (see
/// [`super::Backend::commit_sink`]).
pub trait CommitSink: BlobSink {
    /// Makes every blob put so far durable and part of the store, so that
    /// a commit naming them can be published. Call once.
    fn finish(&self) -> Result<(), StoreError>;
}

/// A store's own blobs as a sink: [`super::BlobStore::put_blob`], then
/// [`super::BlobStore::flush_blobs`].
pub struct StoreSink<'a, B: ?Sized>(pub &'a B);

impl<B: super::Backend + ?Sized> BlobSink for StoreSink<'_, B> {
    fn has_blob(&self, id: &ObjectId) -> Result<bool, StoreError> {
        self.0.has_blob(id)
    }

    fn put_blob(&self, id: &ObjectId, bytes: &[u8]) -> Result<(), StoreError> {
        self.0.put_blob(id, bytes)
    }
}

impl<B: super::Backend + ?Sized> CommitSink for StoreSink<'_, B> {
    fn finish(&self) -> Result<(), StoreError> {
        self.0.flush_blobs()
    }
}
