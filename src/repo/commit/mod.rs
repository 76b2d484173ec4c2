//! `commit`: one checkpoint directory in, one commit out.
//!
//! The order of work is what keeps the store safe:
//! 1. every input file is opened and validated before the store is touched;
//! 2. under the writer lock, branch and step are checked on a read-only view,
//!    so a refused commit leaves every store file as it was;
//! 3. chunks are encoded in parallel and new blobs written, then flushed;
//! 4. the commit record, branch tip, step index and HEAD go in one synced
//!    batch: the commit becomes visible all at once or not at all.
//!
//! Lossy policies code each weight with its Adam moments as a group. The
//! tuned policies plan each chunk from its own statistics, in the one pass
//! that codes it; ExCP plans from whole tensors, so it first makes a parallel
//! statistics pass over every group chunk.

mod lossless;
mod lossy;
mod plan;
mod shard;

use crate::repo::Repo;
use crate::repo::error::RepoError;
use crate::repo::inspect::LogEntry;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use rayon::prelude::*;

use super::history::validate_ref_name;
use super::progress::Progress;
use super::reconstruct::Reconstructor;
use super::rev::resolve;
use super::tipcache::{self, CacheWriter, SourceMapWriter};
use super::walk::ancestry_steps;
use crate::codec::{self, policy::Policy};
use crate::format::safetensors::TensorInfo;
use crate::format::{Checkpoint, InputKind};
#[cfg(test)]
use crate::store::object::COMMIT_VERSION;
use crate::store::object::{
    ErrorTotals, TensorUpdateError, UpdateErrors, UpdateTotals, version_for,
};
use crate::store::pending::BlobSink;
use crate::store::{
    ChunkRef, CommitRecord, FileContent, FileEntry, ObjectId, PairingRecord, StoreConfig,
    TensorEntry, TorchContent,
};
use plan::{OPAQUE, Plan, Work};

pub use plan::MIN_LOSSY_ELEMENTS;
pub use shard::{ShardOutcome, commit_shard, open_shard_input};

#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    pub step: u64,
    /// `None`: the current branch (HEAD).
    pub branch: Option<String>,
    /// Where a new branch forks from (a revision); `None`: the current
    /// branch's tip. Refused for a branch that exists.
    pub parent: Option<String>,
    pub message: String,
    /// Encode every chunk standalone, losslessly.
    pub force_keyframe: bool,
    /// `None`: the store's default policy.
    pub policy: Option<Policy>,
    /// How long to wait for another writer to finish.
    pub lock_wait: Duration,
}

/// What the commit produced: its log entry plus what this run did
/// (`--json` prints it).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CommitOutcome {
    #[serde(skip)]
    pub id: ObjectId,
    #[serde(skip)]
    pub record: CommitRecord,
    #[serde(flatten)]
    pub entry: LogEntry,
    /// Blobs written (not already in the store).
    pub new_blobs: u64,
    /// Parent chunks (delta bases) read from the reconstruction cache, and
    /// decoded from blobs because the cache did not have them: a commit
    /// along a branch with an intact cache decodes none.
    pub bases_from_cache: u64,
    pub bases_decoded: u64,
    /// What the user should know about the input, e.g. a `.pt` file kept as
    /// opaque bytes because it could not be read as a torch file.
    pub notes: Vec<String>,
}

/// The branch tip a commit builds on, checked before any write.
struct Target {
    branch: String,
    parent: Option<(ObjectId, CommitRecord)>,
    /// Step-index entries a new branch takes over from its fork point.
    inherited_steps: Vec<(u64, ObjectId)>,
}

/// What the encoding passes share.
pub(crate) struct Session<'s> {
    /// Where new blobs go: the store, or a shard's staging area.
    sink: &'s dyn BlobSink,
    reconstructor: Reconstructor<'s>,
    parent: Option<ObjectId>,
    /// `None` for a keyframe commit (see [`commit`]).
    cache: Option<CacheWriter>,
    /// For a keyframe commit: where its chunks are in the input files.
    sources: Option<SourceMapWriter>,
    allow_delta: bool,
}

/// One encoded chunk, keyed by (file index, tensor index or OPAQUE, chunk).
pub(crate) struct Encoded {
    key: (usize, usize, usize),
    chunk: ChunkRef,
    new: bool,
    /// (Σ squared error, Σ squared input) for lossy chunks.
    error: Option<(f64, f64)>,
    /// For lossy chunks of Adam's W, m and v: (Σ squared error, Σ squared
    /// value) of Adam's update (see `lossy::chunk_errors`).
    update_error: Option<(f64, f64)>,
}

impl Session<'_> {
    /// Writes a chunk's reconstruction into this commit's cache, if it has
    /// one. Call only after the parent's chunk was read: the cache may be the
    /// parent's file, overwritten in place ([`CacheWriter::reuse`]).
    fn cache_chunk(&self, offset: u64, reconstruction: &[u8]) -> anyhow::Result<()> {
        match &self.cache {
            Some(cache) => cache
                .write_at(offset, reconstruction)
                .context("cannot write the reconstruction cache"),
            None => Ok(()),
        }
    }

    /// Notes where a keyframe's chunk is in its input file, if this commit
    /// keeps a source map; `raw` is what the record's raw hash covers.
    fn note_source(&self, slot: &plan::TensorSlot<'_>, index: usize, raw: &[u8]) {
        if let Some(sources) = &self.sources {
            let (file_offset, _) = slot.chunk_range(index);
            sources.note(slot.cache_offset(index), raw, slot.file_index, file_offset);
        }
    }

    /// Stores `blob` if new and describes the chunk whose decoded bytes are
    /// `raw` (for lossy chunks: the reconstruction).
    fn finish_chunk(
        &self,
        key: (usize, usize, usize),
        raw: &[u8],
        blob: Vec<u8>,
        base: Option<ObjectId>,
        raw_hash: Option<ObjectId>,
    ) -> anyhow::Result<Encoded> {
        let header = codec::BlobHeader::parse(&blob).expect("we just encoded it");
        let id = ObjectId::of(&blob);
        let new = !self.sink.has_blob(&id)?;
        if new {
            self.sink.put_blob(&id, &blob)?;
        }
        Ok(Encoded {
            key,
            chunk: ChunkRef {
                blob: id,
                codec: header.codec,
                raw_len: raw.len() as u64,
                stored_len: blob.len() as u64,
                raw_hash: raw_hash.unwrap_or_else(|| ObjectId::of(raw)),
                base,
            },
            new,
            error: None,
            update_error: None,
        })
    }
}

pub fn commit(
    repo: &Repo,
    dir: &Path,
    options: &CommitOptions,
    progress: &dyn Progress,
) -> anyhow::Result<CommitOutcome> {
    commit_checkpoint(repo, &open_input(repo, dir)?, options, progress)
}

/// Opens a checkpoint directory to commit into `repo` (a store kept inside
/// the directory is not part of it).
pub fn open_input(repo: &Repo, dir: &Path) -> anyhow::Result<Checkpoint> {
    Ok(Checkpoint::open_excluding(dir, repo.local_root())?)
}

/// Commits a checkpoint already opened: a directory's, or one assembled in
/// memory ([`crate::format::MemoryCheckpoint`]), which commits without a
/// file being written.
pub fn commit_checkpoint(
    repo: &Repo,
    checkpoint: &Checkpoint,
    options: &CommitOptions,
    progress: &dyn Progress,
) -> anyhow::Result<CommitOutcome> {
    if let Some(branch) = &options.branch {
        validate_ref_name("branch", branch)?;
    }
    let (store, target) = repo.write(options.lock_wait, |view| check_target(view, options))?;
    let config = store.config()?;
    let policy = options
        .policy
        .clone()
        .unwrap_or_else(|| config.policy.clone().current());
    let parent_record = target.parent.as_ref().map(|(_, r)| r);
    let keyframe = options.force_keyframe
        || parent_record.is_none_or(|p| needs_keyframe(p, checkpoint.total_bytes(), &config));

    let plan = plan::plan(
        checkpoint,
        config.chunk_bytes as u64,
        parent_record,
        !keyframe && !policy.is_lossless(),
    );
    // A keyframe from files writes no cache file: its reconstruction is its
    // input, so a source map (where each chunk is in the input files) serves
    // the next commit while those files are unchanged, and its chunks decode
    // on their own from blobs when they are not. A copy would be a second
    // pass of the checkpoint through the page cache (docs/benchmarks.md).
    // Residual commits keep a cache, since decoding them means replaying
    // the chain. The source map is best effort, like the cache.
    // Buffers in memory have no file to map back to: a keyframe committed
    // from memory writes the cache a residual commit writes. Without it the
    // next commit decoded the keyframe from its blobs, which took longer
    // than the copy (docs/benchmarks.md, "Fifth round").
    let on_disk = checkpoint.files.iter().all(|f| f.on_disk());
    let (cache, sources) = if keyframe && on_disk {
        let paths: Vec<&Path> = checkpoint.files.iter().map(|f| f.path.as_path()).collect();
        (None, SourceMapWriter::new(&store.cache_dir(), &paths).ok())
    } else {
        (Some(cache_writer(&store, &target, &plan.layout)?), None)
    };
    let sink = store.backend().commit_sink(checkpoint.total_bytes())?;
    let mut session = Session {
        sink: sink.as_ref(),
        reconstructor: Reconstructor::new(&store),
        parent: target.parent.as_ref().map(|(id, _)| *id),
        cache,
        sources,
        allow_delta: !keyframe,
    };

    let encoded = encode_or_abandon(&mut session, &plan, &policy, progress)?;
    let (new_blobs, stored_bytes) = new_blob_totals(&encoded);
    let view = store.hold_readers()?;
    sink.finish()?;

    let tensor_errors = tensor_errors(&encoded);
    let errors = error_totals(&plan, &tensor_errors);
    let update_sums = tensor_update_errors(&encoded);
    let update_errors = update_errors(&update_sums, role_sums(&plan, &update_sums));
    let files = assemble_manifest(checkpoint, encoded, &tensor_errors);
    let policy = if keyframe { Policy::Lossless } else { policy };
    let record = CommitRecord {
        version: version_for(&files, &policy, update_errors.as_ref()),
        parents: session.parent.into_iter().collect(),
        branch: target.branch.clone(),
        step: options.step,
        time_ms: crate::repo::seal::now_ms(),
        message: options.message.clone(),
        keyframe,
        chain_depth: if keyframe {
            0
        } else {
            parent_record.map_or(0, |p| p.chain_depth + 1)
        },
        policy,
        input_bytes: checkpoint.total_bytes(),
        stored_bytes,
        errors,
        files,
        update_errors,
    };
    let id = store.publish_commit(&record, &target.inherited_steps)?;
    drop(view);

    // The commit is durable; the cache is a best-effort accelerator.
    let sources_written = session.sources.is_none_or(|map| map.finish(&id).is_ok());
    if sources_written && session.cache.is_none_or(|cache| cache.finish(&id).is_ok()) {
        tipcache::prune_to_branch_tips(&store);
    }
    let (bases_from_cache, bases_decoded) = session.reconstructor.sources();
    Ok(CommitOutcome {
        entry: LogEntry::new(&id, &(&record).into()),
        id,
        record,
        new_blobs,
        bases_from_cache,
        bases_decoded,
        notes: checkpoint.notes.clone(),
    })
}

/// Where this commit's reconstruction cache goes: over the parent's, when
/// the parent is the tip of this branch and of no other (so its cache would
/// be dropped after the commit) and the layouts match; else a new file.
fn cache_writer(
    store: &Repo,
    target: &Target,
    layout: &tipcache::CacheLayout,
) -> anyhow::Result<CacheWriter> {
    if let Some((parent, record)) = &target.parent
        && target.inherited_steps.is_empty()
        && store
            .branches()?
            .iter()
            .all(|(branch, tip)| tip != parent || *branch == target.branch)
        && tipcache::CacheLayout::of_record(record) == *layout
        && let Some(writer) = CacheWriter::reuse(&store.cache_dir(), parent, layout)
    {
        return Ok(writer);
    }
    CacheWriter::create(&store.cache_dir(), layout.total()).with_context(|| {
        format!(
            "cannot create the reconstruction cache in {}",
            store.cache_dir().display()
        )
    })
}

/// [`encode_all`]; on failure the commit's half-written cache file goes.
fn encode_or_abandon(
    session: &mut Session<'_>,
    plan: &Plan<'_>,
    policy: &Policy,
    progress: &dyn Progress,
) -> anyhow::Result<Vec<Encoded>> {
    let encoded = encode_all(session, plan, policy, progress);
    if encoded.is_err()
        && let Some(cache) = session.cache.take()
    {
        cache.abandon();
    }
    encoded
}

/// Every chunk, after the whole-tensor plans of the policies that need them.
fn encode_all(
    session: &Session<'_>,
    plan: &Plan<'_>,
    policy: &Policy,
    progress: &dyn Progress,
) -> anyhow::Result<Vec<Encoded>> {
    let total: u64 = plan.work.iter().map(|w| w.input_bytes(plan)).sum();
    let tensor_plans = if policy.plans_per_tensor() {
        whole_tensor_plans(session, plan, policy)?
    } else {
        vec![None; plan.groups.len()]
    };

    progress.begin("commit", total);
    let encoded: anyhow::Result<Vec<Vec<Encoded>>> = plan
        .work
        .par_iter()
        .map(|work| {
            let result = match *work {
                Work::Opaque {
                    file,
                    file_index,
                    index,
                    offset,
                    len,
                } => lossless::encode_opaque(session, file, (file_index, index), offset, len)
                    .map(|e| vec![e]),
                Work::Tensor { slot, index } => {
                    lossless::encode_tensor(session, &plan.slots[slot], index).map(|e| vec![e])
                }
                Work::Group { group, index } => lossy::encode_chunk(
                    session,
                    plan,
                    policy,
                    plan.groups[group],
                    tensor_plans[group].as_ref(),
                    index,
                ),
            };
            progress.advance(work.input_bytes(plan));
            result
        })
        .collect();
    progress.finish();
    Ok(encoded?.into_iter().flatten().collect())
}

/// The statistics pass of policies that plan from whole tensors (ExCP's
/// median and codebooks): every group chunk read once more before any is
/// coded.
fn whole_tensor_plans(
    session: &Session<'_>,
    plan: &Plan<'_>,
    policy: &Policy,
) -> anyhow::Result<Vec<Option<codec::policy::TensorPlan>>> {
    let group_stats: Vec<_> = plan
        .work
        .par_iter()
        .filter_map(|work| match *work {
            Work::Group { group, index } => Some(
                lossy::chunk_stats(session, plan, plan.groups[group], index).map(|s| (group, s)),
            ),
            _ => None,
        })
        .collect::<anyhow::Result<_>>()?;
    let mut per_group: Vec<Vec<_>> = vec![Vec::new(); plan.groups.len()];
    for (group, stats) in group_stats {
        per_group[group].push(stats);
    }
    per_group
        .into_iter()
        .enumerate()
        .map(|(group, stats)| {
            lossy::plan_group(plan, plan.groups[group], policy, stats)
                .context("lossy group without a lossy policy")
                .map(Some)
        })
        .collect()
}

/// Decoding speed assumed for the replay estimate, input bytes per second
/// per link of the chain: on the development machine (2 cores) a link of a
/// 3 GiB chain decodes at ~1 GB/s (docs/benchmarks.md, checkout). Half of
/// that, to stay conservative on slower or busier machines: a too-early
/// keyframe costs space, a too-late one costs every checkout.
const REPLAY_BYTES_PER_SEC: f64 = 500e6;

/// Chains shorter than this are never cut for the replay budget: for a
/// checkpoint so large that one link alone exceeds the budget, keyframing
/// every commit would give up the residuals entirely.
const MIN_CHAIN: u64 = 4;

/// Keyframes are expensive (a lossless fp32 keyframe is ~1.2× smaller than
/// its input, a residual 10–50×), so they come when the chain gets too long
/// to replay within the budget (after at least `MIN_CHAIN` links), or at the
/// configured maximum length.
fn needs_keyframe(parent: &CommitRecord, input_bytes: u64, config: &StoreConfig) -> bool {
    let depth = parent.chain_depth as u64 + 1;
    let replay_ms = (depth + 1) as f64 * input_bytes as f64 / REPLAY_BYTES_PER_SEC * 1000.0;
    depth >= config.keyframe_interval as u64
        || (depth >= MIN_CHAIN && replay_ms > config.replay_budget_ms as f64)
}

fn check_target(view: &Repo, options: &CommitOptions) -> anyhow::Result<Target> {
    let branch = match &options.branch {
        Some(b) => b.clone(),
        None => view.head_branch()?,
    };
    if let Some(existing) = view.commit_at_step(&branch, options.step)? {
        return Err(RepoError::StepExists {
            branch,
            step: options.step,
            commit: existing.short(),
        }
        .into());
    }
    let tip = view.branch_tip(&branch)?;
    if let (Some(tip), Some(rev)) = (tip, &options.parent) {
        bail!(
            "branch `{branch}` exists (tip {}); a parent ({rev}) only says where a new branch starts",
            tip.short()
        );
    }
    let is_new = tip.is_none();
    let fork_point = match (tip, &options.parent) {
        (Some(tip), _) => Some(tip),
        (None, Some(rev)) => Some(resolve(view.backend(), rev)?),
        (None, None) => {
            let head = view.head_branch()?;
            if head == branch {
                None
            } else {
                view.branch_tip(&head)?
            }
        }
    };
    let parent = match fork_point {
        Some(id) => {
            let record = view
                .get_commit(&id)?
                .with_context(|| format!("commit {id} (parent of the new commit) is missing"))?;
            if options.step < record.step {
                bail!(
                    "step {} is lower than step {} of its parent {} on branch `{branch}`; commit later steps only, or start a new branch from an earlier commit for a restart",
                    options.step,
                    record.step,
                    id.short()
                );
            }
            Some((id, record))
        }
        None => None,
    };
    let inherited_steps = match (&parent, is_new) {
        (Some((id, _)), true) => ancestry_steps(view.backend(), *id)?,
        _ => Vec::new(),
    };
    if let Some((_, ancestor)) = inherited_steps.iter().find(|(s, _)| *s == options.step) {
        return Err(RepoError::StepExists {
            branch,
            step: options.step,
            commit: format!("{}, inherited from where it forks", ancestor.short()),
        }
        .into());
    }
    Ok(Target {
        branch,
        parent,
        inherited_steps,
    })
}

/// Number and bytes of the distinct blobs this commit wrote (two identical
/// chunks in one commit may both have found their blob missing).
fn new_blob_totals(encoded: &[Encoded]) -> (u64, u64) {
    let mut seen = HashSet::new();
    encoded
        .iter()
        .filter(|e| e.new && seen.insert(e.chunk.blob))
        .fold((0, 0), |(n, bytes), e| (n + 1, bytes + e.chunk.stored_len))
}

/// (Σ squared error, Σ squared input) per lossy tensor, keyed by
/// (file index, tensor index).
type ErrorSums = BTreeMap<(usize, usize), (f64, f64)>;

fn tensor_errors(encoded: &[Encoded]) -> ErrorSums {
    tensor_sums(encoded, |e| e.error)
}

/// (Σ squared change, Σ squared value) of Adam's update per lossy tensor
/// of a (W, m, v) group (see `lossy::chunk_errors`).
fn tensor_update_errors(encoded: &[Encoded]) -> ErrorSums {
    tensor_sums(encoded, |e| e.update_error)
}

fn tensor_sums(encoded: &[Encoded], pick: impl Fn(&Encoded) -> Option<(f64, f64)>) -> ErrorSums {
    let mut sums = BTreeMap::new();
    for e in encoded {
        if let Some((err, norm)) = pick(e) {
            let entry = sums.entry((e.key.0, e.key.1)).or_insert((0.0, 0.0));
            entry.0 += err;
            entry.1 += norm;
        }
    }
    sums
}

/// √(err / norm) as a record stores it: 0 for a zero norm, and one NaN for
/// every NaN (which operand's NaN a sum passes on can differ between the
/// vector and the plain kernels, and records must not).
pub(crate) fn relative(err: f64, norm: f64) -> f32 {
    let r = if norm > 0.0 {
        (err / norm).sqrt() as f32
    } else {
        0.0
    };
    if r.is_nan() { f32::NAN } else { r }
}

/// (Σ squared error, Σ squared input) of all lossy-coded W, m and v.
fn role_sums(plan: &Plan<'_>, sums: &ErrorSums) -> [(f64, f64); 3] {
    let role_total = |pick: fn(&plan::Group) -> usize| {
        plan.groups.iter().fold((0.0, 0.0), |acc, g| {
            let slot = &plan.slots[pick(g)];
            let (e, n) = sums
                .get(&(slot.file_index, slot.tensor_index))
                .copied()
                .unwrap_or_default();
            (acc.0 + e, acc.1 + n)
        })
    };
    [
        role_total(|g| g.w),
        role_total(|g| g.m),
        role_total(|g| g.v),
    ]
}

/// A record's update errors from the per-tensor sums and the per-role
/// ones (W's role holds both moments' error together); `None` when no
/// tensor has any, so that such a record keeps its older version.
fn update_errors(tensors: &ErrorSums, roles: [(f64, f64); 3]) -> Option<UpdateErrors> {
    if tensors.is_empty() {
        return None;
    }
    Some(UpdateErrors {
        totals: update_totals(roles),
        tensors: relative_per_tensor(tensors),
    })
}

/// The commit's update errors from the per-role sums (W's role holds both
/// moments' error together).
pub(crate) fn update_totals(roles: [(f64, f64); 3]) -> UpdateTotals {
    let [both, m, v] = roles.map(|(e, n)| relative(e, n));
    UpdateTotals { m, v, both }
}

/// Each tensor's relative error from its sums, in (file, tensor) order.
fn relative_per_tensor(sums: &ErrorSums) -> Vec<TensorUpdateError> {
    sums.iter()
        .map(|(&(file, tensor), &(e, n))| TensorUpdateError {
            file: file as u32,
            tensor: tensor as u32,
            error: relative(e, n),
        })
        .collect()
}

/// Relative L2 errors of all lossy-coded W, m and v together.
fn error_totals(plan: &Plan<'_>, sums: &ErrorSums) -> ErrorTotals {
    let [w, m, v] = role_sums(plan, sums).map(|(e, n)| relative(e, n));
    ErrorTotals { w, m, v }
}

/// Puts the encoded chunks back into files and tensors.
fn assemble_manifest(
    checkpoint: &Checkpoint,
    encoded: Vec<Encoded>,
    errors: &ErrorSums,
) -> Vec<FileEntry> {
    let mut chunks: BTreeMap<(usize, usize, usize), ChunkRef> =
        encoded.into_iter().map(|e| (e.key, e.chunk)).collect();
    let mut take = |file: usize, tensor: usize| -> Vec<ChunkRef> {
        let keys: Vec<_> = chunks
            .range((file, tensor, 0)..=(file, tensor, usize::MAX))
            .map(|(k, _)| *k)
            .collect();
        keys.iter().filter_map(|k| chunks.remove(k)).collect()
    };
    let mut files = Vec::with_capacity(checkpoint.files.len());
    for (fi, file) in checkpoint.files.iter().enumerate() {
        let content = match &file.kind {
            InputKind::Opaque => FileContent::Opaque {
                chunks: take(fi, OPAQUE),
            },
            InputKind::Safetensors(header) => FileContent::Safetensors {
                header: header.raw.clone(),
                tensors: tensor_entries(fi, &header.tensors, errors, &mut take),
            },
            InputKind::Torch(torch) => FileContent::Torch(TorchContent {
                skeleton: skeleton(file.bytes(), &torch.tensors),
                tensors: tensor_entries(fi, &torch.tensors, errors, &mut take),
                offsets: torch.tensors.iter().map(|t| t.begin).collect(),
                crc_fields: torch.crc_fields.clone(),
                pairing: checkpoint.pairings.get(&fi).map(|p| PairingRecord {
                    rule: p.rule.clone(),
                    paired: p.paired.clone(),
                    unpaired: p.unpaired.clone(),
                }),
            }),
        };
        files.push(FileEntry {
            name: file.name.clone(),
            size: file.len(),
            content,
        });
    }
    files
}

fn tensor_entries(
    fi: usize,
    tensors: &[TensorInfo],
    errors: &ErrorSums,
    take: &mut impl FnMut(usize, usize) -> Vec<ChunkRef>,
) -> Vec<TensorEntry> {
    tensors
        .iter()
        .enumerate()
        .map(|(ti, t)| TensorEntry {
            name: t.name.clone(),
            dtype: t.dtype.to_string(),
            shape: t.shape.clone(),
            rel_error: errors.get(&(fi, ti)).map_or(0.0, |&(e, n)| relative(e, n)),
            chunks: take(fi, ti),
        })
        .collect()
}

/// The bytes of `file` outside `tensors` (sorted by offset, absolute).
fn skeleton(file: &[u8], tensors: &[TensorInfo]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = 0usize;
    for t in tensors {
        out.extend_from_slice(&file[at..t.begin as usize]);
        at = t.end as usize;
    }
    out.extend_from_slice(&file[at..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parent(chain_depth: u32) -> CommitRecord {
        CommitRecord {
            version: COMMIT_VERSION,
            parents: vec![],
            branch: "main".into(),
            step: 0,
            time_ms: 0,
            message: String::new(),
            keyframe: chain_depth == 0,
            chain_depth,
            policy: Policy::Lossless,
            input_bytes: 0,
            stored_bytes: 0,
            errors: ErrorTotals::default(),
            files: vec![],
            update_errors: None,
        }
    }

    #[test]
    fn keyframes_come_from_the_replay_budget_or_the_cap() {
        let config = StoreConfig::default(); // cap 100, budget 60 s at 500 MB/s
        let small = 28_000_000; // a 2.3M-parameter model with Adam state
        assert!(!needs_keyframe(&parent(60), small, &config));
        assert!(needs_keyframe(&parent(99), small, &config), "the cap");
        let medium = 400_000_000;
        assert!(
            !needs_keyframe(&parent(70), medium, &config),
            "72 x 400 MB < 60 s"
        );
        assert!(
            needs_keyframe(&parent(74), medium, &config),
            "76 x 400 MB > 60 s"
        );
        let large = 4 << 30; // a 4 GiB checkpoint: 6 x 8.6 s fits, 7 do not
        assert!(!needs_keyframe(&parent(4), large, &config));
        assert!(needs_keyframe(&parent(5), large, &config));
        let huge = 64 << 30; // one link alone exceeds the budget: the minimum chain
        assert!(!needs_keyframe(&parent(2), huge, &config));
        assert!(needs_keyframe(&parent(3), huge, &config));
        let capped = StoreConfig {
            keyframe_interval: 3,
            ..StoreConfig::default()
        };
        assert!(!needs_keyframe(&parent(1), small, &capped));
        assert!(needs_keyframe(&parent(2), small, &capped));
    }
}
