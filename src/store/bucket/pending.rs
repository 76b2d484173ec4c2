//! Shards of pending steps in a bucket (see [`crate::store::pending`]).
//!
//! A shard's blobs are ordinary packs: ranks on different machines upload
//! them side by side, as concurrent pushes do. Its manifest follows, once
//! its packs and their indexes are in:
//!
//! ```text
//! pending/<step:020>-<hash>/key    the PendingKey (JSON)
//! pending/<step:020>-<hash>/<K>    shard K's manifest
//! ```
//!
//! Sealing publishes the commit like any other and deletes these objects.
//! Packs of a step that never seals are unreferenced and `gc` removes them
//! after its grace period, like a push's that never moved its ref.

use std::collections::BTreeMap;

use super::{BucketStore, layout};
use crate::store::StoreError;
use crate::store::backend::BlobStore;
use crate::store::object::ObjectId;
use crate::store::pending::{BlobSink, PendingInfo, PendingKey, ShardSink};

const KEY_NAME: &str = "key";

fn key_dir(key: &PendingKey) -> String {
    format!("{}/{}", layout::PENDING, key.dir_name())
}

pub(super) struct BucketShardSink<'a> {
    store: &'a BucketStore,
    key: PendingKey,
    shard: u32,
}

impl<'a> BucketShardSink<'a> {
    pub(super) fn new(store: &'a BucketStore, key: &PendingKey, shard: u32) -> Self {
        BucketShardSink {
            store,
            key: key.clone(),
            shard,
        }
    }
}

impl BlobSink for BucketShardSink<'_> {
    fn has_blob(&self, id: &ObjectId) -> Result<bool, StoreError> {
        self.store.has_blob(id)
    }

    fn put_blob(&self, id: &ObjectId, bytes: &[u8]) -> Result<(), StoreError> {
        self.store.put_blob(id, bytes)
    }
}

impl ShardSink for BucketShardSink<'_> {
    fn finish(self: Box<Self>, manifest: Vec<u8>) -> Result<(), StoreError> {
        self.store.flush_blobs()?;
        let dir = key_dir(&self.key);
        let json = serde_json::to_vec(&self.key).expect("a key serializes");
        self.store
            .put_overwrite(&format!("{dir}/{KEY_NAME}"), json)?;
        self.store
            .put_overwrite(&format!("{dir}/{}", self.shard), manifest)
    }
}

impl BucketStore {
    pub(super) fn read_shard_manifests(
        &self,
        key: &PendingKey,
    ) -> Result<Vec<(u32, Vec<u8>)>, StoreError> {
        let dir = key_dir(key);
        let mut out = Vec::new();
        for meta in self.list(&format!("{dir}/"))? {
            let k = meta.location.to_string();
            let Some(shard) = k.rsplit('/').next().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            // Deleted by a sealer between the listing and the read: the
            // step is sealed, and the caller sees that.
            if let Some(bytes) = self.get_opt(&k)? {
                out.push((shard, bytes));
            }
        }
        out.sort_by_key(|(shard, _)| *shard);
        Ok(out)
    }

    pub(super) fn list_pending(&self) -> Result<Vec<PendingInfo>, StoreError> {
        let now = chrono::Utc::now();
        let mut dirs: BTreeMap<String, (Vec<u32>, i64)> = BTreeMap::new();
        for meta in self.list(&format!("{}/", layout::PENDING))? {
            let k = meta.location.to_string();
            let Some((dir, name)) = k.rsplit_once('/') else {
                continue;
            };
            let age = (now - meta.last_modified).num_seconds().max(0);
            let entry = dirs
                .entry(dir.to_string())
                .or_insert((Vec::new(), i64::MAX));
            entry.1 = entry.1.min(age);
            if let Ok(shard) = name.parse() {
                entry.0.push(shard);
            }
        }
        let mut out = Vec::new();
        for (dir, (mut shards, age)) in dirs {
            let Some(json) = self.get_opt(&format!("{dir}/{KEY_NAME}"))? else {
                continue;
            };
            let key = serde_json::from_slice(&json).map_err(|e| StoreError::Corrupt {
                what: format!("{dir}/{KEY_NAME} on {}", self.url),
                detail: e.to_string(),
            })?;
            shards.sort_unstable();
            out.push(PendingInfo {
                key,
                shards,
                age_secs: age as u64,
            });
        }
        Ok(out)
    }

    pub(super) fn delete_pending(&self, key: &PendingKey) -> Result<(), StoreError> {
        let keys: Vec<String> = self
            .list(&format!("{}/", key_dir(key)))?
            .into_iter()
            .map(|m| m.location.to_string())
            .collect();
        self.delete_keys(&keys)
    }
}
