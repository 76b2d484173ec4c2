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
    const BLOCK: usize = super::direct::DIRECT_ALIGN;
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

#[cfg(test)]
mod tests {
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
