//! `commit`: one checkpoint directory in, one commit out.
//!
//! The order of work is what keeps the store safe:
//! 1. every input file is opened and validated before the store is touched;
//! 2. under the writer lock, branch and step are checked on a read-only view,
//!    so a refused commit leaves every store file as it was;
//! 3. chunks are encoded in parallel and new blobs written, then flushed;
//! 4. the commit record, branch tip, step index and HEAD go in one synced
//!    batch: the commit becomes visible all at once or not at all.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use rayon::prelude::*;

use super::progress::Progress;
use super::reconstruct::{ChunkAddr, Reconstructor};
use super::tipcache::{self, CacheLayout, CacheWriter};
use crate::codec;
use crate::format::safetensors::{TensorInfo, element_size};
use crate::format::{Checkpoint, InputFile, InputKind};
use crate::store::object::COMMIT_VERSION;
use crate::store::{ChunkRef, CommitRecord, FileContent, FileEntry, ObjectId, Store, TensorEntry};

#[derive(Debug, Clone)]
pub struct CommitOptions {
    pub step: u64,
    /// `None`: the current branch (HEAD).
    pub branch: Option<String>,
    pub message: String,
    /// Encode every chunk standalone.
    pub force_keyframe: bool,
    /// How long to wait for another writer to finish.
    pub lock_wait: Duration,
}

/// What the commit produced.
#[derive(Debug, Clone)]
pub struct CommitOutcome {
    pub id: ObjectId,
    pub record: CommitRecord,
    /// Blobs written (not already in the store).
    pub new_blobs: u64,
}

/// The branch tip a commit builds on, checked before any write.
struct Target {
    branch: String,
    parent: Option<(ObjectId, CommitRecord)>,
}

/// One unit of parallel work: a chunk of an input file.
struct Job<'c> {
    file: &'c InputFile,
    /// Absolute byte range in the input file.
    offset: u64,
    len: u64,
    /// The tensor it belongs to, with the chunk index; `None` for opaque files.
    tensor: Option<(&'c TensorInfo, usize)>,
    elem_size: usize,
    /// The parent's chunk at the same position, when it has the same length.
    parent_chunk: Option<&'c ChunkRef>,
    /// Whether this chunk may be coded as a delta (not in keyframe commits).
    allow_delta: bool,
    /// Offset in the new commit's reconstruction cache.
    cache_offset: Option<u64>,
}

pub fn commit(
    root: &Path,
    dir: &Path,
    options: &CommitOptions,
    progress: &dyn Progress,
) -> anyhow::Result<CommitOutcome> {
    validate_branch_name(options.branch.as_deref())?;
    let checkpoint = Checkpoint::open_excluding(dir, Some(root))?;
    let (store, target) =
        Store::open_write(root, options.lock_wait, |view| check_target(view, options))?;
    let config = store.config()?;
    let parent_record = target.parent.as_ref().map(|(_, r)| r);
    let keyframe = options.force_keyframe
        || parent_record.is_none_or(|p| p.chain_depth + 1 >= config.keyframe_interval);

    let (jobs, layout) = plan_jobs(
        &checkpoint,
        config.chunk_bytes as u64,
        parent_record,
        !keyframe,
    );
    let cache = CacheWriter::create(&store.cache_dir(), layout.total()).with_context(|| {
        format!(
            "cannot create the reconstruction cache in {}",
            store.cache_dir().display()
        )
    })?;
    let reconstructor = Reconstructor::new(&store);
    let parent_id = target.parent.as_ref().map(|(id, _)| *id);

    progress.begin("commit", jobs.iter().map(|j| j.len).sum());
    let encoded: anyhow::Result<Vec<(ChunkRef, bool)>> = jobs
        .par_iter()
        .map(|job| {
            let result = encode_job(&store, &reconstructor, parent_id.as_ref(), &cache, job);
            progress.advance(job.len);
            result
        })
        .collect();
    progress.finish();
    let encoded = match encoded {
        Ok(encoded) => encoded,
        Err(e) => {
            cache.abandon();
            return Err(e);
        }
    };

    let (new_blobs, stored_bytes) = new_blob_totals(&encoded);
    store.flush_blobs()?;

    let chain_depth = if keyframe {
        0
    } else {
        parent_record.map_or(0, |p| p.chain_depth + 1)
    };
    let record = CommitRecord {
        version: COMMIT_VERSION,
        parents: parent_id.into_iter().collect(),
        branch: target.branch,
        step: options.step,
        time_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        message: options.message.clone(),
        keyframe,
        chain_depth,
        input_bytes: checkpoint.total_bytes(),
        stored_bytes,
        files: assemble_manifest(&checkpoint, &jobs, encoded),
    };
    let id = store.publish_commit(&record)?;

    // The commit is durable; the cache is a best-effort accelerator.
    if cache.finish(&id).is_ok() {
        let tips: Vec<ObjectId> = store.branches()?.into_iter().map(|(_, id)| id).collect();
        tipcache::prune(&store.cache_dir(), &tips);
    }
    Ok(CommitOutcome {
        id,
        record,
        new_blobs,
    })
}

fn validate_branch_name(branch: Option<&str>) -> anyhow::Result<()> {
    let Some(name) = branch else { return Ok(()) };
    let ok = !name.is_empty()
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        && !name.contains("..")
        && !name.contains('@');
    if !ok {
        bail!("invalid branch name `{name}`: use letters, digits, `-`, `_`, `.` and `/`");
    }
    Ok(())
}

fn check_target(view: &Store, options: &CommitOptions) -> anyhow::Result<Target> {
    let branch = match &options.branch {
        Some(b) => b.clone(),
        None => view.head_branch()?,
    };
    if let Some(existing) = view.commit_at_step(&branch, options.step)? {
        bail!(
            "step {} already exists on branch `{branch}` (commit {})",
            options.step,
            existing.short()
        );
    }
    let parent = match view.branch_tip(&branch)? {
        Some(id) => {
            let record = view
                .get_commit(&id)?
                .with_context(|| format!("tip {id} of branch `{branch}` is missing"))?;
            if options.step < record.step {
                bail!(
                    "step {} is lower than the tip of branch `{branch}` (step {}); commit later steps only, or use another --branch for a restart",
                    options.step,
                    record.step
                );
            }
            Some((id, record))
        }
        None => None,
    };
    Ok(Target { branch, parent })
}

/// Cuts every input into chunks, pairing each tensor chunk with the parent's
/// chunk at the same position.
fn plan_jobs<'c>(
    checkpoint: &'c Checkpoint,
    chunk_bytes: u64,
    parent: Option<&'c CommitRecord>,
    allow_delta: bool,
) -> (Vec<Job<'c>>, CacheLayout) {
    let mut jobs = Vec::new();
    let mut layout = CacheLayout::default();
    for file in &checkpoint.files {
        match &file.kind {
            InputKind::Opaque => {
                for (offset, len) in chunk_ranges(0, file.len(), chunk_bytes) {
                    jobs.push(Job {
                        file,
                        offset,
                        len,
                        tensor: None,
                        elem_size: 1,
                        parent_chunk: None,
                        allow_delta: false,
                        cache_offset: None,
                    });
                }
            }
            InputKind::Safetensors(header) => {
                for tensor in &header.tensors {
                    let elem_size = element_size(tensor.dtype);
                    let chunk_len = (chunk_bytes / elem_size as u64).max(1) * elem_size as u64;
                    let start = layout.total();
                    layout.push(&file.name, &tensor.name, tensor.byte_len(), chunk_len);
                    let base = parent
                        .and_then(|p| p.tensor(&file.name, &tensor.name))
                        .filter(|t| t.dtype == tensor.dtype.to_string() && t.shape == tensor.shape);
                    let ranges = chunk_ranges(
                        header.data_start() + tensor.begin,
                        tensor.byte_len(),
                        chunk_len,
                    );
                    for (index, (offset, len)) in ranges.into_iter().enumerate() {
                        let parent_chunk = base
                            .and_then(|t| t.chunks.get(index))
                            .filter(|c| c.raw_len == len);
                        jobs.push(Job {
                            file,
                            offset,
                            len,
                            tensor: Some((tensor, index)),
                            elem_size,
                            parent_chunk,
                            allow_delta,
                            cache_offset: Some(start + index as u64 * chunk_len),
                        });
                    }
                }
            }
        }
    }
    (jobs, layout)
}

fn chunk_ranges(start: u64, len: u64, chunk: u64) -> Vec<(u64, u64)> {
    (0..len.div_ceil(chunk))
        .map(|i| (start + i * chunk, chunk.min(len - i * chunk)))
        .collect()
}

/// Encodes one chunk, writes its blob if new, and fills the cache.
/// Returns the chunk reference and whether its blob was new.
fn encode_job(
    store: &Store,
    reconstructor: &Reconstructor<'_>,
    parent: Option<&ObjectId>,
    cache: &CacheWriter,
    job: &Job<'_>,
) -> anyhow::Result<(ChunkRef, bool)> {
    // One private copy: the hash and the encoding see the same bytes even if
    // the input file is modified while we read it.
    let start = job.offset as usize;
    let raw = job.file.bytes()[start..start + job.len as usize].to_vec();
    job.file.release(start, job.len as usize);

    let raw_hash = ObjectId::of(&raw);
    if let Some(offset) = job.cache_offset {
        cache
            .write_at(offset, &raw)
            .context("cannot write the reconstruction cache")?;
    }
    // An unchanged chunk (a frozen layer, a repeated commit) reuses the
    // parent's reference verbatim: no new blob. A keyframe commit may only
    // reuse standalone references.
    if let Some(previous) = job.parent_chunk
        && previous.raw_hash == raw_hash
        && (job.allow_delta || !previous.codec.needs_base())
    {
        return Ok((previous.clone(), false));
    }
    let mut blob = match job.tensor {
        None => codec::encode_zstd(&raw),
        Some(_) => codec::encode_keyframe(&raw, job.elem_size),
    };
    let mut base = None;
    if let (Some((tensor, index)), Some(parent), Some(_), true) =
        (job.tensor, parent, job.parent_chunk, job.allow_delta)
    {
        let addr = ChunkAddr {
            file: &job.file.name,
            tensor: Some(&tensor.name),
            index,
        };
        let parent_raw = reconstructor.chunk(parent, addr)?;
        let delta = codec::encode_xor_delta(&raw, &parent_raw, job.elem_size);
        if delta.len() < blob.len() {
            blob = delta;
            base = Some(*parent);
        }
    }
    let header = codec::BlobHeader::parse(&blob).expect("we just encoded it");
    let id = ObjectId::of(&blob);
    let new = !store.has_blob(&id)?;
    if new {
        store.put_blob(&id, &blob)?;
    }
    Ok((
        ChunkRef {
            blob: id,
            codec: header.codec,
            raw_len: raw.len() as u64,
            stored_len: blob.len() as u64,
            raw_hash,
            base,
        },
        new,
    ))
}

/// Number and bytes of the distinct blobs this commit wrote (two identical
/// chunks in one commit may both have found their blob missing).
fn new_blob_totals(encoded: &[(ChunkRef, bool)]) -> (u64, u64) {
    let mut seen = HashSet::new();
    encoded
        .iter()
        .filter(|(c, new)| *new && seen.insert(c.blob))
        .fold((0, 0), |(n, bytes), (c, _)| (n + 1, bytes + c.stored_len))
}

/// Puts the encoded chunks (in job order) back into files and tensors.
fn assemble_manifest(
    checkpoint: &Checkpoint,
    jobs: &[Job<'_>],
    encoded: Vec<(ChunkRef, bool)>,
) -> Vec<FileEntry> {
    let mut chunks = jobs
        .iter()
        .zip(encoded.into_iter().map(|(c, _)| c))
        .peekable();
    let mut files = Vec::with_capacity(checkpoint.files.len());
    for file in &checkpoint.files {
        let mut take_while = |pred: &dyn Fn(&Job<'_>) -> bool| {
            let mut out = Vec::new();
            while let Some((job, _)) = chunks.peek() {
                if !std::ptr::eq(job.file, file) || !pred(job) {
                    break;
                }
                out.push(chunks.next().expect("peeked").1);
            }
            out
        };
        let content = match &file.kind {
            InputKind::Opaque => FileContent::Opaque {
                chunks: take_while(&|_| true),
            },
            InputKind::Safetensors(header) => FileContent::Safetensors {
                header: header.raw.clone(),
                tensors: header
                    .tensors
                    .iter()
                    .map(|t| TensorEntry {
                        name: t.name.clone(),
                        dtype: t.dtype.to_string(),
                        shape: t.shape.clone(),
                        chunks: take_while(&|job| {
                            job.tensor.is_some_and(|(jt, _)| std::ptr::eq(jt, t))
                        }),
                    })
                    .collect(),
            },
        };
        files.push(FileEntry {
            name: file.name.clone(),
            size: file.len(),
            content,
        });
    }
    files
}
