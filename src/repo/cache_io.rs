//! The reconstruction cache's file I/O: through the page cache where it
//! holds the file, around it (`O_DIRECT`) where it does not.
//!
//! A residual commit reads its parent's reconstruction (W, m and v: three
//! times the model's fp32 bytes) and writes its own over it. While those
//! pages are cached, buffered I/O costs one copy. Once they are not (the
//! training process's memory pushed them out, or the checkpoint is larger
//! than the machine's memory), every 4 KiB read or written allocates a
//! page-cache page: on the development machine, a VM, that cost 2.5–3 s of
//! system time per GB read and as much per GB written, more than the
//! commit's own coding work, while `O_DIRECT` moved the same bytes at
//! 1.1–1.3 GB/s for 0.05–0.3 s of system time per GB (docs/benchmarks.md,
//! "A cold reconstruction cache"). So:
//!
//! - a read takes the leading pages the page cache has (`mincore` says
//!   which) through it and reads the rest from the disk with `O_DIRECT`;
//! - a write goes through the page cache when the first page of its range
//!   is cached (overwriting cached pages is a copy) and with `O_DIRECT`
//!   when it is not, unless the whole file is to stay cached
//!   ([`CacheFile::keep_cached_if_it_fits`]: it fits twice in the machine's
//!   available memory, and is new or was mostly still cached, and new
//!   page-cache pages do not prove too dear, [`PageCost`]). Direct writes
//!   are done by a thread of their own, a few MiB behind.
//!
//! `O_DIRECT` needs the file offset, the length and the memory to be
//! aligned to the device's blocks: only the [`ALIGN`]-aligned middle of a
//! range goes direct, through a per-thread aligned buffer; an unaligned head
//! or tail (under 4 KiB) goes through the page cache. The cache layout
//! starts every tensor of [`ALIGNED_TENSOR`] bytes or more at a multiple of
//! `ALIGN`, so its chunks need neither. Where the file system refuses
//! `O_DIRECT` (tmpfs before Linux 6.6) or a direct call fails, buffered
//! I/O serves instead: the bytes are the same either way.
//! `CKPTVC_DIRECT_IO=off` turns the direct path off (for A/B
//! measurements).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::format::direct::{AlignedBuf, BufPool, DIRECT_ALIGN, DIRECT_BUFFER, WriteBehind};
use crate::format::plain::filled_vec;
use crate::format::{Plain, as_bytes, pread_into};

/// Alignment of direct I/O: file offsets, lengths and buffers. 4 KiB
/// covers the logical block size of the devices in use (512 or 4096).
pub const ALIGN: u64 = DIRECT_ALIGN as u64;

/// Tensors at least this large start at an [`ALIGN`]-aligned offset in a
/// cache file; smaller ones are packed (at most 0.4% of padding).
pub const ALIGNED_TENSOR: u64 = 1 << 20;

/// Rounds `n` up to a multiple of [`ALIGN`].
pub fn align_up(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

fn align_down(n: u64) -> u64 {
    n / ALIGN * ALIGN
}

/// Bytes moved each way, for tests and measurements.
#[derive(Debug, Default)]
pub struct IoCounts {
    pub direct_read: AtomicU64,
    pub direct_written: AtomicU64,
    /// Bytes served from chunks read ahead (counted in `direct_read` too).
    pub read_ahead: AtomicU64,
}

/// A cache file opened for buffered and, where the file system allows,
/// direct I/O.
pub struct CacheFile {
    buffered: File,
    direct: Option<File>,
    /// For a file being written: the thread that does its direct writes.
    behind: Option<WriteBehind>,
    /// For a file being read: the thread that reads chunks ahead.
    ahead: Option<ReadAhead>,
    /// Write through the page cache even where it does not hold the file
    /// (see [`CacheFile::keep_cached_if_it_fits`]); cleared for good when
    /// [`PageCost`] finds new page-cache pages too dear.
    keep_cached: AtomicBool,
    page_cost: PageCost,
    pub counts: IoCounts,
}

/// What the writes of a file kept in the page cache cost the kernel, in
/// windows of [`PageCost::WINDOW`] bytes: bytes written and the writing
/// threads' system time.
///
/// A write into pages the page cache lacks allocates a page per 4 KiB. On
/// most machines that costs about 0.3 s of system time per GB, and a write
/// over cached pages less; on the development machine, a VM whose guest
/// pages fault on the host again, 2.5–5 s, and a keyframe's new 3.45 GB
/// cache took 9 s longer through the page cache than around it
/// (docs/benchmarks.md, "Eighth round"). How dear depends on the pages: a
/// first 64 MiB written cheaply once told nothing of the next 3 GB, which
/// then cost 14 s of system time (benchmarks.md, "Sharded commits from
/// memory"). So every window is judged: one that cost more than
/// [`PageCost::DEAR_NS_PER_BYTE`] sends the rest of the file direct.
#[derive(Debug, Default)]
struct PageCost {
    bytes: AtomicU64,
    system_ns: AtomicU64,
}

impl PageCost {
    /// Bytes written between two judgements.
    const WINDOW: u64 = 64 << 20;
    /// System time per byte (1 s per GB) above which pages are too dear:
    /// about three times what a kernel on bare metal spends on new ones.
    const DEAR_NS_PER_BYTE: u64 = 1;

    /// Counts a write of `bytes` that took `system_ns`; whether the window
    /// it completed proved the pages too dear.
    fn add(&self, bytes: u64, system_ns: u64) -> bool {
        let total = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let ns = self.system_ns.fetch_add(system_ns, Ordering::Relaxed) + system_ns;
        if total < Self::WINDOW {
            return false;
        }
        // A new window; a write racing with this reset lands in either.
        self.bytes.fetch_sub(total, Ordering::Relaxed);
        self.system_ns.fetch_sub(ns, Ordering::Relaxed);
        ns > total * Self::DEAR_NS_PER_BYTE
    }
}

/// This thread's system time so far, in nanoseconds.
#[cfg(target_os = "linux")]
fn thread_system_ns() -> Option<u64> {
    let mut usage = MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct it is given; checked before use.
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) != 0 {
            return None;
        }
        usage.assume_init()
    };
    let time = usage.ru_stime;
    Some(time.tv_sec as u64 * 1_000_000_000 + time.tv_usec as u64 * 1000)
}

#[cfg(not(target_os = "linux"))]
fn thread_system_ns() -> Option<u64> {
    None
}

impl CacheFile {
    /// Wraps `file` (opened at `path`), opening a second descriptor with
    /// `O_DIRECT` beside it unless the file system or the environment
    /// refuses.
    pub fn new(file: File, path: &Path, write: bool) -> CacheFile {
        let direct = open_direct(path, write);
        let behind = direct
            .as_ref()
            .filter(|_| write)
            .and_then(|d| Some((d.try_clone().ok()?, file.try_clone().ok()?)))
            .and_then(|(d, b)| WriteBehind::start(d, b).ok());
        let ahead = direct
            .as_ref()
            .filter(|_| !write)
            .and_then(|d| d.try_clone().ok())
            .and_then(|d| ReadAhead::start(d).ok());
        CacheFile {
            buffered: file,
            direct,
            behind,
            ahead,
            keep_cached: AtomicBool::new(false),
            page_cost: PageCost::default(),
            counts: IoCounts::default(),
        }
    }

    /// Writes go through the page cache even to pages it does not hold, so
    /// that the next commit finds them there: when the machine has twice
    /// the file's `len` bytes available and the page cache held at least
    /// `held` of what the file had (1 for a new file). Reading a cached
    /// parent is a copy, and a residual commit that read its parent from
    /// the disk, even direct and read ahead, took 1.2× as long. A file the
    /// page cache mostly lost since the last commit (something else needed
    /// the memory), or one that does not fit so, is written direct rather
    /// than pushing the rest of the page cache out for pages that would not
    /// stay.
    ///
    /// Unless new pages prove too dear ([`PageCost`]): then the rest of the
    /// file goes direct.
    pub fn keep_cached_if_it_fits(self, len: u64, held: f64) -> CacheFile {
        let fits = memory_available().is_some_and(|m| m / 2 >= len);
        self.keep_cached
            .store(fits && held >= KEEP_CACHED_SHARE, Ordering::Relaxed);
        self
    }

    /// Waits for the direct writes queued so far; the first that failed
    /// is the error.
    pub fn flush(&self) -> io::Result<()> {
        self.behind.as_ref().map_or(Ok(()), WriteBehind::finish)
    }

    /// The buffered descriptor (for the file's metadata, its trailer and
    /// its length).
    pub fn file(&self) -> &File {
        &self.buffered
    }

    /// Whether the direct path is available.
    #[cfg(test)]
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// `count` elements of `T` at byte `offset`. With `next`, the (offset,
    /// length) of the chunk likely asked for next (the following chunk of
    /// the same tensor): if this one had to come from the disk and that one
    /// is not in the page cache either, it is read ahead (see
    /// [`ReadAhead`]).
    pub fn read_values<T: Plain>(
        &self,
        offset: u64,
        count: usize,
        next: Option<(u64, u64)>,
    ) -> io::Result<Vec<T>> {
        // SAFETY: `read_into` fills all of `bytes` or fails.
        let (out, went_direct) =
            unsafe { filled_vec::<T, _>(count, |bytes| self.read_into(offset, bytes))? };
        // Only a chunk the page cache lacks is worth reading ahead: one it
        // holds is a copy away, and reading it direct would go to the disk.
        if went_direct
            && let (Some(ahead), Some((at, len))) = (&self.ahead, next)
            && resident_prefix(&self.buffered, at, ALIGN) == 0
        {
            ahead.schedule(at, len);
        }
        Ok(out)
    }

    /// Fills `out` from byte `offset`: its whole blocks from what was read
    /// ahead, or (after the leading pages the page cache has) direct, and
    /// the rest buffered. True if any of it came from the disk direct.
    fn read_into(&self, offset: u64, out: &mut [MaybeUninit<u8>]) -> io::Result<bool> {
        let (done, direct_bytes) = match self.direct_for(offset, out.len() as u64) {
            Some(direct) => self.read_blocks(direct, offset, out)?,
            None => (0, 0),
        };
        pread_into(&self.buffered, offset + done, &mut out[done as usize..])?;
        self.counts
            .direct_read
            .fetch_add(direct_bytes, Ordering::Relaxed);
        Ok(direct_bytes > 0)
    }

    /// The whole blocks at the start of `out` (an aligned `offset`):
    /// (bytes filled, bytes of them that came direct or read ahead).
    fn read_blocks(
        &self,
        direct: &File,
        offset: u64,
        out: &mut [MaybeUninit<u8>],
    ) -> io::Result<(u64, u64)> {
        let len = out.len() as u64;
        let end = align_down(len);
        if let Some(ahead) = &self.ahead
            && let Some(buf) = ahead.take(offset, end)
        {
            copy_into(&mut out[..end as usize], &buf.as_slice()[..end as usize]);
            ahead.pool.put(buf);
            self.counts.read_ahead.fetch_add(end, Ordering::Relaxed);
            return Ok((end, end));
        }
        let start = align_up(resident_prefix(&self.buffered, offset, len));
        if start >= end {
            return Ok((0, 0));
        }
        pread_into(&self.buffered, offset, &mut out[..start as usize])?;
        match read_direct(
            direct,
            offset + start,
            &mut out[start as usize..end as usize],
        ) {
            Ok(()) => Ok((end, end - start)),
            // Buffered from `start` on instead.
            Err(_) => Ok((start, 0)),
        }
    }

    /// Writes `values` at byte `offset`: through the page cache if the
    /// range's first page is cached, else its aligned middle direct.
    pub fn write_values<T: Plain>(&self, offset: u64, values: &[T]) -> io::Result<()> {
        let bytes = as_bytes(values);
        let len = bytes.len() as u64;
        // Direct writes go through the write-behind thread (a writer whose
        // thread could not start writes buffered).
        if self.keep_cached.load(Ordering::Relaxed) {
            return self.write_kept_cached(offset, bytes);
        }
        // Whether the range's pages are cached matters only for a file
        // that is not kept cached (`mincore` is three system calls).
        let uncached = self.direct_for(offset, len).is_some()
            && resident_prefix(&self.buffered, offset, ALIGN) == 0;
        let behind = self.behind.as_ref().filter(|_| uncached);
        let mut done = 0;
        if let Some(behind) = behind {
            let end = align_down(len);
            if behind.queue(offset, &bytes[..end as usize]).is_ok() {
                self.counts.direct_written.fetch_add(end, Ordering::Relaxed);
                done = end;
            }
        }
        pwrite_all(&self.buffered, offset + done, &bytes[done as usize..])
    }

    /// A write through the page cache, timed: the [`PageCost`] of a window
    /// of such writes may send the rest of the file direct.
    fn write_kept_cached(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let before = thread_system_ns();
        pwrite_all(&self.buffered, offset, bytes)?;
        if let (Some(before), Some(after)) = (before, thread_system_ns())
            && self
                .page_cost
                .add(bytes.len() as u64, after.saturating_sub(before))
        {
            self.keep_cached.store(false, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The direct descriptor, if a range at `offset` of `len` bytes can use
    /// it: an aligned start and at least one whole block.
    fn direct_for(&self, offset: u64, len: u64) -> Option<&File> {
        self.direct
            .as_ref()
            .filter(|_| offset.is_multiple_of(ALIGN) && len >= ALIGN)
    }
}

/// Of a cache file being written over, the share of its pages the page
/// cache must still hold for the new one to go through it: most of it
/// survived the interval between two commits, so it will likely again.
const KEEP_CACHED_SHARE: f64 = 0.5;

/// `MemAvailable` of /proc/meminfo: what the kernel can hand out without
/// swapping (free memory and page cache it can drop), in bytes.
fn memory_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(target_os = "linux")]
fn open_direct(path: &Path, write: bool) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    if !crate::format::plain::direct_io_allowed() {
        return None;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path, _write: bool) -> Option<File> {
    None
}

/// How many bytes of the range at `offset` of `len` bytes, from its start,
/// are in the page cache. (`preadv2` with `RWF_NOWAIT` would answer too, but
/// on a miss it starts the readahead it declines to wait for: the pages then
/// come through the page cache after all, and twice.)
fn resident_prefix(file: &File, offset: u64, len: u64) -> u64 {
    let start = align_down(offset);
    let Some(pages) = resident_pages(file, start, align_up(offset + len) - start) else {
        return 0;
    };
    let resident = pages.iter().take_while(|&&p| p & 1 == 1).count() as u64;
    (start + resident * ALIGN).saturating_sub(offset).min(len)
}

/// The share of the first `len` bytes of `file` that is in the page cache,
/// looked at 1 GiB at a time.
pub fn resident_share(file: &File, len: u64) -> f64 {
    const PIECE: u64 = 1 << 30;
    let (mut resident, mut pages) = (0u64, 0u64);
    for start in (0..align_up(len)).step_by(PIECE as usize) {
        let piece = PIECE.min(align_up(len) - start);
        let Some(flags) = resident_pages(file, start, piece) else {
            return 0.0;
        };
        resident += flags.iter().filter(|&&p| p & 1 == 1).count() as u64;
        pages += flags.len() as u64;
    }
    if pages == 0 {
        return 0.0;
    }
    resident as f64 / pages as f64
}

/// `mincore`'s flags for the pages of the aligned range at `start` of
/// `len` bytes (bit 0 set: in the page cache), through a mapping of the
/// range, which touches no page.
#[cfg(target_os = "linux")]
fn resident_pages(file: &File, start: u64, len: u64) -> Option<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let map_len = usize::try_from(len).ok().filter(|&l| l > 0)?;
    let map_at = libc::off_t::try_from(start).ok()?;
    // SAFETY: a fresh shared read-only mapping of the file that is never
    // dereferenced (pages past the end of the file would fault), only
    // passed to mincore and unmapped.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            map_at,
        );
        if addr == libc::MAP_FAILED {
            return None;
        }
        let mut pages = vec![0u8; map_len.div_ceil(ALIGN as usize)];
        let ok = libc::mincore(addr, map_len, pages.as_mut_ptr()) == 0;
        libc::munmap(addr, map_len);
        ok.then_some(pages)
    }
}

#[cfg(not(target_os = "linux"))]
fn resident_pages(_file: &File, _start: u64, _len: u64) -> Option<Vec<u8>> {
    None
}

fn pwrite_all(file: &File, offset: u64, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(bytes, offset)
}

/// Copies `src` into `out` (the same length).
fn copy_into(out: &mut [MaybeUninit<u8>], src: &[u8]) {
    assert_eq!(out.len(), src.len());
    // SAFETY: both ranges are `src.len()` bytes, and a `&mut` cannot
    // overlap a `&`.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), out.as_mut_ptr().cast(), src.len()) };
}

/// Reads `len` bytes (a multiple of [`ALIGN`]) at an aligned `offset`
/// into `buf` with `O_DIRECT`. A direct read ends short only at the end of
/// the file, which a chunk of a cache file never reaches: an error here,
/// for the caller to fall back from.
fn read_exact_direct(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let n = file.read_at(buf, offset)?;
    if n != buf.len() {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Reads `out` (a multiple of [`ALIGN`] long, from an aligned `offset`)
/// with `O_DIRECT`, in pieces of the thread's aligned buffer.
fn read_direct(file: &File, offset: u64, out: &mut [MaybeUninit<u8>]) -> io::Result<()> {
    with_scratch(|scratch| {
        let mut done = 0;
        while done < out.len() {
            let piece = scratch.len().min(out.len() - done);
            read_exact_direct(file, offset + done as u64, &mut scratch[..piece])?;
            copy_into(&mut out[done..done + piece], &scratch[..piece]);
            done += piece;
        }
        Ok(())
    })
}

/// Chunks read before they are asked for, by a thread of their own, so that
/// the encoding threads code one chunk while the disk reads the next. A
/// commit reads each tensor's chunks in order (each encoding thread works
/// through a run of consecutive chunks), so after a chunk that had to come
/// from the disk the next one of the same tensor is read ahead. At most
/// [`AHEAD_BUFFERS`] chunks wait; a chunk asked for before its read ahead
/// was even scheduled is not read ahead afterwards.
struct ReadAhead {
    jobs: Option<std::sync::mpsc::SyncSender<(u64, AlignedBuf)>>,
    thread: Option<std::thread::JoinHandle<()>>,
    state: Arc<AheadState>,
    pool: Arc<BufPool>,
}

/// Chunks read ahead or waiting to be: at most 64 MiB.
const AHEAD_BUFFERS: usize = 16;

#[derive(Default)]
struct AheadState {
    slots: Mutex<AheadSlots>,
    ready: Condvar,
}

#[derive(Default)]
struct AheadSlots {
    /// By file offset.
    chunks: HashMap<u64, Ahead>,
    /// Offsets already asked for: not worth reading ahead any more.
    asked: HashSet<u64>,
}

enum Ahead {
    /// Being read: this many bytes.
    Pending(u64),
    Ready(AlignedBuf, u64),
    Failed,
}

impl ReadAhead {
    fn start(file: File) -> io::Result<ReadAhead> {
        let (jobs, queue) = std::sync::mpsc::sync_channel::<(u64, AlignedBuf)>(AHEAD_BUFFERS);
        let state = Arc::new(AheadState::default());
        let pool = Arc::new(BufPool::new(AHEAD_BUFFERS));
        let (thread_state, thread_pool) = (state.clone(), pool.clone());
        let thread = std::thread::Builder::new()
            .name("ckptvc-cache-reader".into())
            .spawn(move || {
                for (offset, buf) in queue {
                    thread_state.fill(&file, offset, buf, &thread_pool);
                }
            })?;
        Ok(ReadAhead {
            jobs: Some(jobs),
            thread: Some(thread),
            state,
            pool,
        })
    }

    /// Reads the whole blocks of the `len` bytes at `offset` ahead, if a
    /// buffer is free and they were neither asked for nor scheduled yet.
    fn schedule(&self, offset: u64, len: u64) {
        let end = align_down(len);
        if end == 0 || end > SCRATCH as u64 || !offset.is_multiple_of(ALIGN) {
            return;
        }
        let mut slots = self.state.slots.lock().expect("lock");
        if slots.asked.contains(&offset) || slots.chunks.contains_key(&offset) {
            return;
        }
        let (Some(jobs), Some(buf)) = (&self.jobs, self.pool.try_take()) else {
            return;
        };
        slots.chunks.insert(offset, Ahead::Pending(end));
        if let Err(e) = jobs.try_send((offset, buf)) {
            slots.chunks.remove(&offset);
            let (std::sync::mpsc::TrySendError::Full((_, buf))
            | std::sync::mpsc::TrySendError::Disconnected((_, buf))) = e;
            self.pool.put(buf);
        }
    }

    /// The `end` bytes read ahead at `offset`, waiting for a read in
    /// progress; `None` if there is none (or it failed).
    fn take(&self, offset: u64, end: u64) -> Option<AlignedBuf> {
        let mut slots = self.state.slots.lock().expect("lock");
        slots.asked.insert(offset);
        loop {
            match slots.chunks.remove(&offset)? {
                Ahead::Pending(len) => {
                    slots.chunks.insert(offset, Ahead::Pending(len));
                    slots = self.state.ready.wait(slots).expect("lock");
                }
                Ahead::Ready(buf, len) if len == end => return Some(buf),
                Ahead::Ready(buf, _) => {
                    self.pool.put(buf);
                    return None;
                }
                Ahead::Failed => return None,
            }
        }
    }
}

impl AheadState {
    /// The reading thread's part: reads a scheduled chunk into `buf`.
    fn fill(&self, file: &File, offset: u64, mut buf: AlignedBuf, pool: &BufPool) {
        let pending = self
            .slots
            .lock()
            .expect("lock")
            .chunks
            .get(&offset)
            .and_then(|a| match a {
                Ahead::Pending(len) => Some(*len),
                _ => None,
            });
        let Some(len) = pending else {
            pool.put(buf);
            return;
        };
        let slot = match read_exact_direct(file, offset, &mut buf.as_mut_slice()[..len as usize]) {
            Ok(()) => Ahead::Ready(buf, len),
            Err(_) => {
                pool.put(buf);
                Ahead::Failed
            }
        };
        self.slots.lock().expect("lock").chunks.insert(offset, slot);
        self.ready.notify_all();
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Size of each thread's aligned buffer: one 4 MiB chunk (the default
/// chunk size) per call.
const SCRATCH: usize = DIRECT_BUFFER;

thread_local! {
    static SCRATCH_BUF: RefCell<Option<AlignedBuf>> = const { RefCell::new(None) };
}

fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> io::Result<R>) -> io::Result<R> {
    SCRATCH_BUF.with(|cell| {
        let mut slot = cell.borrow_mut();
        let buf = match &mut *slot {
            Some(buf) => buf,
            None => slot.insert(AlignedBuf::new(SCRATCH)?),
        };
        f(buf.as_mut_slice())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes back and drops `path`'s pages from the page cache.
    fn evict(path: &Path) {
        use std::os::fd::AsRawFd;
        let file = File::open(path).unwrap();
        file.sync_all().unwrap();
        // SAFETY: a valid descriptor; the call only advises the kernel.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32).map(|i| (i ^ seed) as f32 * 0.5).collect()
    }

    fn open(path: &Path) -> CacheFile {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap();
        CacheFile::new(file, path, true)
    }

    /// Ranges of every alignment read back what was written, whether the
    /// pages are cached or not, and a cold file is read and written direct
    /// where the file system allows it.
    #[test]
    fn reads_and_writes_round_trip_cached_and_cold() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        let file = open(&path);
        file.file().set_len(8 << 20).unwrap();
        // (offset, element count): aligned and whole blocks, aligned with
        // a tail, unaligned, shorter than a block, longer than the scratch.
        let ranges = [
            (0u64, 1024usize),
            (8192, 5000),
            (40_003, 777),
            (65_536, 10),
            (2 << 20, (SCRATCH / 4) + 4097),
        ];
        for (i, &(offset, n)) in ranges.iter().enumerate() {
            file.write_values(offset, &values(n, i as u32)).unwrap();
        }
        file.flush().unwrap();
        for (i, &(offset, n)) in ranges.iter().enumerate() {
            assert_eq!(
                file.read_values::<f32>(offset, n, None).unwrap(),
                values(n, i as u32)
            );
        }
        evict(&path);
        let cold = open(&path);
        for (i, &(offset, n)) in ranges.iter().enumerate() {
            assert_eq!(
                cold.read_values::<f32>(offset, n, None).unwrap(),
                values(n, i as u32)
            );
        }
        if cold.is_direct() {
            assert!(cold.counts.direct_read.load(Ordering::Relaxed) > SCRATCH as u64);
        }
        // Written over while cold: the aligned ranges go direct.
        evict(&path);
        let cold = open(&path);
        for (i, &(offset, n)) in ranges.iter().enumerate() {
            cold.write_values(offset, &values(n, 100 + i as u32))
                .unwrap();
        }
        cold.flush().unwrap();
        if cold.is_direct() {
            assert!(cold.counts.direct_written.load(Ordering::Relaxed) > SCRATCH as u64);
        }
        for (i, &(offset, n)) in ranges.iter().enumerate() {
            assert_eq!(
                cold.read_values::<f32>(offset, n, None).unwrap(),
                values(n, 100 + i as u32)
            );
        }
    }

    /// A cached file is read and overwritten through the page cache.
    #[test]
    fn cached_ranges_stay_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        let file = open(&path);
        let data = values(1 << 20, 7);
        file.write_values(0, &data).unwrap();
        file.flush().unwrap();
        // A buffered read puts the pages in the page cache.
        assert_eq!(std::fs::read(&path).unwrap(), as_bytes(&data));
        let warm = open(&path);
        assert_eq!(warm.read_values::<f32>(0, data.len(), None).unwrap(), data);
        warm.write_values(0, &values(1 << 20, 8)).unwrap();
        warm.flush().unwrap();
        assert_eq!(warm.counts.direct_read.load(Ordering::Relaxed), 0);
        assert_eq!(warm.counts.direct_written.load(Ordering::Relaxed), 0);
        assert_eq!(
            warm.read_values::<f32>(0, 1 << 20, None).unwrap(),
            values(1 << 20, 8)
        );
    }

    /// Chunks read in order from a cold file: each after the first was read
    /// ahead, and every one reads back as written.
    #[test]
    fn chunks_read_in_order_are_read_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        let (n, chunks) = (1usize << 18, 8u64);
        let chunk_bytes = n as u64 * 4;
        let file = open(&path);
        for i in 0..chunks {
            file.write_values(i * chunk_bytes, &values(n, i as u32))
                .unwrap();
        }
        file.flush().unwrap();
        evict(&path);
        let reader = CacheFile::new(File::open(&path).unwrap(), &path, false);
        for i in 0..chunks {
            let next = (i + 1 < chunks).then(|| ((i + 1) * chunk_bytes, chunk_bytes));
            let read = reader.read_values::<f32>(i * chunk_bytes, n, next).unwrap();
            assert_eq!(read, values(n, i as u32), "chunk {i}");
        }
        if reader.is_direct() {
            let ahead = reader.counts.read_ahead.load(Ordering::Relaxed);
            assert_eq!(ahead, (chunks - 1) * chunk_bytes);
        }
        // Asked for again (not in order): read again, not from read ahead.
        assert_eq!(reader.read_values::<f32>(0, n, None).unwrap(), values(n, 0));
    }

    /// After a cold chunk, a next chunk the page cache holds is read from
    /// it, not read ahead from the disk.
    #[test]
    fn cached_chunks_are_not_read_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        let (n, chunk_bytes) = (1usize << 18, 1u64 << 20);
        std::fs::write(&path, as_bytes(&values(4 * n, 9))).unwrap();
        evict(&path);
        // Chunk 1 back in the page cache; chunks 0, 2 and 3 cold.
        let buffered = File::open(&path).unwrap();
        // No kernel readahead past chunk 1 for this read.
        // SAFETY: a valid descriptor; the call only advises the kernel.
        unsafe {
            use std::os::fd::AsRawFd;
            libc::posix_fadvise(buffered.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM);
        }
        let mut one = vec![MaybeUninit::uninit(); chunk_bytes as usize];
        pread_into(&buffered, chunk_bytes, &mut one).unwrap();
        let reader = CacheFile::new(File::open(&path).unwrap(), &path, false);
        let all = values(4 * n, 9);
        for i in 0..4u64 {
            let next = (i < 3).then(|| ((i + 1) * chunk_bytes, chunk_bytes));
            let read = reader.read_values::<f32>(i * chunk_bytes, n, next).unwrap();
            assert_eq!(read, all[i as usize * n..(i as usize + 1) * n], "chunk {i}");
        }
        if reader.is_direct() {
            // Chunk 0 direct, 1 from the page cache, 2 direct, 3 read ahead.
            assert_eq!(
                reader.counts.direct_read.load(Ordering::Relaxed),
                3 * chunk_bytes
            );
            assert_eq!(
                reader.counts.read_ahead.load(Ordering::Relaxed),
                chunk_bytes
            );
        }
    }

    /// A new file that fits in memory is written through the page cache.
    #[test]
    fn a_small_new_file_is_kept_cached() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        let file = open(&path).keep_cached_if_it_fits(8 << 20, 1.0);
        assert!(memory_available().unwrap() > 16 << 20);
        file.write_values(0, &values(1 << 20, 3)).unwrap();
        file.flush().unwrap();
        assert_eq!(file.counts.direct_written.load(Ordering::Relaxed), 0);
        assert_eq!(resident_prefix(file.file(), 0, 4 << 20), 4 << 20);
        assert_eq!(
            file.read_values::<f32>(0, 1 << 20, None).unwrap(),
            values(1 << 20, 3)
        );
    }

    /// The cost of pages is judged once per window, on that window alone,
    /// and is dear above a nanosecond of system time per byte: a cheap
    /// window does not excuse a dear one after it.
    #[test]
    fn page_cost_judges_each_window() {
        let w = PageCost::WINDOW;
        let cost = PageCost::default();
        assert!(!cost.add(w - 4096, 10 * w));
        assert!(cost.add(4096, 0), "the window's average is dear");
        let varying = PageCost::default();
        assert!(!varying.add(w, w / 2), "a cheap window");
        assert!(!varying.add(w / 2, w), "half a window is not judged");
        assert!(varying.add(w / 2, w), "a dear window after a cheap one");
        let cheap = PageCost::default();
        for _ in 0..4 {
            assert!(!cheap.add(w, w / 2));
        }
    }

    /// A file to be kept cached whose new pages proved too dear writes the
    /// rest around the page cache.
    #[test]
    fn dear_pages_send_the_rest_of_the_file_direct() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        let file = open(&path).keep_cached_if_it_fits(8 << 20, 1.0);
        assert!(file.keep_cached.load(Ordering::Relaxed));
        // As if all but the last bytes of a window had already cost far
        // too much system time: this write completes it.
        file.page_cost
            .add(PageCost::WINDOW - 4096, 100 * PageCost::WINDOW);
        file.write_values(0, &values(1 << 20, 1)).unwrap();
        if !file.is_direct() {
            return;
        }
        assert!(!file.keep_cached.load(Ordering::Relaxed));
        assert_eq!(file.counts.direct_written.load(Ordering::Relaxed), 0);
        file.write_values(4 << 20, &values(1 << 20, 2)).unwrap();
        file.flush().unwrap();
        assert_eq!(file.counts.direct_written.load(Ordering::Relaxed), 4 << 20);
        assert_eq!(
            file.read_values::<f32>(4 << 20, 1 << 20, None).unwrap(),
            values(1 << 20, 2)
        );
    }

    /// The share of a file in the page cache: all of it after a buffered
    /// write, none after it was evicted.
    #[test]
    fn resident_share_follows_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        std::fs::write(&path, vec![7u8; 3 << 20]).unwrap();
        let file = File::open(&path).unwrap();
        assert_eq!(resident_share(&file, 3 << 20), 1.0);
        evict(&path);
        assert_eq!(resident_share(&file, 3 << 20), 0.0);
        assert_eq!(resident_prefix(&file, 4096, 8192), 0);
    }

    #[test]
    fn alignment_helpers() {
        assert_eq!(align_up(0), 0);
        assert_eq!(align_up(1), ALIGN);
        assert_eq!(align_up(ALIGN), ALIGN);
        assert_eq!(align_down(ALIGN + 1), ALIGN);
    }
}
