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
use crate::store::{CommitRecord, FileContent, ObjectId};

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
        let &(fi, ti) = self
            .index
            .get(&(file.to_string(), tensor.to_string()))
            .with_context(|| {
                format!(
                    "commit {} has no tensor `{tensor}` in {file}",
                    self.id.short()
                )
            })?;
        let entry = &self.record.files[fi].tensors()[ti];
        if out.len() as u64 != entry.raw_bytes() {
            bail!(
                "tensor `{tensor}` of {file} is {} bytes ({} {:?}); the buffer given is {} bytes",
                entry.raw_bytes(),
                entry.dtype,
                entry.shape,
                out.len()
            );
        }
        let mut pieces: Vec<(usize, &mut [u8])> = Vec::with_capacity(entry.chunks.len());
        let mut rest = out;
        for (index, chunk) in entry.chunks.iter().enumerate() {
            let (piece, tail) = rest.split_at_mut(chunk.raw_len as usize);
            pieces.push((index, piece));
            rest = tail;
        }
        pieces.into_par_iter().try_for_each(|(index, piece)| {
            let addr = ChunkAddr {
                file,
                tensor: Some(tensor),
                index,
            };
            piece.copy_from_slice(&self.reconstructor.chunk(&self.id, addr)?);
            anyhow::Ok(())
        })
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
    let id = resolve(repo.backend(), rev)?;
    super::remote::fill_for_checkout(repo, &id, wait, &NoProgress)?;
    Ok(repo.reopen()?)
}
