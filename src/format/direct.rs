//! Moving large files' bytes around the page cache (`O_DIRECT`): aligned
//! buffers, a pool of them, a thread that writes them while the caller
//! goes on ([`WriteBehind`]), and a file written front to back that way
//! ([`AppendFile`]). The reconstruction cache (`repo::cache_io`) and a
//! rank's staged pack of blobs (`store::rocks::pending`) use them; whether
//! to go direct at all is [`direct_io_allowed`] and
//! [`super::plain::direct_writes_work`].

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use super::plain::direct_io_allowed;

/// The size of the buffers direct I/O moves bytes through.
pub const DIRECT_BUFFER: usize = 4 << 20;

/// What `O_DIRECT` asks of offsets, lengths and memory here: 4 KiB, the
/// page size and the block size of common file systems (a larger block
/// size makes direct writes fail, and buffered I/O serves).
pub const DIRECT_ALIGN: usize = 4096;

/// A zeroed heap buffer aligned to [`DIRECT_ALIGN`].
pub(crate) struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    pub(crate) fn new(len: usize) -> io::Result<AlignedBuf> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), DIRECT_ALIGN)
            .map_err(io::Error::other)?;
        // SAFETY: the layout's size is non-zero.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(ptr).ok_or(io::ErrorKind::OutOfMemory)?;
        Ok(AlignedBuf { ptr, layout })
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: the allocation holds `layout.size()` initialized bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the allocation holds `layout.size()` initialized bytes and
        // `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

// SAFETY: the buffer owns its allocation; nothing else points into it.
unsafe impl Send for AlignedBuf {}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// Aligned buffers of [`DIRECT_BUFFER`] bytes, at most `limit` of them, reused
/// rather than reallocated.
pub(crate) struct BufPool {
    limit: usize,
    /// (free buffers, buffers allocated).
    free: Mutex<(Vec<AlignedBuf>, usize)>,
    returned: Condvar,
}

impl BufPool {
    pub(crate) fn new(limit: usize) -> BufPool {
        BufPool {
            limit,
            free: Mutex::default(),
            returned: Condvar::new(),
        }
    }

    /// A buffer, waiting for one to come back if all `limit` are out.
    pub(crate) fn take(&self) -> io::Result<AlignedBuf> {
        let mut guard = self.free.lock().expect("lock");
        loop {
            if let Some(buf) = self.try_take_locked(&mut guard) {
                return buf;
            }
            guard = self.returned.wait(guard).expect("lock");
        }
    }

    /// A buffer if one is free or may still be allocated.
    #[cfg_attr(not(feature = "store"), allow(dead_code))]
    pub(crate) fn try_take(&self) -> Option<AlignedBuf> {
        let mut guard = self.free.lock().expect("lock");
        self.try_take_locked(&mut guard)?.ok()
    }

    fn try_take_locked(
        &self,
        guard: &mut (Vec<AlignedBuf>, usize),
    ) -> Option<io::Result<AlignedBuf>> {
        let (free, allocated) = guard;
        if let Some(buf) = free.pop() {
            return Some(Ok(buf));
        }
        (*allocated < self.limit).then(|| {
            *allocated += 1;
            AlignedBuf::new(DIRECT_BUFFER)
        })
    }

    pub(crate) fn put(&self, buf: AlignedBuf) {
        self.free.lock().expect("lock").0.push(buf);
        self.returned.notify_one();
    }
}

/// Direct writes done by a thread of their own, so that the encoding
/// threads go on coding while the disk writes (a direct write returns only
/// once the device has the bytes). At most [`BEHIND_BUFFERS`] pieces of
/// [`DIRECT_BUFFER`] bytes are in flight: memory stays bounded, and a writer that
/// gets ahead of the disk waits for a free buffer.
pub(crate) struct WriteBehind {
    jobs: Mutex<Option<std::sync::mpsc::SyncSender<Job>>>,
    thread: Mutex<Option<std::thread::JoinHandle<io::Result<()>>>>,
    pool: Arc<BufPool>,
}

/// Buffers in flight behind a writer: 32 MiB.
const BEHIND_BUFFERS: usize = 8;

struct Job {
    offset: u64,
    len: usize,
    buf: AlignedBuf,
}

impl WriteBehind {
    /// Starts the thread, writing with `direct` and, where a direct write
    /// fails (a device whose blocks are larger than [`DIRECT_ALIGN`]), with
    /// `buffered`: a cache file that could not be written direct is still
    /// a cache file.
    pub(crate) fn start(direct: File, buffered: File) -> io::Result<WriteBehind> {
        let (jobs, queue) = std::sync::mpsc::sync_channel::<Job>(BEHIND_BUFFERS);
        let pool = Arc::new(BufPool::new(BEHIND_BUFFERS));
        let thread_pool = pool.clone();
        let thread = std::thread::Builder::new()
            .name("ckptvc-direct-writer".into())
            .spawn(move || {
                use std::os::unix::fs::FileExt;
                let mut result = Ok(());
                for job in queue {
                    if result.is_ok() {
                        let (bytes, at) = (&job.buf.as_slice()[..job.len], job.offset);
                        result = direct
                            .write_all_at(bytes, at)
                            .or_else(|_| buffered.write_all_at(bytes, at));
                    }
                    thread_pool.put(job.buf);
                }
                result
            })?;
        Ok(WriteBehind {
            jobs: Mutex::new(Some(jobs)),
            thread: Mutex::new(Some(thread)),
            pool,
        })
    }

    /// Copies `bytes` (a multiple of [`DIRECT_ALIGN`] long, for an aligned
    /// `offset`) into buffers and queues their direct writes.
    #[cfg_attr(not(feature = "store"), allow(dead_code))]
    pub(crate) fn queue(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        for (i, piece) in bytes.chunks(DIRECT_BUFFER).enumerate() {
            let mut buf = self.buffer()?;
            buf.as_mut_slice()[..piece.len()].copy_from_slice(piece);
            self.queue_buffer(offset + (i * DIRECT_BUFFER) as u64, buf, piece.len())?;
        }
        Ok(())
    }

    /// A buffer of [`DIRECT_BUFFER`] bytes to fill and queue, waiting for one
    /// to be written if all are in flight.
    pub(crate) fn buffer(&self) -> io::Result<AlignedBuf> {
        self.pool.take()
    }

    /// Queues the direct write of the first `len` bytes of `buf` (a
    /// multiple of [`DIRECT_ALIGN`]) at `offset` (aligned).
    pub(crate) fn queue_buffer(&self, offset: u64, buf: AlignedBuf, len: usize) -> io::Result<()> {
        let sender = self.jobs.lock().expect("lock").clone();
        let sender = sender.ok_or_else(|| io::Error::other("direct writer already finished"))?;
        sender
            .send(Job { offset, len, buf })
            .map_err(|_| io::Error::other("direct writer thread stopped"))
    }

    /// Closes the queue and waits for the thread's last write.
    pub(crate) fn finish(&self) -> io::Result<()> {
        drop(self.jobs.lock().expect("lock").take());
        match self.thread.lock().expect("lock").take() {
            Some(thread) => thread
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("direct writer thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for WriteBehind {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// A file written front to back once and synced, whose bytes are not read
/// again soon (a rank's staged pack of blobs): whole buffers of
/// [`DIRECT_BUFFER`] bytes go `O_DIRECT` where [`direct_io_allowed`] and
/// the file system takes it, written by a [`WriteBehind`] while the caller
/// fills the next, and the tail through the page cache. On a machine where
/// a new page-cache page is dear (docs/design.md, "The reconstruction cache
/// and the page cache") a keyframe's gigabytes would otherwise cost seconds
/// of system time for pages no one reads. The bytes on disk are the same
/// either way.
pub struct AppendFile {
    buffered: File,
    behind: Option<WriteBehind>,
    buf: AlignedBuf,
    filled: usize,
    /// Bytes handed over to be written so far (whole buffers).
    queued: u64,
}

impl AppendFile {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> io::Result<AppendFile> {
        let buffered = File::create(path)?;
        let behind = direct_io_allowed()
            .then(|| open_direct_for_writing(path))
            .flatten()
            .and_then(|direct| WriteBehind::start(direct, buffered.try_clone().ok()?).ok());
        let buf = match &behind {
            Some(behind) => behind.buffer()?,
            None => AlignedBuf::new(DIRECT_BUFFER)?,
        };
        Ok(AppendFile {
            buffered,
            behind,
            buf,
            filled: 0,
            queued: 0,
        })
    }

    /// Whether whole buffers go around the page cache.
    pub fn is_direct(&self) -> bool {
        self.behind.is_some()
    }

    pub fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let take = bytes.len().min(DIRECT_BUFFER - self.filled);
            self.buf.as_mut_slice()[self.filled..self.filled + take]
                .copy_from_slice(&bytes[..take]);
            self.filled += take;
            bytes = &bytes[take..];
            if self.filled == DIRECT_BUFFER {
                self.hand_over()?;
            }
        }
        Ok(())
    }

    /// Writes the full buffer: queued behind, or through the page cache.
    fn hand_over(&mut self) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        match &self.behind {
            Some(behind) => {
                let full = std::mem::replace(&mut self.buf, behind.buffer()?);
                behind.queue_buffer(self.queued, full, DIRECT_BUFFER)?;
            }
            None => self
                .buffered
                .write_all_at(self.buf.as_slice(), self.queued)?,
        }
        self.queued += DIRECT_BUFFER as u64;
        self.filled = 0;
        Ok(())
    }

    /// Waits for the queued writes (the first that failed is the error),
    /// writes what is left through the page cache, syncs, and returns the
    /// file.
    pub fn finish(self) -> io::Result<File> {
        use std::os::unix::fs::FileExt;
        if let Some(behind) = &self.behind {
            behind.finish()?;
        }
        self.buffered
            .write_all_at(&self.buf.as_slice()[..self.filled], self.queued)?;
        self.buffered.sync_all()?;
        Ok(self.buffered)
    }
}

#[cfg(target_os = "linux")]
fn open_direct_for_writing(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

#[cfg(not(target_os = "linux"))]
fn open_direct_for_writing(_path: &Path) -> Option<File> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that could not be made is the error of a later write or of
    /// `finish`, not lost.
    #[test]
    fn an_append_file_reports_a_failed_write() {
        let full = std::path::Path::new("/dev/full");
        if !full.exists() {
            return;
        }
        let mut file = AppendFile::create(full).unwrap();
        let data = vec![1u8; 30 << 20];
        let err = match file.write_all(&data) {
            Err(e) => e,
            Ok(()) => file.finish().unwrap_err(),
        };
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    }

    /// What an [`AppendFile`] writes is what was appended, in direct and
    /// buffered writes alike, on a disk and on tmpfs, across the buffer's
    /// size and unaligned pieces.
    #[test]
    fn an_append_file_holds_what_was_appended() {
        let mut dirs = vec![tempfile::tempdir().unwrap()];
        if std::path::Path::new("/dev/shm").is_dir() {
            dirs.push(tempfile::tempdir_in("/dev/shm").unwrap());
        }
        let expected: Vec<u8> = (0..(20u64 << 20) + 12345)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        for dir in &dirs {
            let path = dir.path().join("pack");
            let mut file = AppendFile::create(&path).unwrap();
            let mut at = 0;
            for piece in [1usize, 4095, 4 << 20, 3, 9 << 20, 777].iter().cycle() {
                let end = (at + piece).min(expected.len());
                file.write_all(&expected[at..end]).unwrap();
                at = end;
                if at == expected.len() {
                    break;
                }
            }
            // Where direct writes work they were used (where they do not,
            // the writer may not have found out yet).
            if direct_io_allowed() && super::super::plain::direct_writes_work(dir.path()) {
                assert!(file.is_direct(), "{}", path.display());
            }
            file.finish().unwrap();
            assert!(
                std::fs::read(&path).unwrap() == expected,
                "{}",
                path.display()
            );
        }
    }
}
