//! Reading a commit into memory instead of files: the tensors of its
//! safetensors and torch files decoded straight into buffers the caller
//! owns (a model's parameters, say), chunk by chunk, so the extra memory is
//! a few chunks whatever the model's size; and its other files as bytes.
//!
//! Every chunk is checked against the hash its commit recorded, as a
//! checkout does. In a lazy clone the commit's chunks are downloaded first.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use rayon::prelude::*;
use serde::Serialize;

use super::Repo;
use super::progress::NoProgress;
use super::reconstruct::{ChunkAddr, Reconstructor};
use super::rev::resolve;
use crate::store::{CommitRecord, FileContent, ObjectId, TensorEntry};

/// One tensor of a commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorMeta {
    pub name: String,
    /// safetensors dtype name (`F32`, `BF16`, ...).
    pub dtype: String,
    pub shape: Vec<u64>,
    /// Its size in bytes.
    pub bytes: u64,
}

/// One file of a commit, with its tensors when it has any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileMeta {
    pub name: String,
    pub size: u64,
    /// `None` for a file kept as bytes.
    pub tensors: Option<Vec<TensorMeta>>,
}

/// A commit opened for reading into memory.
pub struct Snapshot<'r> {
    reconstructor: Reconstructor<'r>,
    id: ObjectId,
    record: Arc<CommitRecord>,
    /// (file, tensor) → (file index, tensor index).
    index: HashMap<(String, String), (usize, usize)>,
}

impl<'r> Snapshot<'r> {
    /// Opens the commit `rev` names. In a lazy clone, call [`open_fresh`]
    /// first: it downloads the commit's chunks and gives the view that has
    /// them.
    pub fn open(repo: &'r Repo, rev: &str) -> anyhow::Result<Snapshot<'r>> {
        let id = resolve(repo.backend(), rev)?;
        let reconstructor = Reconstructor::new(repo);
        let record = reconstructor.record(&id)?;
        let mut index = HashMap::new();
        for (fi, file) in record.files.iter().enumerate() {
            for (ti, tensor) in file.tensors().iter().enumerate() {
                index.insert((file.name.clone(), tensor.name.clone()), (fi, ti));
            }
        }
        Ok(Snapshot {
            reconstructor,
            id,
            record,
            index,
        })
    }

    pub fn id(&self) -> ObjectId {
        self.id
    }

    pub fn record(&self) -> &CommitRecord {
        &self.record
    }

    /// Every file of the commit, with its tensors.
    pub fn files(&self) -> Vec<FileMeta> {
        self.record
            .files
            .iter()
            .map(|file| FileMeta {
                name: file.name.clone(),
                size: file.size,
                tensors: match &file.content {
                    FileContent::Opaque { .. } => None,
                    _ => Some(
                        file.tensors()
                            .iter()
                            .map(|t| TensorMeta {
                                name: t.name.clone(),
                                dtype: t.dtype.clone(),
                                shape: t.shape.clone(),
                                bytes: t.raw_bytes(),
                            })
                            .collect(),
                    ),
                },
            })
            .collect()
    }

    /// Decodes tensor `tensor` of file `file` into `out`, which must be
    /// exactly its size: chunks are decoded in parallel, each written to its
    /// place and dropped.
    pub fn read_tensor_into(&self, file: &str, tensor: &str, out: &mut [u8]) -> anyhow::Result<()> {
        let entry = self.tensor_entry(file, tensor)?;
        if out.len() as u64 != entry.raw_bytes() {
            bail!(
                "tensor `{tensor}` of {file} is {} bytes ({} {:?}); the buffer given is {} bytes",
                entry.raw_bytes(),
                entry.dtype,
                entry.shape,
                out.len()
            );
        }
        self.read_tensor_range_into(file, tensor, 0, out)
    }

    /// Decodes bytes `offset..offset + out.len()` of tensor `tensor` of
    /// file `file` into `out`, decoding only the chunks that overlap them:
    /// a tensor too large to stage whole on the host (one bound for a GPU)
    /// is read piece by piece into one bounded buffer.
    pub fn read_tensor_range_into(
        &self,
        file: &str,
        tensor: &str,
        offset: u64,
        out: &mut [u8],
    ) -> anyhow::Result<()> {
        let entry = self.tensor_entry(file, tensor)?;
        let size = entry.raw_bytes();
        let end = offset
            .checked_add(out.len() as u64)
            .filter(|&end| end <= size)
            .with_context(|| {
                format!(
                    "bytes {offset}..{} are outside tensor `{tensor}` of {file} ({size} bytes)",
                    offset as u128 + out.len() as u128
                )
            })?;
        // (chunk index, where the range starts in the chunk, its part of `out`)
        let mut pieces: Vec<(usize, usize, &mut [u8])> = Vec::new();
        let mut rest = out;
        let mut chunk_start = 0u64;
        for (index, chunk) in entry.chunks.iter().enumerate() {
            let chunk_end = chunk_start + chunk.raw_len;
            let (lo, hi) = (chunk_start.max(offset), chunk_end.min(end));
            if lo < hi {
                let (piece, tail) = std::mem::take(&mut rest).split_at_mut((hi - lo) as usize);
                pieces.push((index, (lo - chunk_start) as usize, piece));
                rest = tail;
            }
            if chunk_end >= end {
                break;
            }
            chunk_start = chunk_end;
        }
        pieces.into_par_iter().try_for_each(|(index, skip, piece)| {
            let addr = ChunkAddr {
                file,
                tensor: Some(tensor),
                index,
            };
            let bytes = self.reconstructor.chunk(&self.id, addr)?;
            piece.copy_from_slice(&bytes[skip..skip + piece.len()]);
            anyhow::Ok(())
        })
    }

    fn tensor_entry(&self, file: &str, tensor: &str) -> anyhow::Result<&TensorEntry> {
        let &(fi, ti) = self
            .index
            .get(&(file.to_string(), tensor.to_string()))
            .with_context(|| {
                format!(
                    "commit {} has no tensor `{tensor}` in {file}",
                    self.id.short()
                )
            })?;
        Ok(&self.record.files[fi].tensors()[ti])
    }

    /// A tensor's bytes in a new buffer.
    pub fn read_tensor(&self, file: &str, tensor: &str) -> anyhow::Result<Vec<u8>> {
        let bytes = self
            .index
            .get(&(file.to_string(), tensor.to_string()))
            .map(|&(fi, ti)| self.record.files[fi].tensors()[ti].raw_bytes())
            .unwrap_or(0);
        let mut out = vec![0u8; bytes as usize];
        self.read_tensor_into(file, tensor, &mut out)?;
        Ok(out)
    }

    /// The bytes of a file kept as bytes (not a tensor file).
    pub fn read_file(&self, file: &str) -> anyhow::Result<Vec<u8>> {
        let entry = self
            .record
            .files
            .iter()
            .find(|f| f.name == file)
            .with_context(|| format!("commit {} has no file {file}", self.id.short()))?;
        let FileContent::Opaque { chunks } = &entry.content else {
            bail!("{file} is a tensor file: read its tensors");
        };
        let mut out = Vec::with_capacity(entry.size as usize);
        for index in 0..chunks.len() {
            let addr = ChunkAddr {
                file,
                tensor: None,
                index,
            };
            out.extend_from_slice(&self.reconstructor.chunk(&self.id, addr)?);
        }
        Ok(out)
    }
}

/// A new view of `repo` holding everything commit `rev` needs: in a lazy
/// clone, what was missing is downloaded first (waiting up to `wait` for
/// the writer lock).
pub fn open_fresh(repo: &Repo, rev: &str, wait: Duration) -> anyhow::Result<Repo> {
    // `rev` is resolved in a new view: `repo` may predate commits made
    // since by other processes (the other ranks of a sharded step).
    let view = repo.reopen()?;
    let id = resolve(view.backend(), rev)?;
    super::remote::fill_for_checkout(&view, &id, wait, &NoProgress)?;
    Ok(view.reopen()?)
}
