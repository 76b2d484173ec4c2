//! Shards of pending steps in a local store (see [`crate::store::pending`]).
//!
//! ```text
//! <repo>/pending/<step:020>-<hash>/key          the PendingKey (JSON)
//! <repo>/pending/<step:020>-<hash>/<K>/manifest shard K's manifest
//! <repo>/pending/<step:020>-<hash>/<K>/blobs.pack, blobs.idx
//! <repo>/pending/<step:020>-<hash>/tmp-<K>-<pid>-<nanos>/   being written
//! ```
//!
//! RocksDB allows one writer process, so a shard cannot put its blobs into
//! the database while other ranks do the same. It appends them instead to a
//! pack file of its own, which the sealer moves into `packs/` under the
//! writer lock (see `packs.rs`): sealing costs a rename, not a second write
//! of the blobs. A shard appears when its directory is renamed from
//! `tmp-…` to `<K>`, after every file in it was synced.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::RocksStore;
use super::packs::{PackSink, STAGED_INDEX, STAGED_PACK, sync_dir, writer_tag};
use crate::store::StoreError;
use crate::store::object::ObjectId;
use crate::store::pending::{BlobSink, PendingInfo, PendingKey, ShardSink};

const KEY_FILE: &str = "key";
const MANIFEST: &str = "manifest";

fn pending_root(root: &Path) -> PathBuf {
    root.join("pending")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::io(path, e)
}

pub(super) fn key_dir(root: &Path, key: &PendingKey) -> PathBuf {
    pending_root(root).join(key.dir_name())
}

pub(super) struct RocksShardSink<'a> {
    /// The shard's staged pack.
    blobs: PackSink<'a>,
    key_dir: PathBuf,
    tmp: PathBuf,
    shard: u32,
}

impl<'a> RocksShardSink<'a> {
    pub(super) fn new(
        store: &'a RocksStore,
        key: &PendingKey,
        shard: u32,
    ) -> Result<Self, StoreError> {
        let key_dir = key_dir(store.root(), key);
        std::fs::create_dir_all(&key_dir).map_err(io(&key_dir))?;
        let key_file = key_dir.join(KEY_FILE);
        if !key_file.exists() {
            let json = serde_json::to_vec(key).expect("a key serializes");
            let tmp = key_dir.join(format!("{KEY_FILE}.tmp-{}", std::process::id()));
            std::fs::write(&tmp, json).map_err(io(&tmp))?;
            std::fs::rename(&tmp, &key_file).map_err(io(&key_file))?;
        }
        let tmp = key_dir.join(format!("tmp-{shard}-{}", writer_tag()));
        std::fs::create_dir(&tmp).map_err(io(&tmp))?;
        let blobs = PackSink::new(store, tmp.join(STAGED_PACK))?;
        Ok(RocksShardSink {
            blobs,
            key_dir,
            tmp,
            shard,
        })
    }
}

impl BlobSink for RocksShardSink<'_> {
    fn has_blob(&self, id: &ObjectId) -> Result<bool, StoreError> {
        self.blobs.has_blob(id)
    }

    fn put_blob(&self, id: &ObjectId, bytes: &[u8]) -> Result<(), StoreError> {
        self.blobs.put_blob(id, bytes)
    }
}

impl ShardSink for RocksShardSink<'_> {
    fn finish(self: Box<Self>, manifest: Vec<u8>) -> Result<(), StoreError> {
        let entries = self.blobs.finish_pack()?;
        if !entries.is_empty() {
            let idx = postcard::to_stdvec(&entries).expect("serializing to a Vec cannot fail");
            write_synced(&self.tmp.join(STAGED_INDEX), &idx)?;
        }
        write_synced(&self.tmp.join(MANIFEST), &manifest)?;
        sync_dir(&self.tmp)?;
        let done = self.key_dir.join(self.shard.to_string());
        // A shard committed again (a retry) replaces its earlier staging.
        if done.exists() {
            std::fs::remove_dir_all(&done).map_err(io(&done))?;
        }
        std::fs::rename(&self.tmp, &done).map_err(io(&done))?;
        sync_dir(&self.key_dir)
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut file = File::create(path).map_err(io(path))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io(path))
}

impl Drop for RocksShardSink<'_> {
    /// An abandoned shard (an error while encoding) leaves nothing behind;
    /// after `finish` the directory has been renamed and this is a no-op.
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

/// The shard directories of a pending step: (shard, directory).
pub(super) fn shard_dirs(key_dir: &Path) -> Result<Vec<(u32, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(key_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(StoreError::io(key_dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(key_dir))?;
        if let Some(shard) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
            out.push((shard, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

pub(super) fn shard_manifests(
    root: &Path,
    key: &PendingKey,
) -> Result<Vec<(u32, Vec<u8>)>, StoreError> {
    shard_dirs(&pending_root(root).join(key.dir_name()))?
        .into_iter()
        .map(|(shard, dir)| {
            let path = dir.join(MANIFEST);
            std::fs::read(&path).map(|b| (shard, b)).map_err(io(&path))
        })
        .collect()
}

pub(super) fn pending_steps(root: &Path) -> Result<Vec<PendingInfo>, StoreError> {
    let dir = pending_root(root);
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(out);
    };
    for entry in entries {
        let key_dir = entry.map_err(io(&dir))?.path();
        let key_file = key_dir.join(KEY_FILE);
        let Ok(json) = std::fs::read(&key_file) else {
            continue;
        };
        let key: PendingKey = serde_json::from_slice(&json).map_err(|e| StoreError::Corrupt {
            what: key_file.display().to_string(),
            detail: e.to_string(),
        })?;
        let mut newest = mtime(&key_dir);
        let mut shards = Vec::new();
        for sub in std::fs::read_dir(&key_dir).map_err(io(&key_dir))?.flatten() {
            newest = newest.max(mtime(&sub.path()));
            if let Some(shard) = sub.file_name().to_str().and_then(|n| n.parse().ok()) {
                shards.push(shard);
            }
        }
        shards.sort_unstable();
        let age_secs = SystemTime::now()
            .duration_since(newest)
            .map_or(0, |d| d.as_secs());
        out.push(PendingInfo {
            key,
            shards,
            age_secs,
        });
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

fn mtime(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(UNIX_EPOCH)
}

impl RocksStore {
    pub(super) fn remove_pending(&self, key: &PendingKey) -> Result<(), StoreError> {
        let key_dir = pending_root(self.root()).join(key.dir_name());
        match std::fs::remove_dir_all(&key_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io(&key_dir, e)),
        }
    }
}
