//! Pack files of a local store: blobs kept as they were written, back to
//! back, instead of being copied into RocksDB. Two kinds of writer make
//! them: processes that do not hold the writer lock (the ranks of a step
//! committed shard by shard), and the writer itself when a commit's input is
//! large ([`PACKED_COMMIT_BYTES`]).
//!
//! ```text
//! <repo>/packs/<pack id>.pack            blobs back to back
//! <repo>/packs/tmp-<pid>-<nanos>.pack    a commit's pack being written
//! pack_index (column family)             blob id → pack id (32 bytes) ‖ offset u64 LE ‖ length u64 LE
//! ```
//!
//! A commit by the writer appends its new blobs to a `tmp-` pack
//! ([`PackSink::for_commit`]); before the commit is published the pack is synced,
//! renamed to the blake3 of its postcard index and indexed in one synced
//! batch, as a shard's pack is at sealing. Through RocksDB the same blobs
//! were copied into a write batch and a memtable before a flush wrote them
//! to a blob file. A `tmp-` pack left by a crash is removed by `gc`.
//!
//! A rank stages `blobs.pack` with `blobs.idx` (postcard list of (blob id,
//! offset, length)) in its shard directory under `pending/`. Sealing moves
//! the pack to `packs/` under the blake3 of its index, then indexes its
//! blobs (and their sizes) in one synced batch: a rename and a few bytes per
//! blob, where copying the blobs into RocksDB would rewrite them all (and so
//! did ingesting them as table files: compaction moved every value into
//! blob files). `gc` deletes a pack once none of its blobs is live, and
//! moves the live blobs of a partly dead pack into RocksDB first.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use rocksdb::{ColumnFamily, IteratorMode, WriteBatch};

use super::{CF_BLOB_SIZES, CF_BLOBS, CF_PACK_INDEX, RocksStore};
use crate::format::direct::AppendFile;
use crate::store::StoreError;
use crate::store::backend::BlobStore;
use crate::store::object::ObjectId;
use crate::store::pending::{BlobSink, CommitSink, PendingKey};

/// A staged pack's index: (blob id, offset, length).
pub(super) type PackEntries = Vec<(ObjectId, u64, u64)>;

pub(super) const STAGED_PACK: &str = "blobs.pack";
pub(super) const STAGED_INDEX: &str = "blobs.idx";

pub(super) fn packs_dir(root: &Path) -> PathBuf {
    root.join("packs")
}

fn pack_path(root: &Path, pack: &ObjectId) -> PathBuf {
    packs_dir(root).join(format!("{}.pack", pack.to_hex()))
}

/// Pack files opened so far, by pack id.
#[derive(Default)]
pub(super) struct OpenPacks(Mutex<HashMap<ObjectId, Arc<File>>>);

/// How many pack files a store keeps open at once: a store with a pack per
/// large commit may hold thousands, more than a process may open.
const MAX_OPEN_PACKS: usize = 128;

/// Input size from which the writer's commit puts its new blobs in a pack
/// of its own. Below it they go to RocksDB, which keeps a store of many
/// small commits in a few files.
pub(super) const PACKED_COMMIT_BYTES: u64 = 64 << 20;

/// A pack being appended to: a rank's staged pack, or a commit's.
struct PackWriter {
    path: PathBuf,
    /// `None` once finished.
    file: Option<AppendFile>,
    len: u64,
    entries: PackEntries,
    staged: HashSet<ObjectId>,
}

impl PackWriter {
    /// Creates the pack at `path`. The blobs are synced and not read again
    /// before the commit is published (and then, if at all, by a checkout or
    /// a push): they go around the page cache where they can.
    fn create(path: PathBuf) -> Result<PackWriter, StoreError> {
        let file = AppendFile::create(&path).map_err(|e| StoreError::io(&path, e))?;
        Ok(PackWriter {
            path,
            file: Some(file),
            len: 0,
            entries: Vec::new(),
            staged: HashSet::new(),
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the blob was appended already.
    fn holds(&self, id: &ObjectId) -> bool {
        self.staged.contains(id)
    }

    /// Appends a blob, unless it was appended before.
    fn append(&mut self, id: &ObjectId, bytes: &[u8]) -> Result<(), StoreError> {
        if self.staged.contains(id) {
            return Ok(());
        }
        let file = self
            .file
            .as_mut()
            .expect("a pack is written before it is finished");
        file.write_all(bytes)
            .map_err(|e| StoreError::io(&self.path, e))?;
        self.staged.insert(*id);
        self.entries.push((*id, self.len, bytes.len() as u64));
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Syncs the pack and returns its index; a pack without blobs is
    /// removed instead, and its index is empty.
    fn finish(&mut self) -> Result<PackEntries, StoreError> {
        let file = self.file.take().expect("a pack is finished once");
        if self.entries.is_empty() {
            drop(file);
            std::fs::remove_file(&self.path).map_err(|e| StoreError::io(&self.path, e))?;
        } else {
            file.finish().map_err(|e| StoreError::io(&self.path, e))?;
        }
        Ok(std::mem::take(&mut self.entries))
    }
}

/// Blobs appended to a pack beside a store: a blob in either is held. A
/// rank's shard sink stages through one; as a [`CommitSink`] it is where the
/// writer's commit of a large input puts its new blobs, published by
/// [`CommitSink::finish`] (see the module docs).
pub(super) struct PackSink<'a> {
    store: &'a RocksStore,
    pack: Mutex<PackWriter>,
}

impl<'a> PackSink<'a> {
    pub(super) fn new(store: &'a RocksStore, path: PathBuf) -> Result<PackSink<'a>, StoreError> {
        Ok(PackSink {
            store,
            pack: Mutex::new(PackWriter::create(path)?),
        })
    }

    /// A pack for the writer's commit, under a temporary name in `packs/`.
    pub(super) fn for_commit(store: &'a RocksStore) -> Result<PackSink<'a>, StoreError> {
        let dir = packs_dir(&store.root);
        std::fs::create_dir_all(&dir).map_err(|e| StoreError::io(&dir, e))?;
        PackSink::new(store, dir.join(format!("tmp-{}.pack", writer_tag())))
    }

    /// Syncs the pack and returns its index (see [`PackWriter::finish`]).
    pub(super) fn finish_pack(&self) -> Result<PackEntries, StoreError> {
        self.pack.lock().expect("pack lock").finish()
    }
}

impl BlobSink for PackSink<'_> {
    fn has_blob(&self, id: &ObjectId) -> Result<bool, StoreError> {
        if self.pack.lock().expect("pack lock").holds(id) {
            return Ok(true);
        }
        self.store.has_blob(id)
    }

    fn put_blob(&self, id: &ObjectId, bytes: &[u8]) -> Result<(), StoreError> {
        self.pack.lock().expect("pack lock").append(id, bytes)
    }
}

impl CommitSink for PackSink<'_> {
    fn finish(&self) -> Result<(), StoreError> {
        let mut writer = self.pack.lock().expect("pack lock");
        let entries = writer.finish()?;
        if entries.is_empty() {
            return Ok(());
        }
        let index = postcard::to_stdvec(&entries).expect("serializing to a Vec cannot fail");
        let pack = ObjectId::of(&index);
        let dest = pack_path(&self.store.root, &pack);
        std::fs::rename(writer.path(), &dest).map_err(|e| StoreError::io(&dest, e))?;
        sync_dir(&packs_dir(&self.store.root))?;
        self.store.index_pack(&pack, entries)
    }
}

impl Drop for PackSink<'_> {
    /// An abandoned commit or shard (an error while encoding) leaves no pack
    /// behind; once published the file has been renamed (or moved with its
    /// shard's directory) and this finds nothing.
    fn drop(&mut self) {
        if let Ok(writer) = self.pack.get_mut() {
            let _ = std::fs::remove_file(writer.path());
        }
    }
}

/// `<pid>-<nanoseconds since the epoch>`: names what one writer is writing
/// apart from what others (or its own earlier attempts) wrote.
pub(super) fn writer_tag() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{nanos}", std::process::id())
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))
}

fn index_value(pack: &ObjectId, offset: u64, len: u64) -> Vec<u8> {
    let mut value = pack.0.to_vec();
    value.extend_from_slice(&offset.to_le_bytes());
    value.extend_from_slice(&len.to_le_bytes());
    value
}

fn parse_index_value(value: &[u8]) -> Option<(ObjectId, u64, u64)> {
    if value.len() != 48 {
        return None;
    }
    Some((
        ObjectId::from_slice(&value[..32])?,
        u64::from_le_bytes(value[32..40].try_into().ok()?),
        u64::from_le_bytes(value[40..48].try_into().ok()?),
    ))
}

impl RocksStore {
    /// The pack index, where this store has one (not a version-1 store
    /// opened for reading).
    pub(super) fn pack_index(&self) -> Option<&ColumnFamily> {
        self.cfs
            .contains(&CF_PACK_INDEX)
            .then(|| self.cf(CF_PACK_INDEX))
    }

    /// A blob kept in a pack, if the index names one.
    pub(super) fn get_packed(&self, id: &ObjectId) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(index) = self.pack_index() else {
            return Ok(None);
        };
        let Some(value) = self.db.get_pinned_cf(index, id.0)? else {
            return Ok(None);
        };
        let corrupt = |detail: String| StoreError::Corrupt {
            what: format!("blob {id}"),
            detail,
        };
        let (pack, offset, len) =
            parse_index_value(&value).ok_or_else(|| corrupt("bad pack index entry".into()))?;
        let file = self.open_pack(&pack)?;
        let mut bytes = vec![0; len as usize];
        file.read_exact_at(&mut bytes, offset)
            .map_err(|e| corrupt(format!("pack {}: {e}", pack.short())))?;
        Ok(Some(bytes))
    }

    fn open_pack(&self, pack: &ObjectId) -> Result<Arc<File>, StoreError> {
        let mut open = self.packs.0.lock().expect("packs lock");
        if let Some(file) = open.get(pack) {
            return Ok(file.clone());
        }
        if open.len() >= MAX_OPEN_PACKS {
            open.clear();
        }
        let path = pack_path(&self.root, pack);
        let file = Arc::new(File::open(&path).map_err(|e| StoreError::Corrupt {
            what: format!("pack {}", pack.short()),
            detail: format!("{}: {e}", path.display()),
        })?);
        open.insert(*pack, file.clone());
        Ok(file)
    }

    /// Moves every staged pack of `key`'s shards into `packs/` and indexes
    /// its blobs. Idempotent: a pack already moved is indexed again.
    pub(super) fn adopt_staged_packs(&self, key: &PendingKey) -> Result<(), StoreError> {
        let dir = packs_dir(&self.root);
        let key_dir = super::pending::key_dir(&self.root, key);
        for (_, shard_dir) in super::pending::shard_dirs(&key_dir)? {
            let idx_path = shard_dir.join(STAGED_INDEX);
            let Ok(idx_bytes) = std::fs::read(&idx_path) else {
                continue; // a shard without blobs
            };
            let entries: PackEntries =
                postcard::from_bytes(&idx_bytes).map_err(|e| StoreError::Corrupt {
                    what: idx_path.display().to_string(),
                    detail: e.to_string(),
                })?;
            let pack = ObjectId::of(&idx_bytes);
            let dest = pack_path(&self.root, &pack);
            let staged = shard_dir.join(STAGED_PACK);
            if staged.exists() {
                std::fs::create_dir_all(&dir).map_err(|e| StoreError::io(&dir, e))?;
                std::fs::rename(&staged, &dest).map_err(|e| StoreError::io(&dest, e))?;
                sync_dir(&dir)?;
            }
            if !dest.exists() {
                return Err(StoreError::Corrupt {
                    what: format!("pack {}", pack.short()),
                    detail: format!("staged by {} but not found", shard_dir.display()),
                });
            }
            self.index_pack(&pack, entries)?;
        }
        Ok(())
    }

    /// Indexes the blobs of pack `pack` (in `packs/` already) that the store
    /// does not hold yet, with their sizes, in one synced batch.
    fn index_pack(&self, pack: &ObjectId, entries: PackEntries) -> Result<(), StoreError> {
        let index = self.pack_index().expect("a writer has the pack index");
        let mut batch = WriteBatch::default();
        for (id, offset, len) in entries {
            if !self.has_blob(&id)? {
                batch.put_cf(index, id.0, index_value(pack, offset, len));
                batch.put_cf(self.cf(CF_BLOB_SIZES), id.0, len.to_le_bytes());
            }
        }
        self.write_synced(batch)
    }

    /// Deletes packs none of whose blobs is indexed any more; the live blobs
    /// of a partly dead pack move into RocksDB first, so `gc` gives back all
    /// the space of deleted blobs.
    pub(super) fn reclaim_packs(&self) -> Result<(), StoreError> {
        let Some(index) = self.pack_index() else {
            return Ok(());
        };
        let dir = packs_dir(&self.root);
        let Ok(files) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        let mut live: HashMap<ObjectId, Vec<(ObjectId, u64, u64)>> = HashMap::new();
        for item in self.db.iterator_cf(index, IteratorMode::Start) {
            let (key, value) = item?;
            if let (Some(id), Some((pack, offset, len))) =
                (ObjectId::from_slice(&key), parse_index_value(&value))
            {
                live.entry(pack).or_default().push((id, offset, len));
            }
        }
        for file in files {
            let path = file.map_err(|e| StoreError::io(&dir, e))?.path();
            if is_abandoned_commit_pack(&path) {
                // `gc` holds the writer lock: no commit is writing it.
                std::fs::remove_file(&path).map_err(|e| StoreError::io(&path, e))?;
                continue;
            }
            let Some(pack) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(ObjectId::from_hex)
            else {
                continue;
            };
            let size = std::fs::metadata(&path).map_or(0, |m| m.len());
            let blobs = live.remove(&pack).unwrap_or_default();
            let live_bytes: u64 = blobs.iter().map(|(_, _, len)| len).sum();
            if live_bytes == size {
                continue;
            }
            if !blobs.is_empty() {
                self.move_into_db(&pack, &blobs)?;
            }
            self.packs.0.lock().expect("packs lock").remove(&pack);
            std::fs::remove_file(&path).map_err(|e| StoreError::io(&path, e))?;
        }
        Ok(())
    }

    fn move_into_db(
        &self,
        pack: &ObjectId,
        blobs: &[(ObjectId, u64, u64)],
    ) -> Result<(), StoreError> {
        let index = self.pack_index().expect("checked by the caller");
        let file = self.open_pack(pack)?;
        // Batches of bounded bytes, not of a number of blobs: a pack of a
        // large commit holds blobs of up to a chunk (4 MiB) each, and 256
        // of them held a GiB in memory.
        let mut batch = WriteBatch::default();
        let mut batch_bytes = 0;
        for (id, offset, len) in blobs {
            let mut bytes = vec![0; *len as usize];
            file.read_exact_at(&mut bytes, *offset)
                .map_err(|e| StoreError::io(pack_path(&self.root, pack), e))?;
            batch.put_cf(self.cf(CF_BLOBS), id.0, &bytes);
            batch.delete_cf(index, id.0);
            batch_bytes += bytes.len();
            if batch_bytes >= MOVE_BATCH_BYTES {
                self.write_synced(std::mem::take(&mut batch))?;
                batch_bytes = 0;
            }
        }
        self.write_synced(batch)
    }
}

/// Bytes of blobs `gc` moves from a pack into RocksDB per write batch.
const MOVE_BATCH_BYTES: usize = 64 << 20;

/// A commit's pack that was never renamed: its writer crashed or failed.
fn is_abandoned_commit_pack(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("tmp-") && n.ends_with(".pack"))
}
