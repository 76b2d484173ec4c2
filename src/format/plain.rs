//! Reading file bytes straight into typed buffers, and whether large files
//! may be written around the page cache.
//!
//! Commit reads every tensor chunk (several GiB per checkpoint) and the
//! reconstruction cache; a zero-filled buffer per read and a second copy to
//! turn bytes into f32 cost as much as the read itself. These helpers read
//! with `pread` into uninitialized capacity of a `Vec<T>` for element types
//! that every bit pattern is a valid value of.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

mod sealed {
    pub trait Sealed {}
    impl Sealed for u8 {}
    impl Sealed for f32 {}
}

/// Element types without padding or invalid bit patterns (`u8`, `f32`), so
/// any bytes a file holds are a valid value. Sealed: the `unsafe` code below
/// relies on it.
pub trait Plain: Copy + sealed::Sealed {}
impl Plain for u8 {}
impl Plain for f32 {}

/// The bytes of `values` in memory order (for f32: little-endian on the
/// little-endian machines ckptvc runs on; callers that need the file order
/// check `cfg!(target_endian = "little")`).
pub fn as_bytes<T: Plain>(values: &[T]) -> &[u8] {
    // SAFETY: `T: Plain` has no padding, so every byte of the slice is
    // initialized; u8 has no alignment requirement; the length is the
    // slice's size in bytes.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), size_of_val(values)) }
}

/// `count` elements of `T` from `file` at byte `offset`, read with `pread`
/// (no shared file position, so threads can read one file at once). Reading
/// instead of touching a memory map costs one copy out of the page cache and
/// no page faults, and nothing stays in this process's resident set: memory
/// is bounded by the chunks in flight, not by the size of the file.
pub fn read_range<T: Plain>(file: &File, offset: u64, count: usize) -> std::io::Result<Vec<T>> {
    // SAFETY: `pread_into` fills all of `bytes` or fails.
    unsafe { filled_vec(count, |bytes| pread_into(file, offset, bytes)) }.map(|(v, ())| v)
}

/// A `Vec` of `count` elements whose bytes `fill` writes into uninitialized
/// memory (no zeroing first), with what `fill` returned.
///
/// # Safety
/// When `fill` returns `Ok`, it must have written every byte of the slice
/// it was given.
pub(crate) unsafe fn filled_vec<T: Plain, R>(
    count: usize,
    fill: impl FnOnce(&mut [std::mem::MaybeUninit<u8>]) -> std::io::Result<R>,
) -> std::io::Result<(Vec<T>, R)> {
    let mut out: Vec<T> = Vec::with_capacity(count);
    let len = size_of::<T>() * count;
    // SAFETY: the capacity holds `len` bytes, viewed as uninitialized.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<std::mem::MaybeUninit<u8>>(), len)
    };
    let result = fill(bytes)?;
    // SAFETY: `fill` wrote all `len` bytes (the caller's promise), and
    // `T: Plain` accepts any bytes.
    unsafe { out.set_len(count) };
    Ok((out, result))
}

/// Fills `out` from `file` at byte `offset` with `pread` (no shared file
/// position), into memory that need not be initialized.
pub fn pread_into(
    file: &File,
    offset: u64,
    out: &mut [std::mem::MaybeUninit<u8>],
) -> std::io::Result<()> {
    let mut done = 0;
    while done < out.len() {
        let at = libc::off_t::try_from(offset + done as u64).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "offset beyond off_t")
        })?;
        let rest = &mut out[done..];
        // SAFETY: pread writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::pread(file.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len(), at) };
        match n {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            n => done += n as usize,
        }
    }
    Ok(())
}

/// Whether ckptvc may move the bytes of its large files (the store's blob
/// files, the reconstruction cache) with `O_DIRECT`, around the page cache.
/// `CKPTVC_DIRECT_IO=off` says no: every byte then goes through the page
/// cache, as in an A/B measurement's baseline. The stored bytes are the
/// same either way.
pub fn direct_io_allowed() -> bool {
    std::env::var_os("CKPTVC_DIRECT_IO").is_none_or(|v| v != "off")
}

/// Whether files in `dir` take `O_DIRECT` writes, found by writing one
/// aligned 4 KiB block to a probe file there (removed after). Some file
/// systems refuse `O_DIRECT` at open (tmpfs before Linux 6.6), one whose
/// blocks are larger than 4 KiB refuses the write: the answer is then no
/// and buffered I/O serves.
#[cfg(target_os = "linux")]
pub fn direct_writes_work(dir: &Path) -> bool {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    const BLOCK: usize = DIRECT_ALIGN;
    let probe = dir.join(format!(".direct-probe-{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .and_then(|file| {
            // An aligned block inside a buffer twice its size.
            let buffer = vec![0u8; 2 * BLOCK];
            let start = buffer.as_ptr().align_offset(BLOCK);
            file.write_all_at(&buffer[start..start + BLOCK], 0)
        });
    let _ = std::fs::remove_file(&probe);
    written.is_ok()
}

#[cfg(not(target_os = "linux"))]
pub fn direct_writes_work(_dir: &Path) -> bool {
    false
}

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
    pub(crate) fn new(len: usize) -> std::io::Result<AlignedBuf> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), DIRECT_ALIGN)
            .map_err(std::io::Error::other)?;
        // SAFETY: the layout's size is non-zero.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(ptr).ok_or(std::io::ErrorKind::OutOfMemory)?;
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

/// A file written front to back once and synced, whose bytes are not read
/// again soon (a rank's staged pack of blobs): whole blocks go `O_DIRECT`
/// where [`direct_io_allowed`] and the file system takes it, around the
/// page cache, and the tail through it. On a machine where a new
/// page-cache page is dear (docs/design.md, "The reconstruction cache and
/// the page cache") a keyframe's gigabytes would otherwise cost seconds of
/// system time for pages no one reads. A thread writes each full buffer
/// while the caller fills the next (at most [`APPEND_BUFFERS`] of
/// [`APPEND_BUFFER`] bytes exist). The bytes on disk are the same either
/// way.
pub struct AppendFile {
    buffered: File,
    buf: AlignedBuf,
    filled: usize,
    /// Bytes handed to the writer so far (whole buffers).
    queued: u64,
    allocated: usize,
    jobs: Option<std::sync::mpsc::SyncSender<(u64, AlignedBuf)>>,
    free: std::sync::mpsc::Receiver<AlignedBuf>,
    writer: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    direct: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// How many bytes an [`AppendFile`] gathers before a write.
const APPEND_BUFFER: usize = 8 << 20;
/// An [`AppendFile`]'s buffers: one being filled, the others being written.
const APPEND_BUFFERS: usize = 3;

impl AppendFile {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> std::io::Result<AppendFile> {
        use std::sync::atomic::AtomicBool;
        let buffered = File::create(path)?;
        let direct = direct_io_allowed()
            .then(|| open_direct_for_writing(path))
            .flatten();
        let is_direct = std::sync::Arc::new(AtomicBool::new(direct.is_some()));
        let (jobs, queue) = std::sync::mpsc::sync_channel(APPEND_BUFFERS);
        let (give_back, free) = std::sync::mpsc::channel();
        let writer = {
            let buffered = buffered.try_clone()?;
            let is_direct = is_direct.clone();
            std::thread::Builder::new()
                .name("ckptvc-append".into())
                .spawn(move || write_appended(queue, give_back, direct, buffered, &is_direct))?
        };
        Ok(AppendFile {
            buffered,
            buf: AlignedBuf::new(APPEND_BUFFER)?,
            filled: 0,
            queued: 0,
            allocated: 1,
            jobs: Some(jobs),
            free,
            writer: Some(writer),
            direct: is_direct,
        })
    }

    /// Whether whole blocks still go around the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn write_all(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let take = bytes.len().min(APPEND_BUFFER - self.filled);
            self.buf.as_mut_slice()[self.filled..self.filled + take]
                .copy_from_slice(&bytes[..take]);
            self.filled += take;
            bytes = &bytes[take..];
            if self.filled == APPEND_BUFFER {
                self.hand_over()?;
            }
        }
        Ok(())
    }

    /// Hands the full buffer to the writer and takes an empty one: a new
    /// one while fewer than [`APPEND_BUFFERS`] exist, else the next the
    /// writer gives back.
    fn hand_over(&mut self) -> std::io::Result<()> {
        let next = match self.free.try_recv() {
            Ok(buf) => buf,
            Err(_) if self.allocated < APPEND_BUFFERS => {
                self.allocated += 1;
                AlignedBuf::new(APPEND_BUFFER)?
            }
            // The writer gives every buffer back unless it has stopped.
            Err(_) => match self.free.recv() {
                Ok(buf) => buf,
                Err(_) => return Err(self.writer_error()),
            },
        };
        let full = std::mem::replace(&mut self.buf, next);
        let sent = self
            .jobs
            .as_ref()
            .map(|jobs| jobs.send((self.queued, full)));
        if !matches!(sent, Some(Ok(()))) {
            return Err(self.writer_error());
        }
        self.queued += APPEND_BUFFER as u64;
        self.filled = 0;
        Ok(())
    }

    /// The writer's error, once it has stopped.
    fn writer_error(&mut self) -> std::io::Error {
        self.jobs = None;
        match self.writer.take().map(std::thread::JoinHandle::join) {
            Some(Ok(Err(e))) => e,
            _ => std::io::Error::other("the append writer stopped"),
        }
    }

    /// Waits for the writer, writes what is left through the page cache,
    /// syncs, and returns the file.
    pub fn finish(mut self) -> std::io::Result<File> {
        use std::os::unix::fs::FileExt;
        self.jobs = None;
        if let Some(writer) = self.writer.take() {
            writer
                .join()
                .map_err(|_| std::io::Error::other("the append writer panicked"))??;
        }
        let tail = &self.buf.as_slice()[..self.filled];
        self.buffered.write_all_at(tail, self.queued)?;
        self.buffered.sync_all()?;
        Ok(self.buffered)
    }
}

/// The writer thread of an [`AppendFile`]: each buffer at its offset,
/// direct while the file system takes it (EINVAL: through the page cache
/// from then on), given back after; the first error ends the writing.
fn write_appended(
    queue: std::sync::mpsc::Receiver<(u64, AlignedBuf)>,
    give_back: std::sync::mpsc::Sender<AlignedBuf>,
    mut direct: Option<File>,
    buffered: File,
    is_direct: &std::sync::atomic::AtomicBool,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    for (offset, buf) in queue {
        let block = buf.as_slice();
        let mut done = false;
        if let Some(file) = &direct {
            match file.write_all_at(block, offset) {
                Ok(()) => done = true,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    direct = None;
                    is_direct.store(false, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        if !done {
            buffered.write_all_at(block, offset)?;
        }
        // The owner may have finished with an error and gone.
        let _ = give_back.send(buf);
    }
    Ok(())
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
    use super::AppendFile;

    /// A write the writer thread could not make is the error of a later
    /// write or of `finish`, not lost.
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
            if super::direct_io_allowed() && super::direct_writes_work(dir.path()) {
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
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_bytes_and_floats_at_offsets() {
        let mut file = tempfile::tempfile().unwrap();
        let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.25 - 3.0).collect();
        file.write_all(b"head").unwrap();
        file.write_all(as_bytes(&values)).unwrap();
        let floats: Vec<f32> = read_range(&file, 4, 1000).unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(floats, values);
        }
        let bytes: Vec<u8> = read_range(&file, 1, 3).unwrap();
        assert_eq!(bytes, b"ead");
        assert_eq!(read_range::<u8>(&file, 0, 0).unwrap(), Vec::<u8>::new());
        let past_end = read_range::<f32>(&file, 8, 1000).unwrap_err();
        assert_eq!(past_end.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    /// The probe leaves nothing behind; a directory it cannot write to is
    /// answered no.
    #[test]
    fn the_direct_write_probe_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let _ = direct_writes_work(dir.path());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(!direct_writes_work(&dir.path().join("missing")));
    }
}
