//! Pack files of a local store: blobs written by processes that do not hold
//! the writer lock (the ranks of a step committed shard by shard), kept as
//! they were written instead of being copied into RocksDB.
//!
//! ```text
//! <repo>/packs/<pack id>.pack   blobs back to back
//! pack_index (column family)    blob id → pack id (32 bytes) ‖ offset u64 LE ‖ length u64 LE
//! ```
//!
//! A rank stages `blobs.pack` with `blobs.idx` (postcard list of (blob id,
//! offset, length)) in its shard directory under `pending/`. Sealing moves
//! the pack to `packs/` under the blake3 of its index, then indexes its
//! blobs (and their sizes) in one synced batch: a rename and a few bytes per
//! blob, where copying the blobs into RocksDB would rewrite them all (and so
//! did ingesting them as table files: compaction moved every value into
//! blob files). `gc` deletes a pack once none of its blobs is live, and
//! moves the live blobs of a partly dead pack into RocksDB first.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rocksdb::{ColumnFamily, IteratorMode, WriteBatch};

use super::{CF_BLOB_SIZES, CF_BLOBS, CF_PACK_INDEX, RocksStore};
use crate::store::StoreError;
use crate::store::backend::BlobStore;
use crate::store::object::ObjectId;
use crate::store::pending::PendingKey;

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
        let index = self.pack_index().expect("a writer has the pack index");
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
                File::open(&dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| StoreError::io(&dir, e))?;
            }
            if !dest.exists() {
                return Err(StoreError::Corrupt {
                    what: format!("pack {}", pack.short()),
                    detail: format!("staged by {} but not found", shard_dir.display()),
                });
            }
            let mut batch = WriteBatch::default();
            for (id, offset, len) in entries {
                if !self.has_blob(&id)? {
                    batch.put_cf(index, id.0, index_value(&pack, offset, len));
                    batch.put_cf(self.cf(CF_BLOB_SIZES), id.0, len.to_le_bytes());
                }
            }
            self.write_synced(batch)?;
        }
        Ok(())
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
        for chunk in blobs.chunks(256) {
            let mut batch = WriteBatch::default();
            for (id, offset, len) in chunk {
                let mut bytes = vec![0; *len as usize];
                file.read_exact_at(&mut bytes, *offset)
                    .map_err(|e| StoreError::io(pack_path(&self.root, pack), e))?;
                batch.put_cf(self.cf(CF_BLOBS), id.0, &bytes);
                batch.delete_cf(index, id.0);
            }
            self.write_synced(batch)?;
        }
        Ok(())
    }
}
