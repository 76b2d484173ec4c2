//! The reconstruction cache: for recent commits (branch tips), the decoded
//! bytes of every tensor chunk in one flat file `<repo>/cache/tips/<id>`, in
//! manifest order. Commit reads its delta bases from here instead of decoding
//! the parent's chain, so commit cost does not grow with chain length.
//!
//! It is only a cache: a missing, short or damaged file just means the store
//! decodes the chunk instead. Deleting `cache/` is always safe.
//!
//! Layout: the chunk bytes (`CacheLayout::total` of them), then one entry per
//! written chunk (offset u64 LE, length u64 LE, xxh3-64 of the bytes u64 LE)
//! in offset order, then a footer: entry count u64 LE, the id of the commit
//! whose reconstruction this is (32 bytes) and the magic `ckptvc-cache-v1\0`.
//! A reader uses a file only if the footer names the commit it wants, and a
//! chunk only if its xxh3 matches. The writer hashes the same bytes whose
//! blake3 goes into the commit record as the chunk's raw hash, so the check
//! is the record's, at a tenth of the cost: re-hashing a 4 GiB parent with
//! blake3 took ~8% of a lossy commit's CPU time.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use xxhash_rust::xxh3::xxh3_64;

use crate::format::{Plain, as_bytes, read_range};
use crate::store::{ChunkRef, CommitRecord, ObjectId};

/// Where each tensor's first chunk sits in a cache file, keyed by (file, tensor).
/// Every chunk of a tensor but the last has the tensor's chunk length, so a
/// chunk's offset is `start + index * chunk_len`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CacheLayout {
    tensors: HashMap<(String, String), (u64, u64)>,
    total: u64,
}

impl CacheLayout {
    /// Appends a tensor of `len` bytes cut into chunks of `chunk_len`.
    pub fn push(&mut self, file: &str, tensor: &str, len: u64, chunk_len: u64) {
        // A tensor of one chunk records its own length, as a record's first
        // chunk does, so that equal layouts compare equal (CacheWriter::reuse).
        self.tensors.insert(
            (file.to_string(), tensor.to_string()),
            (self.total, chunk_len.min(len)),
        );
        self.total += len;
    }

    pub fn of_record(record: &CommitRecord) -> CacheLayout {
        let mut layout = CacheLayout::default();
        for file in &record.files {
            for t in file.tensors() {
                let chunk_len = t.chunks.first().map_or(0, |c| c.raw_len);
                layout.push(&file.name, &t.name, t.raw_bytes(), chunk_len);
            }
        }
        layout
    }

    pub fn chunk_offset(&self, file: &str, tensor: &str, index: usize) -> Option<u64> {
        let &(start, chunk_len) = self.tensors.get(&(file.to_string(), tensor.to_string()))?;
        Some(start + index as u64 * chunk_len)
    }

    pub fn total(&self) -> u64 {
        self.total
    }
}

pub fn tips_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("tips")
}

const MAGIC: &[u8; 16] = b"ckptvc-cache-v1\0";
const ENTRY_LEN: u64 = 24;
const FOOTER_LEN: u64 = 8 + 32 + 16;

/// (offset, length, xxh3) of one chunk in a cache file.
type Entry = (u64, u64, u64);

/// A cache file being written during a commit.
pub struct CacheWriter {
    file: File,
    path: PathBuf,
    dir: PathBuf,
    /// Where the chunk bytes end and the entries begin.
    total: u64,
    entries: Mutex<Vec<Entry>>,
}

impl CacheWriter {
    /// A new, empty cache file for `len` bytes of chunks.
    pub fn create(cache_dir: &Path, len: u64) -> std::io::Result<CacheWriter> {
        let dir = tips_dir(cache_dir);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("tmp-{}", std::process::id()));
        let file = File::create(&path)?;
        file.set_len(len)?;
        Ok(CacheWriter::new(file, path, dir, len))
    }

    /// The cache file of `parent` (whose layout the new commit shares),
    /// overwritten in place. Writing a multi-GiB cache into new page-cache
    /// pages costs the kernel an allocation (and, on a machine whose memory
    /// is full of page cache, a reclaim) per page, about 1 s of system time
    /// per GiB here; overwriting pages that are already cached costs a copy.
    ///
    /// Safe because every chunk read from a cache is checked against its
    /// hash and the footer names the commit: a reader of `parent` that meets
    /// an overwritten chunk decodes it from the store instead. Each chunk's
    /// bytes are read (as the delta base) before the same work item
    /// overwrites them. Only for a parent whose cache would be dropped after
    /// the commit anyway (the tip of the branch being committed to and of no
    /// other).
    pub fn reuse(cache_dir: &Path, parent: &ObjectId, layout: &CacheLayout) -> Option<CacheWriter> {
        let dir = tips_dir(cache_dir);
        let path = dir.join(parent.to_hex());
        let file = std::fs::OpenOptions::new().write(true).open(&path).ok()?;
        (file.metadata().ok()?.len() >= layout.total())
            .then(|| CacheWriter::new(file, path, dir, layout.total()))
    }

    fn new(file: File, path: PathBuf, dir: PathBuf, total: u64) -> CacheWriter {
        CacheWriter {
            file,
            path,
            dir,
            total,
            entries: Mutex::default(),
        }
    }

    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(bytes, offset)?;
        let entry = (offset, bytes.len() as u64, xxh3_64(bytes));
        self.entries.lock().expect("lock").push(entry);
        Ok(())
    }

    /// Writes the entries and a footer naming commit `id`, then publishes
    /// the file under that id.
    pub fn finish(self, id: &ObjectId) -> std::io::Result<()> {
        let mut entries = self.entries.into_inner().expect("lock");
        entries.sort_unstable();
        let mut trailer =
            Vec::with_capacity(entries.len() * ENTRY_LEN as usize + FOOTER_LEN as usize);
        for (offset, len, hash) in &entries {
            for field in [offset, len, hash] {
                trailer.extend_from_slice(&field.to_le_bytes());
            }
        }
        trailer.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        trailer.extend_from_slice(&id.0);
        trailer.extend_from_slice(MAGIC);
        self.file.write_all_at(&trailer, self.total)?;
        self.file.set_len(self.total + trailer.len() as u64)?;
        std::fs::rename(&self.path, self.dir.join(id.to_hex()))
    }

    pub fn abandon(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A published cache file.
pub struct CacheReader {
    file: File,
    layout: CacheLayout,
    /// Chunk offset → (length, xxh3).
    entries: HashMap<u64, (u64, u64)>,
}

impl CacheReader {
    /// Opens the cache of `record` (whose id is `id`) if there is a
    /// complete one for it.
    pub fn open(cache_dir: &Path, id: &ObjectId, record: &CommitRecord) -> Option<CacheReader> {
        let file = File::open(tips_dir(cache_dir).join(id.to_hex())).ok()?;
        let layout = CacheLayout::of_record(record);
        let entries = read_entries(&file, layout.total(), id)?;
        Some(CacheReader {
            file,
            layout,
            entries,
        })
    }

    /// A copy of the chunk if the cache has it intact, as bytes or (for f32
    /// tensors) as values. Read with `pread`: a multi-GiB cache never enters
    /// this process's memory.
    pub fn read_chunk<T: Plain>(
        &self,
        file: &str,
        tensor: &str,
        index: usize,
        chunk: &ChunkRef,
    ) -> Option<Vec<T>> {
        let offset = self.layout.chunk_offset(file, tensor, index)?;
        let &(len, hash) = self.entries.get(&offset)?;
        let size = size_of::<T>() as u64;
        if len != chunk.raw_len || !len.is_multiple_of(size) {
            return None;
        }
        let values = read_range::<T>(&self.file, offset, (len / size) as usize).ok()?;
        (xxh3_64(as_bytes(&values)) == hash).then_some(values)
    }
}

/// The entries of a cache file whose chunk bytes end at `total`, if its
/// footer is intact and names commit `id`.
fn read_entries(file: &File, total: u64, id: &ObjectId) -> Option<HashMap<u64, (u64, u64)>> {
    let (len, count) = footer(file, id)?;
    if count
        .checked_mul(ENTRY_LEN)?
        .checked_add(total + FOOTER_LEN)?
        != len
    {
        return None;
    }
    let raw: Vec<u8> = read_range(file, total, (count * ENTRY_LEN) as usize).ok()?;
    let field = |e: &[u8], i: usize| u64::from_le_bytes(e[i * 8..i * 8 + 8].try_into().expect("8"));
    Some(
        raw.chunks_exact(ENTRY_LEN as usize)
            .map(|e| (field(e, 0), (field(e, 1), field(e, 2))))
            .filter(|&(offset, (len, _))| offset.checked_add(len).is_some_and(|end| end <= total))
            .collect(),
    )
}

/// (file length, entry count) of a cache file whose footer is intact and
/// names commit `id`.
fn footer(file: &File, id: &ObjectId) -> Option<(u64, u64)> {
    let len = file.metadata().ok()?.len();
    let footer: Vec<u8> =
        read_range(file, len.checked_sub(FOOTER_LEN)?, FOOTER_LEN as usize).ok()?;
    let count = u64::from_le_bytes(footer[..8].try_into().expect("8 bytes"));
    (footer[8..40] == id.0 && footer[40..] == MAGIC[..]).then_some((len, count))
}

/// Moves the cache of commit `old` to commit `new` (a rewritten commit
/// whose reconstruction is unchanged): the footer is made to name `new`.
/// Best effort, like the cache itself.
pub fn rename(cache_dir: &Path, old: &ObjectId, new: &ObjectId) {
    let dir = tips_dir(cache_dir);
    let (from, to) = (dir.join(old.to_hex()), dir.join(new.to_hex()));
    let renamed = || -> std::io::Result<()> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&from)?;
        let (len, _) = footer(&file, old).ok_or(std::io::ErrorKind::InvalidData)?;
        file.write_all_at(&new.0, len - FOOTER_LEN + 8)?;
        std::fs::rename(&from, &to)
    };
    if renamed().is_err() {
        let _ = std::fs::remove_file(&from);
    }
}

/// Keeps the caches of the current branch tips only (after a commit, a
/// branch deletion, a prune or a gc). Best effort, like the cache itself.
pub fn prune_to_branch_tips(store: &crate::store::Store) {
    if let Ok(branches) = store.branches() {
        let tips: Vec<ObjectId> = branches.into_iter().map(|(_, id)| id).collect();
        prune(&store.cache_dir(), &tips);
    }
}

/// Deletes cache files of commits not in `keep` (branch tips), and stale
/// temporary files of writers that no longer hold the lock.
pub fn prune(cache_dir: &Path, keep: &[ObjectId]) {
    let keep: Vec<String> = keep.iter().map(ObjectId::to_hex).collect();
    let Ok(entries) = std::fs::read_dir(tips_dir(cache_dir)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !keep.contains(&name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
