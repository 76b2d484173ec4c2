//! The embedded backend: a store in one local directory, kept in RocksDB.
//!
//! ```text
//! <repo>/FORMAT      magic line and store format version
//! <repo>/lock        advisory lock file, held exclusively by the one writer
//! <repo>/view.lock   orders readers' opens against a writer's publishing
//! <repo>/db/         RocksDB: column families blobs, blob_sizes, commits, refs, steps, meta
//! <repo>/cache/      reconstruction cache of branch tips (safe to delete)
//! <repo>/packs/      blobs of large commits, and of ranks that wrote without the lock (`packs.rs`)
//! <repo>/pending/    shards of steps not sealed yet (see `pending.rs`)
//! ```
//!
//! docs/format.md has the byte-level layout. Blobs live here in
//! [`BlobStore`]; commits, refs and the step index in [`MetaStore`]
//! (`refs.rs`); the writer lock and the view lock in `lock.rs`.

pub mod lock;
mod packs;
mod pending;
mod refs;

use std::path::{Path, PathBuf};
use std::time::Duration;

use lock::{ViewLock, WriterLock};
use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DB, IteratorMode, Options, WriteBatch, WriteOptions,
};

use super::StoreError;
use super::backend::{Backend, BlobStore, PublishGuard};
use super::config::StoreConfig;
use super::object::ObjectId;
use super::pending::{CommitSink, PendingInfo, PendingKey, ShardSink, StoreSink};
use crate::format::plain::{direct_io_allowed, direct_writes_work};

/// First line of `<repo>/FORMAT`.
pub const FORMAT_MAGIC: &str = "ckptvc-store";
/// Version of the store layout as a whole (directory + column families).
/// Version 2 added `packs/` and the `pack_index` column family (blobs that
/// ranks staged without the lock, see `packs.rs`); a version-1 store is
/// read as it is and upgraded by its first writer.
pub const STORE_VERSION: u32 = 2;
const OLDEST_STORE_VERSION: u32 = 1;
pub(super) const CF_BLOBS: &str = "blobs";
pub(super) const CF_BLOB_SIZES: &str = "blob_sizes";
pub(super) const CF_COMMITS: &str = "commits";
pub(super) const CF_REFS: &str = "refs";
pub(super) const CF_STEPS: &str = "steps";
pub(super) const CF_META: &str = "meta";
pub(super) const CF_PACK_INDEX: &str = "pack_index";
const ALL_CFS: [&str; 7] = [
    CF_BLOBS,
    CF_BLOB_SIZES,
    CF_COMMITS,
    CF_REFS,
    CF_STEPS,
    CF_META,
    CF_PACK_INDEX,
];

pub(super) const META_CONFIG: &[u8] = b"config";
pub(super) const REF_HEAD: &[u8] = b"HEAD";
pub(super) const BRANCH_PREFIX: &str = "branch/";
pub(super) const TAG_PREFIX: &str = "tag/";

/// An open store. Readers open RocksDB read-only and see a consistent snapshot
/// of what was published before they opened; the one writer holds the lock.
pub struct RocksStore {
    root: PathBuf,
    db: DB,
    /// Column families this store has (a version-1 store opened for
    /// reading lacks `pack_index`).
    cfs: &'static [&'static str],
    /// Open pack files, by pack id.
    packs: packs::OpenPacks,
    _lock: Option<WriterLock>,
}

fn db_options() -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(false);
    opts.set_keep_log_file_num(2);
    // A torn last record (power loss mid-write) is dropped; damage anywhere
    // else in the write-ahead log fails the open instead of silently
    // ending the history early.
    opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::TolerateCorruptedTailRecords);
    opts.set_max_log_file_size(1 << 20);
    opts.set_log_level(rocksdb::LogLevel::Warn);
    // Blobs and their size index are flushed together, so after a crash a size
    // entry never claims a blob that did not reach disk.
    opts.set_atomic_flush(true);
    // Every compaction ends with a full scan for obsolete files: without
    // it, blob files left over by earlier flushes stayed on disk after `gc`
    // (found by the gc test: `du` did not fall every time).
    opts.set_delete_obsolete_files_period_micros(0);
    opts
}

/// [`db_options`] for the writer, whose memtable flushes write the blob
/// files: around the page cache (`O_DIRECT`) where the file system allows
/// it. A commit's blobs are synced and then not read again until a checkout
/// or a push; written through the page cache they cost a page allocation
/// per 4 KiB and push out pages that will be read (the training data, the
/// reconstruction cache). A keyframe of a 3.45 GB Adam state writes about
/// 2.9 GB of blobs: its commit from memory took 0.75× as long with them
/// written direct (docs/benchmarks.md, "Eighth round").
fn writer_options(root: &Path) -> Options {
    let mut opts = db_options();
    if direct_io_allowed() && direct_writes_work(root) {
        opts.set_use_direct_io_for_flush_and_compaction(true);
    }
    opts
}

fn cf_options(name: &str) -> Options {
    let mut opts = Options::default();
    opts.set_compression_type(rocksdb::DBCompressionType::None);
    if name == CF_BLOBS {
        // Blob payloads (already zstd-compressed by our codecs) go to blob
        // files instead of being rewritten by every LSM compaction.
        opts.set_enable_blob_files(true);
        opts.set_min_blob_size(1024);
        opts.set_blob_file_size(256 << 20);
        opts.set_blob_compression_type(rocksdb::DBCompressionType::None);
        // Only `gc` deletes blobs, and it runs blob garbage collection itself
        // (`reclaim_space`). Off otherwise: background compactions then never
        // delete a blob file, so readers running beside a commit never find
        // a blob file gone.
        opts.set_enable_blob_gc(false);
        opts.set_write_buffer_size(64 << 20);
    }
    opts
}

fn descriptors(cfs: &[&str]) -> Vec<ColumnFamilyDescriptor> {
    cfs.iter()
        .map(|name| ColumnFamilyDescriptor::new(*name, cf_options(name)))
        .collect()
}

impl RocksStore {
    pub fn db_dir(root: &Path) -> PathBuf {
        root.join("db")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates an empty store at `root`, which must not hold one already.
    pub fn init(root: &Path, config: &StoreConfig) -> Result<RocksStore, StoreError> {
        if root.join("FORMAT").exists() || Self::db_dir(root).exists() {
            return Err(StoreError::AlreadyExists(root.to_path_buf()));
        }
        std::fs::create_dir_all(root).map_err(|e| StoreError::io(root, e))?;
        let lock = WriterLock::acquire(&root.join("lock"), Duration::ZERO)?;
        let mut opts = writer_options(root);
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let db = DB::open_cf_descriptors(&opts, Self::db_dir(root), descriptors(&ALL_CFS))?;
        let store = RocksStore {
            root: root.to_path_buf(),
            db,
            cfs: &ALL_CFS,
            packs: packs::OpenPacks::default(),
            _lock: Some(lock),
        };
        let mut batch = WriteBatch::default();
        batch.put_cf(store.cf(CF_META), META_CONFIG, config.to_bytes());
        batch.put_cf(store.cf(CF_REFS), REF_HEAD, b"main");
        store.write_synced(batch)?;
        // FORMAT is written last: its presence means the store is complete.
        let format = format!("{FORMAT_MAGIC} {STORE_VERSION}\n");
        std::fs::write(root.join("FORMAT"), format).map_err(|e| StoreError::io(root, e))?;
        Ok(store)
    }

    /// The store's layout version, from `FORMAT`.
    fn check_format(root: &Path) -> Result<u32, StoreError> {
        let path = root.join("FORMAT");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::Missing(root.to_path_buf()));
            }
            Err(e) => return Err(StoreError::io(path, e)),
        };
        let version = text
            .trim()
            .strip_prefix(FORMAT_MAGIC)
            .and_then(|v| v.trim().parse::<u32>().ok())
            .filter(|v| (OLDEST_STORE_VERSION..=STORE_VERSION).contains(v));
        version.ok_or_else(|| StoreError::NotAStore {
            path: root.to_path_buf(),
            what: format!(
                "FORMAT says `{}`, expected `{FORMAT_MAGIC} N` with N from {OLDEST_STORE_VERSION} to {STORE_VERSION}",
                text.trim()
            ),
        })
    }

    /// The column families of a store of layout `version`.
    fn cfs_of(version: u32) -> &'static [&'static str] {
        if version >= 2 {
            &ALL_CFS
        } else {
            &ALL_CFS[..6]
        }
    }

    /// Opens for reading. Touches no file of the store.
    pub fn open_read(root: &Path) -> Result<RocksStore, StoreError> {
        let cfs = Self::cfs_of(Self::check_format(root)?);
        let mut opts = db_options();
        // Every table file is opened (and so kept readable) at open time:
        // a writer compacting meanwhile may unlink files, not take them away.
        opts.set_max_open_files(-1);
        let mut attempt = 0;
        let _view = ViewLock::shared(root);
        let db = loop {
            match DB::open_cf_descriptors_read_only(
                &opts,
                Self::db_dir(root),
                descriptors(cfs),
                false,
            ) {
                Ok(db) => break db,
                // A writer replaced a file between our reading the manifest
                // and opening the file: the next attempt sees the new state.
                Err(e) if attempt < OPEN_RETRIES && is_concurrent_change(&e) => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(20 * attempt as u64));
                }
                Err(e) => return Err(e.into()),
            }
        };
        Ok(RocksStore {
            root: root.to_path_buf(),
            db,
            cfs,
            packs: packs::OpenPacks::default(),
            _lock: None,
        })
    }

    /// Takes the writer lock (waiting up to `wait`). Check what the write
    /// needs on a read-only view while holding it, then
    /// [`RocksStore::open_writable`]: a refused operation then leaves every
    /// file of the store exactly as it was.
    pub fn lock(root: &Path, wait: Duration) -> Result<WriterLock, StoreError> {
        Self::check_format(root)?;
        WriterLock::acquire(&root.join("lock"), wait)
    }

    /// Opens for writing, as the holder of `lock`. A version-1 store is
    /// upgraded: its new column family is created, then `FORMAT` rewritten.
    pub fn open_writable(root: &Path, lock: WriterLock) -> Result<RocksStore, StoreError> {
        let version = Self::check_format(root)?;
        let mut opts = writer_options(root);
        opts.create_missing_column_families(true);
        let db = DB::open_cf_descriptors(&opts, Self::db_dir(root), descriptors(&ALL_CFS))?;
        if version < STORE_VERSION {
            let format = format!("{FORMAT_MAGIC} {STORE_VERSION}\n");
            let tmp = root.join("FORMAT.tmp");
            std::fs::write(&tmp, format)
                .and_then(|()| std::fs::rename(&tmp, root.join("FORMAT")))
                .map_err(|e| StoreError::io(root.join("FORMAT"), e))?;
        }
        Ok(RocksStore {
            root: root.to_path_buf(),
            db,
            cfs: &ALL_CFS,
            packs: packs::OpenPacks::default(),
            _lock: Some(lock),
        })
    }

    fn db(&self) -> &DB {
        &self.db
    }

    pub(super) fn cf(&self, name: &str) -> &ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column family opened with the store")
    }

    pub(super) fn write_synced(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        Ok(self.db.write_opt(batch, &opts)?)
    }

    /// Flushes every column family's memtable to table files.
    fn flush_all(&self) -> Result<(), StoreError> {
        let cfs: Vec<&ColumnFamily> = self.cfs.iter().map(|name| self.cf(name)).collect();
        Ok(self
            .db
            .flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default())?)
    }

    /// Compacts each column family that holds more than
    /// [`MAX_TABLE_FILES`] small table files into as few as it takes. Every
    /// writer's close flushes every column family, a table file each, mostly
    /// tiny (a commit record, a ref). RocksDB moves files whose key ranges do
    /// not overlap (the step index grows in key order) down the levels
    /// without merging them: a store of 441 commits held 885 table files of
    /// ~1.5 KB, every open (`max_open_files` -1) opened them all, and commit
    /// time grew with history (57 ms at 50 commits, 147 ms at 400).
    fn compact_crowded(&self) -> Result<(), StoreError> {
        let files = self.db.live_files()?;
        for &name in self.cfs {
            let count = files
                .iter()
                .filter(|f| f.column_family_name == *name && f.size < SMALL_TABLE_FILE)
                .count();
            if count > MAX_TABLE_FILES {
                // Forced: a plain compaction would move the files down
                // again without merging them.
                let mut opts = rocksdb::CompactOptions::default();
                opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
                self.db
                    .compact_range_cf_opt(self.cf(name), None::<&[u8]>, None::<&[u8]>, &opts);
            }
        }
        Ok(())
    }
}

/// Bytes a write batch of one blob and its size entry needs beyond the
/// blob: a 12-byte header, and per entry a tag, a column family id, two
/// length varints, the 32-byte key and (for the size) 8 bytes of value.
const BATCH_OVERHEAD: usize = 128;

impl BlobStore for RocksStore {
    fn has_blob(&self, id: &ObjectId) -> Result<bool, StoreError> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_BLOB_SIZES), id.0)?
            .is_some())
    }

    /// Writes a blob and its size entry without the WAL: blobs are made
    /// durable by [`Store::flush_blobs`] before any commit refers to them, so a
    /// crash before that only loses blobs nothing points to.
    fn put_blob(&self, id: &ObjectId, bytes: &[u8]) -> Result<(), StoreError> {
        // Sized for both entries up front: grown on demand, the batch's
        // buffer was copied again when the size entry was appended after
        // the blob (3.5% of a keyframe's CPU time).
        let mut batch = WriteBatch::with_capacity_bytes(bytes.len() + BATCH_OVERHEAD);
        batch.put_cf(self.cf(CF_BLOBS), id.0, bytes);
        batch.put_cf(
            self.cf(CF_BLOB_SIZES),
            id.0,
            (bytes.len() as u64).to_le_bytes(),
        );
        let mut opts = WriteOptions::default();
        opts.disable_wal(true);
        Ok(self.db.write_opt(batch, &opts)?)
    }

    fn flush_blobs(&self) -> Result<(), StoreError> {
        let cfs = [self.cf(CF_BLOBS), self.cf(CF_BLOB_SIZES)];
        Ok(self
            .db
            .flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default())?)
    }

    fn get_blob(&self, id: &ObjectId) -> Result<Vec<u8>, StoreError> {
        if let Some(bytes) = self.db.get_cf(self.cf(CF_BLOBS), id.0)? {
            return Ok(bytes);
        }
        self.get_packed(id)?.ok_or_else(|| StoreError::Corrupt {
            what: format!("blob {id}"),
            detail: "missing from the store".into(),
        })
    }

    /// Number of blobs and the sum of their encoded sizes.
    fn blob_totals(&self) -> Result<(u64, u64), StoreError> {
        let mut count = 0;
        let mut bytes = 0;
        for item in self
            .db
            .iterator_cf(self.cf(CF_BLOB_SIZES), IteratorMode::Start)
        {
            let (_, value) = item?;
            count += 1;
            bytes += u64::from_le_bytes(value.as_ref().try_into().unwrap_or([0; 8]));
        }
        Ok((count, bytes))
    }

    /// Every blob id in the store with its encoded size, from the size index.
    fn blob_sizes(&self) -> Result<Vec<(ObjectId, u64)>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db()
            .iterator_cf(self.cf(CF_BLOB_SIZES), IteratorMode::Start)
        {
            let (key, value) = item?;
            let size = value.as_ref().try_into().map(u64::from_le_bytes);
            if let (Some(id), Ok(size)) = (ObjectId::from_slice(&key), size) {
                out.push((id, size));
            }
        }
        Ok(out)
    }

    /// Deletes blobs (payload and size entry) in one synced batch.
    fn delete_blobs(&self, ids: &[ObjectId]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for id in ids {
            batch.delete_cf(self.cf(CF_BLOBS), id.0);
            batch.delete_cf(self.cf(CF_BLOB_SIZES), id.0);
            if let Some(index) = self.pack_index() {
                batch.delete_cf(index, id.0);
            }
        }
        self.write_synced(batch)
    }
}

impl Backend for RocksStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    /// Holds readers' opens off while a change is made visible (see
    /// [`ViewLock`]); keep it from flushing blobs until publishing.
    fn hold_readers(&self) -> Result<PublishGuard, StoreError> {
        Ok(PublishGuard::holding(ViewLock::exclusive(&self.root)?))
    }

    /// Gives the space of deleted blobs and records back to the file system:
    /// flushes every column family, then compacts each one fully, with blob
    /// garbage collection forced for every blob file, so blob files holding
    /// only deleted payloads are removed and the live payloads of mixed files
    /// are moved into new ones. Costs a rewrite of the live blobs that share a
    /// file with garbage; this is what `gc` pays to make `du` fall.
    fn reclaim_space(&self) -> Result<(), StoreError> {
        self.flush_all()?;
        self.reclaim_packs()?;
        let cfs: Vec<&ColumnFamily> = self.cfs.iter().map(|name| self.cf(name)).collect();
        let blobs = self.cf(CF_BLOBS);
        self.db.set_options_cf(
            blobs,
            &[
                ("enable_blob_garbage_collection", "true"),
                ("blob_garbage_collection_age_cutoff", "1.0"),
                ("blob_garbage_collection_force_threshold", "0.0"),
            ],
        )?;
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        for cf in &cfs {
            self.db
                .compact_range_cf_opt(*cf, None::<&[u8]>, None::<&[u8]>, &opts);
        }
        for _ in 0..4 {
            let garbage = self
                .db
                .property_int_value_cf(blobs, "rocksdb.live-blob-file-garbage-size")?;
            if garbage.unwrap_or(0) == 0 {
                break;
            }
            self.db
                .compact_range_cf_opt(blobs, None::<&[u8]>, None::<&[u8]>, &opts);
        }
        self.db.set_options_cf(
            blobs,
            &[
                ("enable_blob_garbage_collection", "false"),
                ("blob_garbage_collection_age_cutoff", "0.25"),
                ("blob_garbage_collection_force_threshold", "1.0"),
            ],
        )?;
        Ok(())
    }

    /// Bytes the store occupies on disk: every file under `db/` except
    /// RocksDB's informational logs (`LOG*`), which are not store data.
    fn physical_bytes(&self) -> Result<u64, StoreError> {
        let packs = packs::packs_dir(&self.root);
        let packed = if packs.exists() {
            dir_size(&packs, &|_| true)?
        } else {
            0
        };
        Ok(dir_size(&Self::db_dir(&self.root), &|name| !name.starts_with("LOG"))? + packed)
    }

    /// A large commit's blobs go to a pack file of their own (`packs.rs`).
    fn commit_sink<'a>(&'a self, input_bytes: u64) -> Result<Box<dyn CommitSink + 'a>, StoreError> {
        assert!(self._lock.is_some(), "only the writer commits");
        if input_bytes < packs::PACKED_COMMIT_BYTES || self.pack_index().is_none() {
            return Ok(Box::new(StoreSink(self)));
        }
        Ok(Box::new(packs::PackSink::for_commit(self)?))
    }

    fn shard_sink<'a>(
        &'a self,
        key: &PendingKey,
        shard: u32,
    ) -> Result<Box<dyn ShardSink + 'a>, StoreError> {
        Ok(Box::new(pending::RocksShardSink::new(self, key, shard)?))
    }

    fn shard_manifests(&self, key: &PendingKey) -> Result<Vec<(u32, Vec<u8>)>, StoreError> {
        pending::shard_manifests(&self.root, key)
    }

    fn pending_steps(&self) -> Result<Vec<PendingInfo>, StoreError> {
        pending::pending_steps(&self.root)
    }

    fn adopt_shards(&self, key: &PendingKey) -> Result<(), StoreError> {
        assert!(self._lock.is_some(), "only the writer adopts shards");
        self.adopt_staged_packs(key)
    }

    fn drop_pending(&self, key: &PendingKey) -> Result<(), StoreError> {
        self.remove_pending(key)
    }
}

/// Small table files a column family may hold before a closing writer
/// compacts it. Only small ones count: a large index compacts into several
/// files of the target size, which must not trigger a full rewrite at every
/// close.
const MAX_TABLE_FILES: usize = 8;
const SMALL_TABLE_FILE: usize = 1 << 20;

/// How often a reader retries opening while a writer changes the files.
const OPEN_RETRIES: u32 = 20;

/// Whether `e` is what a reader sees when a concurrent writer deleted a file
/// it was about to open (not damage: the file was replaced, not lost).
fn is_concurrent_change(e: &rocksdb::Error) -> bool {
    let text = e.to_string();
    text.contains("No such file or directory")
}

impl Drop for RocksStore {
    /// A writer flushes everything, then lets RocksDB's background flushes
    /// and compactions finish before closing: one cut short at exit left its partial output blob
    /// file behind, which no later open deleted (seen as `gc` not giving all
    /// space back).
    fn drop(&mut self) {
        if self._lock.is_some() {
            // Records and refs move from the write-ahead log into checksummed
            // table files, so the log holds nothing between writers.
            let _ = self.flush_all();
            let _ = self.compact_crowded();
            let _ = self
                .db
                .wait_for_compact(&rocksdb::WaitForCompactOptions::default());
        }
    }
}

/// Total size of the files under `dir` whose names pass `keep`.
pub fn dir_size(dir: &Path, keep: &dyn Fn(&str) -> bool) -> Result<u64, StoreError> {
    let mut total = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(StoreError::io(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io(dir, e))?;
        let meta = match entry.metadata() {
            Ok(meta) => meta,
            // RocksDB's background compaction deletes table files it has
            // replaced; one listed a moment ago may be gone now, and is no
            // longer part of the store's size.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(StoreError::io(entry.path(), e)),
        };
        if meta.is_dir() {
            total += dir_size(&entry.path(), keep)?;
        } else if keep(&entry.file_name().to_string_lossy()) {
            total += meta.len();
        }
    }
    Ok(total)
}
