//! The reconstruction cache: for recent commits (branch tips), the decoded
//! bytes of every tensor chunk in one flat file `<repo>/cache/tips/<id>`, in
//! manifest order. Commit reads its delta bases from here instead of decoding
//! the parent's chain, so commit cost does not grow with chain length.
//!
//! It is only a cache: every chunk read from it is checked against the raw
//! hash in the commit record, and a missing, short or damaged file just means
//! the store decodes the chunk instead. Deleting `cache/` is always safe.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

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

/// A cache file being written during a commit.
pub struct CacheWriter {
    file: File,
    path: PathBuf,
    dir: PathBuf,
}

impl CacheWriter {
    /// A new, empty cache file of `len` bytes.
    pub fn create(cache_dir: &Path, len: u64) -> std::io::Result<CacheWriter> {
        let dir = tips_dir(cache_dir);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("tmp-{}", std::process::id()));
        let file = File::create(&path)?;
        file.set_len(len)?;
        Ok(CacheWriter { file, path, dir })
    }

    /// The cache file of `parent` (whose layout the new commit shares),
    /// overwritten in place. Writing a multi-GiB cache into new page-cache
    /// pages costs the kernel an allocation (and, on a machine whose memory
    /// is full of page cache, a reclaim) per page, about 1 s of system time
    /// per GiB here; overwriting pages that are already cached costs a copy.
    ///
    /// Safe because every chunk read from a cache is checked against its
    /// commit's raw hash: a reader of `parent` that meets an overwritten
    /// chunk decodes it from the store instead. Each chunk's bytes are read
    /// (as the delta base) before the same work item overwrites them. Only
    /// for a parent whose cache would be dropped after the commit anyway
    /// (the tip of the branch being committed to and of no other).
    pub fn reuse(cache_dir: &Path, parent: &ObjectId, layout: &CacheLayout) -> Option<CacheWriter> {
        let dir = tips_dir(cache_dir);
        let path = dir.join(parent.to_hex());
        let file = std::fs::OpenOptions::new().write(true).open(&path).ok()?;
        (file.metadata().ok()?.len() == layout.total()).then_some(CacheWriter { file, path, dir })
    }

    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(bytes, offset)
    }

    /// Publishes the file under the commit's id.
    pub fn finish(self, id: &ObjectId) -> std::io::Result<()> {
        std::fs::rename(&self.path, self.dir.join(id.to_hex()))
    }

    pub fn abandon(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A published cache file, mapped.
pub struct CacheReader {
    file: File,
    layout: CacheLayout,
}

impl CacheReader {
    /// Opens the cache of `record` (whose id is `id`) if there is a complete one.
    pub fn open(cache_dir: &Path, id: &ObjectId, record: &CommitRecord) -> Option<CacheReader> {
        let file = File::open(tips_dir(cache_dir).join(id.to_hex())).ok()?;
        let layout = CacheLayout::of_record(record);
        if file.metadata().ok()?.len() != layout.total() || layout.total() == 0 {
            return None;
        }
        Some(CacheReader { file, layout })
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
        let size = size_of::<T>() as u64;
        if !chunk.raw_len.is_multiple_of(size) {
            return None;
        }
        let values = read_range::<T>(&self.file, offset, (chunk.raw_len / size) as usize).ok()?;
        (ObjectId::of(as_bytes(&values)) == chunk.raw_hash).then_some(values)
    }
}

/// Moves the cache of commit `old` to commit `new` (a rewritten commit
/// whose reconstruction is unchanged). Best effort, like the cache itself.
pub fn rename(cache_dir: &Path, old: &ObjectId, new: &ObjectId) {
    let dir = tips_dir(cache_dir);
    let _ = std::fs::rename(dir.join(old.to_hex()), dir.join(new.to_hex()));
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
