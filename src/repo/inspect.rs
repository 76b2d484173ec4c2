//! Read-only views of the history: `log`, `show` and `stats`, as plain data
//! that the CLI prints as a table or as JSON.

use crate::repo::Repo;
use serde::Serialize;

use super::rev::resolve;
use anyhow::Context;

use crate::store::object::UpdateTotals;
use crate::store::{CommitSummary, FileContent, ObjectId, TorchContent};

/// One line of `log`.
#[derive(Debug, Clone, Serialize)]
pub struct LogEntry {
    pub id: String,
    pub step: u64,
    pub branch: String,
    pub parents: Vec<String>,
    pub time_ms: u64,
    pub message: String,
    pub keyframe: bool,
    pub chain_depth: u32,
    /// Policy and parameters, e.g. `balanced(w_step=0.005, ...)`.
    pub policy: String,
    pub input_bytes: u64,
    pub stored_bytes: u64,
    /// input_bytes / stored_bytes (how much smaller this commit made its input).
    pub ratio: f64,
    /// Relative L2 errors of the lossy-coded W, m and v (0 when lossless).
    pub error_w: f32,
    pub error_m: f32,
    pub error_v: f32,
}

impl LogEntry {
    pub fn new(id: &ObjectId, record: &CommitSummary) -> LogEntry {
        LogEntry {
            id: id.to_hex(),
            step: record.step,
            branch: record.branch.clone(),
            parents: record.parents.iter().map(ObjectId::to_hex).collect(),
            time_ms: record.time_ms,
            message: record.message.clone(),
            keyframe: record.keyframe,
            chain_depth: record.chain_depth,
            policy: record.policy.describe(),
            input_bytes: record.input_bytes,
            stored_bytes: record.stored_bytes,
            ratio: ratio(record.input_bytes, record.stored_bytes),
            error_w: record.errors.w,
            error_m: record.errors.m,
            error_v: record.errors.v,
        }
    }
}

pub(crate) fn ratio(input: u64, stored: u64) -> f64 {
    if stored == 0 {
        if input == 0 { 1.0 } else { f64::INFINITY }
    } else {
        input as f64 / stored as f64
    }
}

/// History newest first: the first-parent chain from a branch tip (`branch`,
/// or the current branch), or with `all` every commit a branch or tag
/// reaches (children before parents).
pub fn log(store: &Repo, branch: Option<&str>, all: bool) -> anyhow::Result<Vec<LogEntry>> {
    let mut entries = Vec::new();
    if all {
        return Ok(super::walk::reachable_commits(store.backend())?
            .iter()
            .map(|(id, record)| LogEntry::new(id, &CommitSummary::from(record)))
            .collect());
    }
    let branch = match branch {
        Some(b) => b.to_string(),
        None => store.head_branch()?,
    };
    let tip = match store.branch_tip(&branch)? {
        Some(id) => id,
        None if store.branches()?.is_empty() => return Ok(entries),
        None => anyhow::bail!("no branch named `{branch}`"),
    };
    // Summaries only: a record's file list can be tens of kilobytes, and
    // a long run has thousands of commits. All of them in one scan when the
    // records are small, else parent by parent.
    let mut all = store.all_commit_summaries()?;
    let mut next = Some(tip);
    while let Some(id) = next {
        let summary = match all.as_mut() {
            Some(all) => all.remove(&id),
            None => store.get_commit_summary(&id)?,
        }
        .with_context(|| format!("commit {id} is missing from the store"))?;
        next = summary.first_parent();
        entries.push(LogEntry::new(&id, &summary));
    }
    Ok(entries)
}

/// One tensor (or opaque file) in `show`.
#[derive(Debug, Clone, Serialize)]
pub struct TensorReport {
    pub file: String,
    /// `None` for an opaque file.
    pub tensor: Option<String>,
    pub dtype: Option<String>,
    pub shape: Option<Vec<u64>>,
    /// Codecs of its chunks, e.g. `keyframe` or `xor-delta`, or both.
    pub codecs: Vec<String>,
    pub chunks: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Relative L2 error of the stored tensor (0 when lossless).
    pub rel_error: f32,
    /// For Adam's m and v: the relative error each put into Adam's update
    /// m / (√v + ε); for a weight: both together (its next update's error).
    /// `None` where not measured: lossless tensors, records before version 6.
    pub update_error: Option<f32>,
    /// For a file stored as opaque bytes that looks like a tensor file:
    /// that it was not read as one.
    pub note: Option<String>,
}

/// Why an opaque file may deserve a word in `show`: its name says it holds
/// tensors, yet it was stored byte for byte (its commit said why).
fn opaque_note(name: &str) -> Option<String> {
    let tensor_file = [".pt", ".pth", ".bin", ".ckpt", ".distcp", ".safetensors"]
        .iter()
        .any(|ext| name.ends_with(ext));
    tensor_file.then(|| {
        "stored byte for byte: not read as a tensor file (the commit's notes say why)".to_string()
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct ShowReport {
    #[serde(flatten)]
    pub commit: LogEntry,
    pub entries: Vec<TensorReport>,
    /// The relative error lossy coding put into Adam's update, over all
    /// lossy (W, m, v) groups: from m's error, from v's, from both. `None`
    /// where not measured (no lossy moments, or a record before version 6).
    pub update_error: Option<UpdateTotals>,
    /// For each optimizer file: which state entries were paired with which
    /// parameters (only paired entries are coded jointly with their weight).
    pub pairings: Vec<PairingReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PairingReport {
    pub file: String,
    pub rule: String,
    pub paired: Vec<PairedParam>,
    pub unpaired: Vec<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PairedParam {
    pub index: i64,
    pub name: String,
}

pub fn show(store: &Repo, rev: &str) -> anyhow::Result<ShowReport> {
    let id = resolve(store.backend(), rev)?;
    let record = store
        .get_commit(&id)?
        .ok_or_else(|| anyhow::anyhow!("commit {id} is missing"))?;
    let mut entries = Vec::new();
    let update_errors = record.update_errors.as_ref();
    for (fi, file) in record.files.iter().enumerate() {
        match &file.content {
            FileContent::Opaque { chunks } => entries.push(TensorReport {
                file: file.name.clone(),
                tensor: None,
                dtype: None,
                shape: None,
                codecs: codec_names(chunks.iter().map(|c| c.codec)),
                chunks: chunks.len(),
                bytes_in: file.size,
                bytes_out: chunks.iter().map(|c| c.stored_len).sum(),
                rel_error: 0.0,
                update_error: None,
                note: opaque_note(&file.name),
            }),
            FileContent::Safetensors { .. } | FileContent::Torch(_) => entries.extend(
                file.tensors()
                    .iter()
                    .enumerate()
                    .map(|(ti, t)| TensorReport {
                        file: file.name.clone(),
                        tensor: Some(t.name.clone()),
                        dtype: Some(t.dtype.clone()),
                        shape: Some(t.shape.clone()),
                        codecs: codec_names(t.chunks.iter().map(|c| c.codec)),
                        chunks: t.chunks.len(),
                        bytes_in: t.raw_bytes(),
                        bytes_out: t.stored_bytes(),
                        rel_error: t.rel_error,
                        update_error: update_errors.and_then(|u| u.of(fi, ti)),
                        note: None,
                    }),
            ),
        }
    }
    let pairings = record
        .files
        .iter()
        .filter_map(|f| match &f.content {
            FileContent::Torch(TorchContent {
                pairing: Some(p), ..
            }) => Some(PairingReport {
                file: f.name.clone(),
                rule: p.rule.clone(),
                paired: p
                    .paired
                    .iter()
                    .map(|(index, name)| PairedParam {
                        index: *index,
                        name: name.clone(),
                    })
                    .collect(),
                unpaired: p.unpaired.clone(),
            }),
            _ => None,
        })
        .collect();
    Ok(ShowReport {
        commit: LogEntry::new(&id, &CommitSummary::from(&record)),
        entries,
        update_error: update_errors.map(|u| u.totals),
        pairings,
    })
}

fn codec_names(codecs: impl Iterator<Item = crate::codec::Codec>) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for c in codecs {
        if !names.iter().any(|n| n == c.name()) {
            names.push(c.name().to_string());
        }
    }
    names
}

/// Store totals for `stats`.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub commits: u64,
    pub branches: u64,
    pub blobs: u64,
    /// Sum of every commit's input size: what keeping all checkpoints would cost.
    pub logical_bytes: u64,
    /// Sum of the encoded sizes of all blobs.
    pub blob_bytes: u64,
    /// Size of the store's database files on disk.
    pub physical_bytes: u64,
    /// Size of the reconstruction cache (deletable; not part of the store).
    pub cache_bytes: u64,
    /// logical_bytes / physical_bytes.
    pub ratio: f64,
}

pub fn stats(store: &Repo) -> anyhow::Result<Stats> {
    let ids = store.commit_ids()?;
    let mut logical = 0;
    for id in &ids {
        if let Some(record) = store.get_commit(id)? {
            logical += record.input_bytes;
        }
    }
    let (blobs, blob_bytes) = store.blob_totals()?;
    let physical = store.physical_bytes()?;
    Ok(Stats {
        commits: ids.len() as u64,
        branches: store.branches()?.len() as u64,
        blobs,
        logical_bytes: logical,
        blob_bytes,
        physical_bytes: physical,
        cache_bytes: crate::store::dir_size(&store.cache_dir(), &|_| true)?,
        ratio: ratio(logical, physical),
    })
}
