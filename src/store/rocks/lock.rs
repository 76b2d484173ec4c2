//! The single-writer lock: an advisory `flock` on `<repo>/lock`, taken with
//! std's `File::lock` family. The kernel drops it when the process dies, so a
//! crashed writer never leaves a stale lock behind.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use super::StoreError;

/// Held for as long as the writer lives.
#[derive(Debug)]
pub struct WriterLock {
    _file: File,
}

impl WriterLock {
    /// Takes the lock, polling for up to `wait` if another process holds it.
    pub fn acquire(path: &Path, wait: Duration) -> Result<WriterLock, StoreError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| StoreError::io(path, e))?;
        let deadline = Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(TryLockError::WouldBlock) => {
                    let holder = std::fs::read_to_string(path).unwrap_or_default();
                    let holder = holder.trim();
                    return Err(StoreError::Locked {
                        holder: if holder.is_empty() {
                            "unknown process".into()
                        } else {
                            holder.to_string()
                        },
                    });
                }
                Err(TryLockError::Error(e)) => return Err(StoreError::io(path, e)),
            }
        }
        // Who holds it, for the message a waiting process prints. Purely
        // informational: the flock is the lock.
        file.set_len(0).map_err(|e| StoreError::io(path, e))?;
        write!(file, "pid {}", std::process::id()).map_err(|e| StoreError::io(path, e))?;
        Ok(WriterLock { _file: file })
    }
}

/// Orders readers' opens against the moments a writer makes a change
/// visible. A read-only RocksDB open reads the manifest, then the write-ahead
/// log; a writer that flushed blobs and then logged a commit in between
/// would let the reader see the commit without its blobs. So readers hold
/// `<repo>/view.lock` shared while they open, and writers hold it
/// exclusively from flushing blobs to publishing (and while gc deletes
/// files). A reader that is already open is not affected by publishing.
#[derive(Debug)]
pub struct ViewLock {
    _file: File,
}

impl ViewLock {
    fn open(root: &Path, create: bool) -> Option<File> {
        OpenOptions::new()
            .read(true)
            .write(create)
            .create(create)
            .truncate(false)
            .open(root.join("view.lock"))
            .ok()
    }

    /// Shared, for a reader's open. `None` for stores made before this lock
    /// existed (nothing to order against until a writer creates it).
    pub fn shared(root: &Path) -> Option<ViewLock> {
        let file = Self::open(root, false)?;
        file.lock_shared().ok()?;
        Some(ViewLock { _file: file })
    }

    /// Exclusive, for a writer's publish; waits for readers still opening.
    pub fn exclusive(root: &Path) -> Result<ViewLock, StoreError> {
        let path = root.join("view.lock");
        let file = Self::open(root, true).ok_or_else(|| StoreError::Io {
            path: path.clone(),
            source: std::io::Error::other("cannot open"),
        })?;
        file.lock().map_err(|e| StoreError::io(&path, e))?;
        Ok(ViewLock { _file: file })
    }
}
