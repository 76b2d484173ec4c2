//! The reconstruction cache: for recent commits (branch tips), the decoded
//! bytes of every tensor chunk in one flat file `<repo>/cache/tips/<id>`, in
//! manifest order. Commit reads its delta bases from here instead of decoding
//! the parent's chain, so commit cost does not grow with chain length.
//!
//! It is only a cache: a missing, short or damaged file just means the store
//! decodes the chunk instead. Deleting `cache/` is always safe.
//!
//! A keyframe's reconstruction is its input, byte for byte, so a keyframe
//! committed from files writes no copy (one from memory has no file to
//! point to, and writes a cache file): a *source map*
//! `cache/tips/<id>.sources` says where each chunk is in the checkpoint
//! files it was committed from (see
//! [`SourceMapWriter`]). While those files are unchanged (training loops
//! keep the last few checkpoints), the next commit reads its bases there
//! instead of decoding the keyframe; a chunk whose xxh3 no longer matches is
//! decoded from blobs, as with a damaged cache.
//!
//! Layout: the chunk bytes (`CacheLayout::total` of them; each tensor of
//! 1 MiB or more starts at a multiple of 4096 bytes, so that its chunks can
//! be read and written around the page cache, see [`super::cache_io`]),
//! then one entry per
//! written chunk (offset u64 LE, length u64 LE, xxh3-64 of the bytes u64 LE)
//! in offset order, then a footer: entry count u64 LE, the id of the commit
//! whose reconstruction this is (32 bytes) and the magic `ckptvc-cache-v2\0`
//! (v1 files, packed without alignment, are not read: a cache).
//! A reader uses a file only if the footer names the commit it wants, and a
//! chunk only if its xxh3 matches. The writer hashes the same bytes whose
//! blake3 goes into the commit record as the chunk's raw hash, so the check
//! is the record's, at a tenth of the cost: re-hashing a 4 GiB parent with
//! blake3 took ~8% of a lossy commit's CPU time.

use super::cache_io::{self, CacheFile};
use crate::repo::Repo;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
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
    /// Appends a tensor of `len` bytes cut into chunks of `chunk_len`, and
    /// returns where it starts: a multiple of [`cache_io::ALIGN`] for a
    /// tensor of [`cache_io::ALIGNED_TENSOR`] bytes or more.
    pub fn push(&mut self, file: &str, tensor: &str, len: u64, chunk_len: u64) -> u64 {
        let start = if len >= cache_io::ALIGNED_TENSOR {
            cache_io::align_up(self.total)
        } else {
            self.total
        };
        // A tensor of one chunk records its own length, as a record's first
        // chunk does, so that equal layouts compare equal (CacheWriter::reuse).
        self.tensors.insert(
            (file.to_string(), tensor.to_string()),
            (start, chunk_len.min(len)),
        );
        self.total = start + len;
        start
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

const MAGIC: &[u8; 16] = b"ckptvc-cache-v2\0";
const ENTRY_LEN: u64 = 24;
const FOOTER_LEN: u64 = 8 + 32 + 16;

/// (offset, length, xxh3) of one chunk in a cache file.
type Entry = (u64, u64, u64);

/// A cache file being written during a commit.
pub struct CacheWriter {
    file: CacheFile,
    path: PathBuf,
    dir: PathBuf,
    /// Where the chunk bytes end and the entries begin.
    total: u64,
    entries: Mutex<Vec<Entry>>,
}

impl CacheWriter {
    /// A new, empty cache file for `len` bytes of chunks: the spare (the
    /// cache of a former tip, see [`prune`]) when there is one, so that its
    /// pages are overwritten rather than allocated ([`CacheWriter::reuse`]
    /// says why that matters); the first commit after a keyframe would
    /// otherwise pay for a fresh file.
    pub fn create(cache_dir: &Path, len: u64) -> std::io::Result<CacheWriter> {
        let dir = tips_dir(cache_dir);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("tmp-{}", std::process::id()));
        // Readable too: a write checks whether its pages are cached.
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true);
        let (file, held) = match std::fs::rename(dir.join(SPARE), &path) {
            // The spare's pages may have gone direct, or been evicted: as
            // for a file overwritten in place, what the page cache still
            // holds of it decides.
            Ok(()) => {
                let file = options.open(&path)?;
                let held = cache_io::resident_share(&file, len);
                (file, held)
            }
            Err(_) => (options.create(true).truncate(true).open(&path)?, 1.0),
        };
        file.set_len(len)?;
        let mut writer = CacheWriter::new(file, path, dir, len);
        writer.file = writer.file.keep_cached_if_it_fits(len, held);
        Ok(writer)
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
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .ok()?;
        if file.metadata().ok()?.len() < layout.total() {
            return None;
        }
        let held = cache_io::resident_share(&file, layout.total());
        let mut writer = CacheWriter::new(file, path, dir, layout.total());
        writer.file = writer.file.keep_cached_if_it_fits(layout.total(), held);
        Some(writer)
    }

    fn new(file: File, path: PathBuf, dir: PathBuf, total: u64) -> CacheWriter {
        CacheWriter {
            file: CacheFile::new(file, &path, true),
            path,
            dir,
            total,
            entries: Mutex::default(),
        }
    }

    pub fn write_at(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_values(offset, bytes)?;
        let entry = (offset, bytes.len() as u64, xxh3_64(bytes));
        self.entries.lock().expect("lock").push(entry);
        Ok(())
    }

    /// Writes the entries and a footer naming commit `id`, then publishes
    /// the file under that id.
    pub fn finish(self, id: &ObjectId) -> std::io::Result<()> {
        self.file.flush()?;
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
        self.file.file().write_all_at(&trailer, self.total)?;
        self.file
            .file()
            .set_len(self.total + trailer.len() as u64)?;
        std::fs::rename(&self.path, self.dir.join(id.to_hex()))
    }

    pub fn abandon(self) {
        let _ = self.file.flush();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Version of the [`SourceMap`] record. 2: offsets in the aligned cache
/// layout (a version-1 map's offsets name other chunks there, so it is not
/// read).
const SOURCE_MAP_VERSION: u8 = 2;

/// The file name of commit `id`'s source map.
fn source_map_path(cache_dir: &Path, id: &ObjectId) -> PathBuf {
    tips_dir(cache_dir).join(format!("{}.sources", id.to_hex()))
}

/// Where a keyframe's chunks are in its input files (postcard, versioned).
#[derive(Debug, Serialize, Deserialize)]
struct SourceMap {
    version: u8,
    /// The commit whose reconstruction this is.
    commit: [u8; 32],
    /// Absolute paths of the input files.
    files: Vec<PathBuf>,
    chunks: Vec<SourceChunk>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SourceChunk {
    /// The chunk's offset in the cache layout, which identifies it.
    cache_offset: u64,
    len: u64,
    xxh3: u64,
    /// Index into `files`, and the chunk's offset in that file.
    file: u32,
    file_offset: u64,
}

/// The source map of a keyframe commit, being collected: one entry per
/// tensor chunk, with the xxh3 of the bytes whose blake3 went into the
/// record (the same check a cache file gives). Costs an xxh3 of the input
/// instead of a second multi-GiB file through the page cache.
pub struct SourceMapWriter {
    cache_dir: PathBuf,
    /// Absolute path of each input file, by file index.
    files: Vec<PathBuf>,
    chunks: Mutex<Vec<SourceChunk>>,
}

impl SourceMapWriter {
    /// A writer for input files at `paths` (in file-index order).
    pub fn new(cache_dir: &Path, paths: &[&Path]) -> std::io::Result<SourceMapWriter> {
        let files = paths
            .iter()
            .map(std::fs::canonicalize)
            .collect::<std::io::Result<_>>()?;
        Ok(SourceMapWriter {
            cache_dir: cache_dir.to_path_buf(),
            files,
            chunks: Mutex::default(),
        })
    }

    /// Notes that the chunk at `cache_offset` is `bytes`, found at
    /// `file_offset` of input file `file_index`.
    pub fn note(&self, cache_offset: u64, bytes: &[u8], file_index: usize, file_offset: u64) {
        let chunk = SourceChunk {
            cache_offset,
            len: bytes.len() as u64,
            xxh3: xxh3_64(bytes),
            file: file_index as u32,
            file_offset,
        };
        self.chunks.lock().expect("lock").push(chunk);
    }

    /// Publishes the map under commit `id` (write to a temporary name,
    /// rename: a reader never sees half a map).
    pub fn finish(self, id: &ObjectId) -> std::io::Result<()> {
        let map = SourceMap {
            version: SOURCE_MAP_VERSION,
            commit: id.0,
            files: self.files,
            chunks: self.chunks.into_inner().expect("lock"),
        };
        write_source_map(&self.cache_dir, id, &map)
    }
}

fn write_source_map(cache_dir: &Path, id: &ObjectId, map: &SourceMap) -> std::io::Result<()> {
    let dir = tips_dir(cache_dir);
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!("tmp-{}.sources", std::process::id()));
    let bytes = postcard::to_stdvec(map).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, source_map_path(cache_dir, id))
}

fn read_source_map(cache_dir: &Path, id: &ObjectId) -> Option<SourceMap> {
    let bytes = std::fs::read(source_map_path(cache_dir, id)).ok()?;
    let map: SourceMap = postcard::from_bytes(&bytes).ok()?;
    (map.version == SOURCE_MAP_VERSION && map.commit == id.0).then_some(map)
}

/// Where a reader finds chunk bytes.
enum Backing {
    /// A cache file of its own: chunk offset → (length, xxh3).
    Copy {
        file: CacheFile,
        entries: HashMap<u64, (u64, u64)>,
    },
    /// The input files of a keyframe: chunk offset → (file, offset in it,
    /// length, xxh3). A file that cannot be opened has no chunks.
    Sources {
        files: Vec<Option<File>>,
        chunks: HashMap<u64, SourceChunk>,
    },
}

/// A published cache file or source map.
pub struct CacheReader {
    layout: CacheLayout,
    backing: Backing,
}

impl CacheReader {
    /// Opens the cache of `record` (whose id is `id`) if there is a
    /// complete one for it.
    pub fn open(cache_dir: &Path, id: &ObjectId, record: &CommitRecord) -> Option<CacheReader> {
        let layout = CacheLayout::of_record(record);
        let path = tips_dir(cache_dir).join(id.to_hex());
        let backing = match File::open(&path) {
            Ok(file) => Backing::Copy {
                entries: read_entries(&file, layout.total(), id)?,
                file: CacheFile::new(file, &path, false),
            },
            Err(_) => {
                let map = read_source_map(cache_dir, id)?;
                Backing::Sources {
                    files: map.files.iter().map(|p| File::open(p).ok()).collect(),
                    chunks: map
                        .chunks
                        .into_iter()
                        .map(|c| (c.cache_offset, c))
                        .collect(),
                }
            }
        };
        Some(CacheReader { layout, backing })
    }

    /// A copy of the chunk if the cache has it intact, as bytes or (for f32
    /// tensors) as values. Read with `pread` (around the page cache where
    /// it does not hold the file, see [`cache_io`]): a multi-GiB cache never
    /// enters this process's memory.
    pub fn read_chunk<T: Plain>(
        &self,
        file_name: &str,
        tensor: &str,
        index: usize,
        chunk: &ChunkRef,
    ) -> Option<Vec<T>> {
        let offset = self.layout.chunk_offset(file_name, tensor, index)?;
        let size = size_of::<T>() as u64;
        let count = |len: u64| {
            (len == chunk.raw_len && len.is_multiple_of(size)).then_some((len / size) as usize)
        };
        let (values, hash) = match &self.backing {
            Backing::Copy { file, entries } => {
                let &(len, hash) = entries.get(&offset)?;
                let next = self.layout.chunk_offset(file_name, tensor, index + 1);
                let next = next.and_then(|at| entries.get(&at).map(|&(len, _)| (at, len)));
                (file.read_values::<T>(offset, count(len)?, next).ok()?, hash)
            }
            Backing::Sources { files, chunks } => {
                let c = chunks.get(&offset)?;
                let file = files.get(c.file as usize)?.as_ref()?;
                (
                    read_range::<T>(file, c.file_offset, count(c.len)?).ok()?,
                    c.xxh3,
                )
            }
        };
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
    if let Some(mut map) = read_source_map(cache_dir, old) {
        map.commit = new.0;
        let _ = write_source_map(cache_dir, new, &map);
    }
    let _ = std::fs::remove_file(source_map_path(cache_dir, old));
}

/// Keeps the caches of the current branch tips only (after a commit, a
/// branch deletion, a prune or a gc). Best effort, like the cache itself.
pub fn prune_to_branch_tips(store: &Repo) {
    if let Ok(branches) = store.branches() {
        let tips: Vec<ObjectId> = branches.into_iter().map(|(_, id)| id).collect();
        prune(&store.cache_dir(), &tips);
    }
}

/// The name under which one former tip's cache file is kept for the next
/// [`CacheWriter::create`].
const SPARE: &str = "spare";

/// Deletes cache files and source maps of commits not in `keep` (branch
/// tips), and stale temporary files of writers that no longer hold the
/// lock; one dropped cache file is kept as the spare, if there is none.
pub fn prune(cache_dir: &Path, keep: &[ObjectId]) {
    let keep: Vec<String> = keep.iter().map(ObjectId::to_hex).collect();
    let dir = tips_dir(cache_dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    let mut have_spare = dir.join(SPARE).is_file();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let commit = name.strip_suffix(".sources").unwrap_or(&name);
        if name == SPARE || keep.iter().any(|k| k == commit) {
            continue;
        }
        let is_cache_file = commit == name && !name.starts_with("tmp-");
        if is_cache_file && !have_spare && std::fs::rename(entry.path(), dir.join(SPARE)).is_ok() {
            have_spare = true;
        } else {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::cache_io::{ALIGN, ALIGNED_TENSOR};

    /// Tensors of 1 MiB or more start aligned (their chunks too, at the
    /// default chunk size); smaller ones are packed after whatever precedes.
    #[test]
    fn large_tensors_start_aligned_and_small_ones_are_packed() {
        let mut layout = CacheLayout::default();
        let chunk = 4 << 20;
        assert_eq!(layout.push("a", "bias", 100, chunk), 0);
        assert_eq!(layout.push("a", "w", 3 * ALIGNED_TENSOR + 8, chunk), ALIGN);
        let after_w = ALIGN + 3 * ALIGNED_TENSOR + 8;
        assert_eq!(layout.push("a", "norm", 12, chunk), after_w);
        assert_eq!(
            layout.push("b", "m", 9 << 20, chunk),
            after_w.div_ceil(ALIGN) * ALIGN
        );
        let m = layout.chunk_offset("b", "m", 0).unwrap();
        for index in 0..3 {
            let at = layout.chunk_offset("b", "m", index).unwrap();
            assert_eq!(at, m + index as u64 * chunk);
            assert!(at.is_multiple_of(ALIGN));
        }
        assert_eq!(layout.total(), m + (9 << 20));
    }
}
