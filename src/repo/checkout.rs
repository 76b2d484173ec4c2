//! `checkout`: a commit back to ordinary files, byte-identical to what was
//! committed (in this lossless phase). Files are written under a temporary
//! name and renamed when complete, so an interrupted checkout never leaves a
//! plausible-looking but partial file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rayon::prelude::*;

use super::progress::Progress;
use super::reconstruct::{ChunkAddr, Reconstructor};
use super::rev::resolve;
use crate::store::{FileContent, FileEntry, ObjectId, Store};

#[derive(Debug, Clone)]
pub struct CheckoutOutcome {
    pub id: ObjectId,
    pub files: Vec<PathBuf>,
    pub bytes: u64,
}

/// How `checkout` writes its files.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckoutOptions {
    /// Write into a non-empty directory.
    pub force: bool,
    /// Return without waiting for the files to reach the disk. By default
    /// each file is fsync'ed before it is renamed into place, so that after
    /// a crash a checked-out name never holds zeros where data should be;
    /// when the files are used at once (a resume), that wait buys nothing.
    pub no_sync: bool,
}

pub fn checkout(
    root: &Path,
    rev: &str,
    output: &Path,
    options: CheckoutOptions,
    progress: &dyn Progress,
) -> anyhow::Result<CheckoutOutcome> {
    let force = options.force;
    let store = Store::open_read(root)?;
    let id = resolve(&store, rev)?;
    prepare_output(output, force)?;
    let reconstructor = Reconstructor::new(&store);
    let record = reconstructor.record(&id)?;
    let total: u64 = record.files.iter().map(|f| f.size).sum();
    progress.begin("checkout", total);
    let mut files = Vec::new();
    for entry in &record.files {
        let path = output.join(&entry.name);
        write_file(&reconstructor, &id, entry, &path, options, progress)?;
        files.push(path);
    }
    progress.finish();
    Ok(CheckoutOutcome {
        id,
        files,
        bytes: total,
    })
}

fn prepare_output(output: &Path, force: bool) -> anyhow::Result<()> {
    match std::fs::read_dir(output) {
        Ok(mut entries) => {
            if entries.next().is_some() && !force {
                bail!(
                    "{}: output directory is not empty (pass --force to write into it anyway)",
                    output.display()
                );
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("{}: cannot use as output directory: {e}", output.display()),
    }
    std::fs::create_dir_all(output)
        .with_context(|| format!("{}: cannot create output directory", output.display()))
}

/// Asks the kernel to start writing a range out now, without waiting: the
/// disk then works while later chunks are decoded, and the final fsync
/// waits only for the tail. Without it all the data is still dirty at the
/// fsync, and checkout takes decode time plus disk time. Advisory: errors
/// surface at the fsync.
fn start_writeback(file: &File, offset: u64, len: usize) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on an open descriptor; no memory is passed.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

fn write_file(
    reconstructor: &Reconstructor<'_>,
    id: &ObjectId,
    entry: &FileEntry,
    path: &Path,
    options: CheckoutOptions,
    progress: &dyn Progress,
) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("{}: cannot create", parent.display()))?;
    }
    let partial = path.with_file_name(format!(
        ".{}.ckptvc-partial",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let file =
        File::create(&partial).with_context(|| format!("{}: cannot create", partial.display()))?;
    file.set_len(entry.size)?;

    // (file offset, chunk address) for every chunk, in output order.
    let mut pieces = Vec::new();
    let mut offset = 0u64;
    match &entry.content {
        FileContent::Opaque { chunks } => {
            for (index, chunk) in chunks.iter().enumerate() {
                pieces.push((offset, None, index));
                offset += chunk.raw_len;
            }
        }
        FileContent::Safetensors { header, tensors } => {
            file.write_all_at(header, 0)?;
            progress.advance(header.len() as u64);
            offset = header.len() as u64;
            for tensor in tensors {
                for (index, chunk) in tensor.chunks.iter().enumerate() {
                    pieces.push((offset, Some(tensor.name.as_str()), index));
                    offset += chunk.raw_len;
                }
            }
        }
    }
    if offset != entry.size {
        bail!(
            "commit {} is inconsistent: {} should be {} bytes but its chunks add up to {offset}",
            id.short(),
            entry.name,
            entry.size
        );
    }
    let written = pieces.par_iter().try_for_each(|&(at, tensor, index)| {
        let addr = ChunkAddr {
            file: &entry.name,
            tensor,
            index,
        };
        let bytes = reconstructor.chunk(id, addr)?;
        file.write_all_at(&bytes, at)
            .with_context(|| format!("{}: write failed", partial.display()))?;
        if !options.no_sync {
            start_writeback(&file, at, bytes.len());
        }
        progress.advance(bytes.len() as u64);
        anyhow::Ok(())
    });
    if let Err(e) = written {
        // A chunk that fails verification leaves no file behind, not even
        // the partial one.
        drop(file);
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    if !options.no_sync {
        file.sync_all()
            .with_context(|| format!("{}: cannot sync to disk", partial.display()))?;
    }
    std::fs::rename(&partial, path)
        .with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}
