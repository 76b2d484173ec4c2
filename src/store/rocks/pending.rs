//! Shards of pending steps in a local store (see [`crate::store::pending`]).
//!
//! ```text
//! <repo>/pending/<step:020>-<hash>/key          the PendingKey (JSON)
//! <repo>/pending/<step:020>-<hash>/<K>/manifest shard K's manifest
//! <repo>/pending/<step:020>-<hash>/<K>/blobs-<n>.sst, sizes-<n>.sst
//! <repo>/pending/<step:020>-<hash>/tmp-<K>-<pid>-<nanos>/   being written
//! ```
//!
//! RocksDB allows one writer process, so a shard cannot put its blobs into
//! the database while other ranks do the same. It writes them instead into
//! RocksDB table files of its own (`SstFileWriter`, sorted batches of up to
//! [`BATCH_BYTES`]), which the sealer ingests under the writer lock: the
//! files are moved into the database, not copied, so sealing costs no
//! second write of the blobs. A shard appears when its directory is renamed
//! from `tmp-…` to `<K>`, after every file in it was synced.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rocksdb::{IngestExternalFileOptions, SstFileWriter};

use super::{CF_BLOB_SIZES, CF_BLOBS, RocksStore, cf_options};
use crate::store::StoreError;
use crate::store::backend::BlobStore;
use crate::store::object::ObjectId;
use crate::store::pending::{BlobSink, PendingInfo, PendingKey, ShardSink};

/// Blobs a shard holds in memory before writing them out as a sorted batch.
const BATCH_BYTES: usize = 64 << 20;

const KEY_FILE: &str = "key";
const MANIFEST: &str = "manifest";

fn pending_root(root: &Path) -> PathBuf {
    root.join("pending")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::io(path, e)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

pub(super) struct RocksShardSink<'a> {
    store: &'a RocksStore,
    key_dir: PathBuf,
    tmp: PathBuf,
    shard: u32,
    batch: Mutex<Batch>,
    files: AtomicU32,
}

#[derive(Default)]
struct Batch {
    blobs: Vec<(ObjectId, Vec<u8>)>,
    bytes: usize,
    staged: HashSet<ObjectId>,
}

impl<'a> RocksShardSink<'a> {
    pub(super) fn new(
        store: &'a RocksStore,
        key: &PendingKey,
        shard: u32,
    ) -> Result<Self, StoreError> {
        let key_dir = pending_root(store.root()).join(key.dir_name());
        std::fs::create_dir_all(&key_dir).map_err(io(&key_dir))?;
        let key_file = key_dir.join(KEY_FILE);
        if !key_file.exists() {
            let json = serde_json::to_vec(key).expect("a key serializes");
            let tmp = key_dir.join(format!("{KEY_FILE}.tmp-{}", std::process::id()));
            std::fs::write(&tmp, json).map_err(io(&tmp))?;
            std::fs::rename(&tmp, &key_file).map_err(io(&key_file))?;
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let tmp = key_dir.join(format!("tmp-{shard}-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&tmp).map_err(io(&tmp))?;
        Ok(RocksShardSink {
            store,
            key_dir,
            tmp,
            shard,
            batch: Mutex::default(),
            files: AtomicU32::new(0),
        })
    }

    /// Writes `blobs` as one pair of sorted table files.
    fn write_batch(&self, mut blobs: Vec<(ObjectId, Vec<u8>)>) -> Result<(), StoreError> {
        if blobs.is_empty() {
            return Ok(());
        }
        blobs.sort_unstable_by_key(|(id, _)| *id);
        blobs.dedup_by_key(|(id, _)| *id);
        let n = self.files.fetch_add(1, Ordering::Relaxed);
        let blob_opts = cf_options(CF_BLOBS);
        let size_opts = cf_options(CF_BLOB_SIZES);
        let blob_path = self.tmp.join(format!("blobs-{n:06}.sst"));
        let size_path = self.tmp.join(format!("sizes-{n:06}.sst"));
        let mut blob_file = SstFileWriter::create(&blob_opts);
        let mut size_file = SstFileWriter::create(&size_opts);
        blob_file.open(&blob_path)?;
        size_file.open(&size_path)?;
        for (id, bytes) in &blobs {
            blob_file.put(id.0, bytes)?;
            size_file.put(id.0, (bytes.len() as u64).to_le_bytes())?;
        }
        blob_file.finish()?;
        size_file.finish()?;
        Ok(())
    }
}

impl BlobSink for RocksShardSink<'_> {
    fn has_blob(&self, id: &ObjectId) -> Result<bool, StoreError> {
        if self.batch.lock().expect("batch lock").staged.contains(id) {
            return Ok(true);
        }
        self.store.has_blob(id)
    }

    fn put_blob(&self, id: &ObjectId, bytes: &[u8]) -> Result<(), StoreError> {
        let full = {
            let mut batch = self.batch.lock().expect("batch lock");
            if !batch.staged.insert(*id) {
                return Ok(());
            }
            batch.blobs.push((*id, bytes.to_vec()));
            batch.bytes += bytes.len();
            (batch.bytes >= BATCH_BYTES).then(|| {
                batch.bytes = 0;
                std::mem::take(&mut batch.blobs)
            })
        };
        match full {
            Some(blobs) => self.write_batch(blobs),
            None => Ok(()),
        }
    }
}

impl ShardSink for RocksShardSink<'_> {
    fn finish(self: Box<Self>, manifest: Vec<u8>) -> Result<(), StoreError> {
        let last = std::mem::take(&mut self.batch.lock().expect("batch lock").blobs);
        self.write_batch(last)?;
        let path = self.tmp.join(MANIFEST);
        std::fs::write(&path, manifest).map_err(io(&path))?;
        for entry in std::fs::read_dir(&self.tmp).map_err(io(&self.tmp))? {
            let entry = entry.map_err(io(&self.tmp))?;
            std::fs::File::open(entry.path())
                .and_then(|f| f.sync_all())
                .map_err(io(&entry.path()))?;
        }
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

impl Drop for RocksShardSink<'_> {
    /// An abandoned shard (an error while encoding) leaves nothing behind;
    /// after `finish` the directory has been renamed and this is a no-op.
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

/// The shard directories of a pending step: (shard, directory).
fn shard_dirs(key_dir: &Path) -> Result<Vec<(u32, PathBuf)>, StoreError> {
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
    /// Ingests every shard's table files: blobs first, then their sizes, so
    /// a size entry never claims a blob that is not there.
    pub(super) fn ingest_shards(&self, key: &PendingKey) -> Result<(), StoreError> {
        let key_dir = pending_root(self.root()).join(key.dir_name());
        let mut blobs = Vec::new();
        let mut sizes = Vec::new();
        for (_, dir) in shard_dirs(&key_dir)? {
            for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
                let path = entry.map_err(io(&dir))?.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name.starts_with("blobs-") && name.ends_with(".sst") {
                    blobs.push(path);
                } else if name.starts_with("sizes-") && name.ends_with(".sst") {
                    sizes.push(path);
                }
            }
        }
        let mut opts = IngestExternalFileOptions::default();
        opts.set_move_files(true);
        for (cf, files) in [(CF_BLOBS, blobs), (CF_BLOB_SIZES, sizes)] {
            // One file per call: batches of different shards overlap in key
            // range, and RocksDB places each overlapping file on its own.
            for file in files {
                self.db
                    .ingest_external_file_cf_opts(self.cf(cf), &opts, vec![&file])?;
                // Moved files are linked into the database; the name here
                // goes, so a second sealing attempt does not ingest it again.
                let _ = std::fs::remove_file(&file);
            }
        }
        Ok(())
    }

    pub(super) fn remove_pending(&self, key: &PendingKey) -> Result<(), StoreError> {
        let key_dir = pending_root(self.root()).join(key.dir_name());
        match std::fs::remove_dir_all(&key_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io(&key_dir, e)),
        }
    }
}
