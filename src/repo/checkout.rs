//! `checkout`: a commit back to ordinary files, byte-identical to what was
//! committed (in this lossless phase). Files are written under a temporary
//! name and renamed when complete, so an interrupted checkout never leaves a
//! plausible-looking but partial file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rayon::prelude::*;

use super::Repo;
use super::progress::Progress;
use super::reconstruct::{ChunkAddr, Reconstructor};
use super::rev::resolve;
use crate::store::{FileContent, FileEntry, ObjectId, TorchContent};

/// What `checkout` wrote (`--json` prints it).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckoutOutcome {
    #[serde(serialize_with = "crate::store::object::hex")]
    pub id: ObjectId,
    /// Blobs a lazy clone downloaded for this checkout, and their bytes.
    pub blobs_downloaded: usize,
    pub bytes_downloaded: u64,
    pub files: Vec<PathBuf>,
    pub bytes: u64,
}

/// How `checkout` writes its files.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckoutOptions {
    /// How long to wait for the writer lock when a lazy store must first
    /// download this commit's chunks.
    pub lock_wait: std::time::Duration,
    /// Write into a non-empty directory.
    pub force: bool,
    /// Return without waiting for the files to reach the disk. By default
    /// each file is fsync'ed before it is renamed into place, so that after
    /// a crash a checked-out name never holds zeros where data should be;
    /// when the files are used at once (a resume), that wait buys nothing.
    pub no_sync: bool,
    /// Write only this rank's files of a sharded step (see
    /// [`super::seal::shard_of`]); `None`: every file.
    pub shard: Option<super::seal::Shard>,
}

pub fn checkout(
    store: &Repo,
    rev: &str,
    output: &Path,
    options: CheckoutOptions,
    progress: &dyn Progress,
) -> anyhow::Result<CheckoutOutcome> {
    let force = options.force;
    let id = resolve(store.backend(), rev)?;
    prepare_output(output, force)?;
    // A lazy clone downloads what this commit needs first.
    let filled = super::remote::fill_for_checkout(store, &id, options.lock_wait, progress)?;
    let fresh;
    let store = if filled.0 > 0 {
        fresh = store.reopen()?;
        &fresh
    } else {
        store
    };
    let reconstructor = Reconstructor::new(store);
    let record = reconstructor.record(&id)?;
    let wanted: Vec<&FileEntry> = record
        .files
        .iter()
        .filter(|f| {
            options
                .shard
                .is_none_or(|s| super::seal::shard_of(&f.name) == s.index)
        })
        .collect();
    let total: u64 = wanted.iter().map(|f| f.size).sum();
    progress.begin("checkout", total);
    let mut files = Vec::new();
    for entry in wanted {
        let path = output.join(&entry.name);
        write_file(&reconstructor, &id, entry, &path, options, progress)?;
        files.push(path);
    }
    progress.finish();
    Ok(CheckoutOutcome {
        id,
        blobs_downloaded: filled.0,
        bytes_downloaded: filled.1,
        files,
        bytes: total,
    })
}

fn prepare_output(output: &Path, force: bool) -> anyhow::Result<()> {
    match std::fs::read_dir(output) {
        Ok(mut entries) => {
            if entries.next().is_some() && !force {
                return Err(super::error::RepoError::OutputNotEmpty {
                    path: output.to_path_buf(),
                }
                .into());
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
        FileContent::Torch(torch) => {
            offset = torch_pieces(&file, entry, torch, &mut pieces, id, progress)?;
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
    let written = pieces.par_iter().map(|&(at, tensor, index)| {
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
        // A torch file's CRCs are rewritten from the decoded bytes.
        let crc = matches!(entry.content, FileContent::Torch(_)).then(|| crc32fast::hash(&bytes));
        anyhow::Ok((crc, bytes.len() as u64))
    });
    let written: anyhow::Result<Vec<_>> = written.collect();
    let written = written.and_then(|crcs| {
        if let FileContent::Torch(torch) = &entry.content {
            write_crcs(&file, torch, &crcs)?;
        }
        Ok(())
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

/// Writes a torch file's skeleton and lists its tensors' chunks in
/// `pieces`; returns the file length they add up to.
fn torch_pieces<'e>(
    file: &File,
    entry: &'e FileEntry,
    torch: &'e TorchContent,
    pieces: &mut Vec<(u64, Option<&'e str>, usize)>,
    id: &ObjectId,
    progress: &dyn Progress,
) -> anyhow::Result<u64> {
    let inconsistent = || {
        anyhow::anyhow!(
            "commit {} is inconsistent: the layout of {} does not add up",
            id.short(),
            entry.name
        )
    };
    let fields_fit = torch
        .crc_fields
        .iter()
        .flatten()
        .all(|&f| f.checked_add(4).is_some_and(|end| end <= entry.size));
    if torch.offsets.len() != torch.tensors.len()
        || torch.crc_fields.len() != torch.tensors.len()
        || !fields_fit
    {
        return Err(inconsistent());
    }
    let mut at = 0u64; // position in the file
    let mut from = 0usize; // position in the skeleton
    for (tensor, &start) in torch.tensors.iter().zip(&torch.offsets) {
        let gap = start.checked_sub(at).ok_or_else(inconsistent)? as usize;
        let literal = torch
            .skeleton
            .get(from..from + gap)
            .ok_or_else(inconsistent)?;
        file.write_all_at(literal, at)?;
        progress.advance(gap as u64);
        from += gap;
        at = start;
        for (index, chunk) in tensor.chunks.iter().enumerate() {
            pieces.push((at, Some(tensor.name.as_str()), index));
            at += chunk.raw_len;
        }
    }
    let tail = &torch.skeleton[from.min(torch.skeleton.len())..];
    file.write_all_at(tail, at)?;
    progress.advance(tail.len() as u64);
    Ok(at + tail.len() as u64)
}

/// Combines the chunk CRCs (in `pieces` order, which is tensor by tensor)
/// and writes each storage's CRC into its fields. A tensor without fields
/// continues into the next one: a storage cut into several tensors (a
/// DeepSpeed flat partition) has one CRC over all its pieces.
fn write_crcs(
    file: &File,
    torch: &TorchContent,
    crcs: &[(Option<u32>, u64)],
) -> anyhow::Result<()> {
    let mut chunk_crcs = crcs.iter();
    let mut crc = crc32fast::Hasher::new();
    for (tensor, fields) in torch.tensors.iter().zip(&torch.crc_fields) {
        for _ in &tensor.chunks {
            let &(chunk_crc, len) = chunk_crcs.next().expect("one CRC per chunk");
            crc.combine(&crc32fast::Hasher::new_with_initial_len(
                chunk_crc.expect("torch chunks have CRCs"),
                len,
            ));
        }
        if fields.is_empty() {
            continue;
        }
        let value = std::mem::take(&mut crc).finalize().to_le_bytes();
        for &field in fields {
            file.write_all_at(&value, field)?;
        }
    }
    Ok(())
}
