//! The storage seam: what the `repo` layer needs from a place that holds a
//! store, as two small traits, and nothing about how a backend keeps it.
//!
//! - [`BlobStore`]: content-addressed, immutable blobs (encoded chunks)
//!   under their blake3 id: has, put, a flush barrier, get, ranged get,
//!   sizes, delete.
//! - [`MetaStore`]: commit records, refs (branches, tags, HEAD, with
//!   compare-and-swap), the per-branch step index and the store config.
//! - [`Backend`]: both, plus the few maintenance hooks whose meaning differs
//!   by backend (a publish barrier against concurrent readers, giving
//!   deleted space back, bytes occupied).
//!
//! RocksDB ([`super::rocks::RocksStore`]) is the embedded default; object
//! storage ([`super::bucket`]) sits beside it. The repo layer holds a
//! `Box<dyn Backend>` and never names either. `tests/backends.rs` runs one
//! conformance suite against every implementation.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::time::Duration;

use super::StoreError;
use super::config::StoreConfig;
use super::object::{self, CommitRecord, CommitSummary, ObjectId};
use super::pending::{CommitSink, PendingInfo, PendingKey, ShardSink, StoreSink};
use super::refs::RefEdit;

/// Content-addressed blob storage. A blob's id is the blake3 hash of its
/// bytes; blobs are never modified, only added and (by `gc`) deleted.
pub trait BlobStore: Send + Sync {
    fn has_blob(&self, id: &ObjectId) -> Result<bool, StoreError>;

    /// Stores a blob. It need not be durable (nor visible to other
    /// processes) until [`BlobStore::flush_blobs`] returns.
    fn put_blob(&self, id: &ObjectId, bytes: &[u8]) -> Result<(), StoreError>;

    /// Barrier: every blob put before the call is durable when it returns.
    /// A commit refers to blobs only after this.
    fn flush_blobs(&self) -> Result<(), StoreError>;

    /// The whole blob; [`StoreError::Corrupt`] when it is missing.
    fn get_blob(&self, id: &ObjectId) -> Result<Vec<u8>, StoreError>;

    /// Bytes `range` of a blob (clamped to its end).
    fn get_blob_range(&self, id: &ObjectId, range: Range<u64>) -> Result<Vec<u8>, StoreError> {
        let blob = self.get_blob(id)?;
        let end = (range.end as usize).min(blob.len());
        let start = (range.start as usize).min(end);
        Ok(blob[start..end].to_vec())
    }

    /// Every blob id with its size in bytes.
    fn blob_sizes(&self) -> Result<Vec<(ObjectId, u64)>, StoreError>;

    /// Number of blobs and the sum of their sizes.
    fn blob_totals(&self) -> Result<(u64, u64), StoreError> {
        let sizes = self.blob_sizes()?;
        Ok((sizes.len() as u64, sizes.iter().map(|(_, s)| s).sum()))
    }

    /// Deletes blobs; ids that are not there are ignored.
    fn delete_blobs(&self, ids: &[ObjectId]) -> Result<(), StoreError>;
}

/// Which kind of ref a compare-and-swap names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefKind {
    Branch,
    Tag,
}

impl RefKind {
    pub fn noun(self) -> &'static str {
        match self {
            RefKind::Branch => "branch",
            RefKind::Tag => "tag",
        }
    }
}

/// Commits, refs, the step index and the config.
pub trait MetaStore: Send + Sync {
    fn config(&self) -> Result<StoreConfig, StoreError>;

    /// A commit record's bytes as stored, unverified.
    fn get_commit_bytes(&self, id: &ObjectId) -> Result<Option<Vec<u8>>, StoreError>;

    /// A commit record, checked against its id.
    fn get_commit(&self, id: &ObjectId) -> Result<Option<CommitRecord>, StoreError> {
        let Some(bytes) = self.get_commit_bytes(id)? else {
            return Ok(None);
        };
        decode_commit(id, &bytes).map(Some)
    }

    /// A commit's summary (everything but its file list), for `log`. May
    /// skip the id check that [`MetaStore::get_commit`] makes.
    fn get_commit_summary(&self, id: &ObjectId) -> Result<Option<CommitSummary>, StoreError> {
        let Some(bytes) = self.get_commit_bytes(id)? else {
            return Ok(None);
        };
        decode_summary(id, &bytes).map(Some)
    }

    /// Every commit's summary at once, when the backend can do that faster
    /// than point reads; `None` otherwise.
    fn all_commit_summaries(&self) -> Result<Option<HashMap<ObjectId, CommitSummary>>, StoreError> {
        Ok(None)
    }

    fn commit_ids(&self) -> Result<Vec<ObjectId>, StoreError>;

    fn head_branch(&self) -> Result<String, StoreError>;

    fn branch_tip(&self, branch: &str) -> Result<Option<ObjectId>, StoreError>;

    /// All branches with their tips, sorted by name.
    fn branches(&self) -> Result<Vec<(String, ObjectId)>, StoreError>;

    fn tag_target(&self, name: &str) -> Result<Option<ObjectId>, StoreError>;

    /// All tags with their commits, sorted by name.
    fn tags(&self) -> Result<Vec<(String, ObjectId)>, StoreError>;

    /// Every commit a branch or tag points at: the roots of the history.
    fn root_commits(&self) -> Result<Vec<ObjectId>, StoreError> {
        Ok(self
            .branches()?
            .into_iter()
            .chain(self.tags()?)
            .map(|(_, id)| id)
            .collect())
    }

    fn commit_at_step(&self, branch: &str, step: u64) -> Result<Option<ObjectId>, StoreError>;

    /// The step index of `branch`: (step, commit), by step.
    fn branch_steps(&self, branch: &str) -> Result<Vec<(u64, ObjectId)>, StoreError>;

    /// Names of every branch that has a step index (normally: every branch).
    fn step_index_branches(&self) -> Result<Vec<String>, StoreError>;

    /// Makes a commit visible: the record, the branch tip, the step index
    /// and HEAD, atomically. Its blobs must be flushed already.
    /// `inherited_steps` are step-index entries a new branch takes over from
    /// the ancestry it forks from.
    fn publish_commit(
        &self,
        record: &CommitRecord,
        inherited_steps: &[(u64, ObjectId)],
    ) -> Result<ObjectId, StoreError>;

    /// Applies several ref, step-index and record changes atomically.
    fn apply(&self, edit: &RefEdit) -> Result<(), StoreError>;

    /// Moves a ref from `expected` to `new` (`None`: absent) if and only if
    /// it still points at `expected`; otherwise [`StoreError::RefMoved`]
    /// and nothing changes. This is what lets two writers share a remote.
    fn compare_and_swap_ref(
        &self,
        kind: RefKind,
        name: &str,
        expected: Option<ObjectId>,
        new: Option<ObjectId>,
    ) -> Result<(), StoreError>;
}

/// Held from flushing blobs until a commit is published; dropping it lets
/// waiting readers open again. Backends without the need hold nothing.
pub struct PublishGuard(#[allow(dead_code)] Option<Box<dyn Send>>);

impl PublishGuard {
    pub fn none() -> PublishGuard {
        PublishGuard(None)
    }

    pub fn holding(guard: impl Send + 'static) -> PublishGuard {
        PublishGuard(Some(Box::new(guard)))
    }
}

/// A place a store lives: blobs and metadata, plus maintenance.
pub trait Backend: BlobStore + MetaStore {
    /// Where the store is, for messages (a path or a URL).
    fn location(&self) -> String;

    /// Orders readers' opens against a writer making a change visible (see
    /// the RocksDB backend for why it needs one).
    fn hold_readers(&self) -> Result<PublishGuard, StoreError> {
        Ok(PublishGuard::none())
    }

    /// Gives the space of deleted blobs and records back, where deleting
    /// does not do that by itself.
    fn reclaim_space(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Commits and blobs written less than `grace` ago, which `gc` spares:
    /// where writers share a store without a lock (a bucket), they may
    /// belong to a push that has not moved its ref yet. A local store's
    /// writers exclude `gc` with its lock, so it names none.
    fn recent_objects(&self, _grace: Duration) -> Result<HashSet<ObjectId>, StoreError> {
        Ok(HashSet::new())
    }

    /// Removes, or with `dry_run` counts, what interrupted writers left
    /// that no record names, older than `grace` (a bucket's packs without an
    /// index, superseded ref entries). Returns how many objects.
    fn sweep_leftovers(&self, _grace: Duration, _dry_run: bool) -> Result<usize, StoreError> {
        Ok(0)
    }

    /// Bytes the store occupies where it is kept.
    fn physical_bytes(&self) -> Result<u64, StoreError> {
        Ok(self.blob_totals()?.1)
    }

    /// Where the writer's commit of `input_bytes` puts its new blobs; the
    /// commit is published after [`CommitSink::finish`]. By default the
    /// blobs go through [`BlobStore::put_blob`] and
    /// [`BlobStore::flush_blobs`]; a local store writes a large commit's
    /// blobs to a pack file of their own.
    fn commit_sink<'a>(
        &'a self,
        _input_bytes: u64,
    ) -> Result<Box<dyn CommitSink + 'a>, StoreError> {
        Ok(Box::new(StoreSink(self)))
    }

    /// A staging area for shard `shard` of pending step `key` (see
    /// [`super::pending`]). Needs no writer lock: call it on a read view.
    fn shard_sink<'a>(
        &'a self,
        key: &PendingKey,
        shard: u32,
    ) -> Result<Box<dyn ShardSink + 'a>, StoreError>;

    /// The manifests of `key`'s shards that have arrived: (shard, bytes),
    /// by shard.
    fn shard_manifests(&self, key: &PendingKey) -> Result<Vec<(u32, Vec<u8>)>, StoreError>;

    /// Every pending step: staged shards of steps not sealed (yet).
    fn pending_steps(&self) -> Result<Vec<PendingInfo>, StoreError>;

    /// As the writer, before the sealed commit is published: makes the
    /// blobs `key`'s shards staged part of the store. Idempotent.
    fn adopt_shards(&self, key: &PendingKey) -> Result<(), StoreError>;

    /// Deletes what `key`'s shards staged (after sealing, or by `gc`). A
    /// bucket's staged packs stay, for `gc` to remove as unreferenced.
    fn drop_pending(&self, key: &PendingKey) -> Result<(), StoreError>;
}

pub(crate) fn decode_commit(id: &ObjectId, bytes: &[u8]) -> Result<CommitRecord, StoreError> {
    if ObjectId::of(bytes) != *id {
        return Err(StoreError::Corrupt {
            what: format!("commit {id}"),
            detail: "record does not hash to its id".into(),
        });
    }
    refuse_newer(id, bytes)?;
    CommitRecord::from_bytes(bytes).map_err(|detail| StoreError::Corrupt {
        what: format!("commit {id}"),
        detail,
    })
}

pub(crate) fn decode_summary(id: &ObjectId, bytes: &[u8]) -> Result<CommitSummary, StoreError> {
    refuse_newer(id, bytes)?;
    CommitSummary::from_record_bytes(bytes).map_err(|detail| StoreError::Corrupt {
        what: format!("commit {id}"),
        detail,
    })
}

/// A record of a newer layout is not damage: say so, so that the user
/// upgrades rather than runs fsck.
fn refuse_newer(id: &ObjectId, bytes: &[u8]) -> Result<(), StoreError> {
    match object::newer_version(bytes) {
        Some(version) => Err(StoreError::TooNew {
            what: format!("commit {id}"),
            version,
            newest: object::COMMIT_VERSION,
        }),
        None => Ok(()),
    }
}
