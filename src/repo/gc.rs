//! `gc`: mark what the refs reach, sweep the rest, give the space back.
//!
//! The plan is computed first and is all `--dry-run` shows:
//! 1. **mark** — from every branch tip and every tag, walk parents; every
//!    commit reached is live with all its blobs. A chunk coded against a
//!    commit outside that history (a base `prune` left behind) keeps that
//!    commit's record and only the chunk at the same position, and so on
//!    down its chain of bases;
//! 2. **sweep** — delete every commit record and blob not marked (records
//!    first, in one batch; then blobs, in one batch: a crash in between only
//!    leaves blobs that the next gc removes);
//! 3. **reclaim** — compact the database with blob garbage collection forced,
//!    so RocksDB deletes blob files that hold only swept payloads and rewrites
//!    the live part of mixed ones. Only then does `du` fall.
//!
//! gc holds the store's writer lock from planning to the end, and so does
//! every commit from its first blob write to publishing its record: a gc can
//! never see the blobs of a commit in progress, so it cannot sweep them.
//! Blobs of a commit that crashed are unreferenced and are swept.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::store::{ChunkRef, CommitRecord, FileContent, ObjectId, RefEdit, Store};

/// What a gc removes (or would, with `--dry-run`).
#[derive(Debug, Clone, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub live_commits: usize,
    pub live_blobs: usize,
    pub commits_removed: usize,
    pub blobs_removed: usize,
    /// Encoded bytes of the blobs removed.
    pub blob_bytes_removed: u64,
    /// Bytes of the store's database on disk before and after (equal for a
    /// dry run).
    pub disk_bytes_before: u64,
    pub disk_bytes_after: u64,
}

/// A chunk position, owned: (file, tensor or `None` for an opaque file,
/// chunk index).
pub type Position = (String, Option<String>, usize);

/// What branches and tags keep alive.
pub struct Reachable {
    /// Commits in the history of a branch or tag (through parents): every
    /// chunk of these is live.
    pub history: HashSet<ObjectId>,
    /// Commits outside that history that a live chunk is coded against
    /// (left behind by `prune`), with the only positions still needed.
    pub base_only: HashMap<ObjectId, HashSet<Position>>,
    pub blobs: HashSet<ObjectId>,
}

impl Reachable {
    pub fn keeps_commit(&self, id: &ObjectId) -> bool {
        self.history.contains(id) || self.base_only.contains_key(id)
    }

    /// Whether chunk `position` of commit `id` must stay decodable.
    pub fn needs_chunk(&self, id: &ObjectId, position: &Position) -> bool {
        self.history.contains(id)
            || self
                .base_only
                .get(id)
                .is_some_and(|positions| positions.contains(position))
    }
}

/// Every chunk of `record` with its position.
pub fn positioned_chunks(record: &CommitRecord) -> Vec<(Position, &ChunkRef)> {
    let mut out = Vec::new();
    for file in &record.files {
        match &file.content {
            FileContent::Opaque { chunks } => {
                out.extend(
                    chunks
                        .iter()
                        .enumerate()
                        .map(|(i, c)| ((file.name.clone(), None, i), c)),
                );
            }
            FileContent::Safetensors { .. } | FileContent::Torch(_) => {
                for t in file.tensors() {
                    out.extend(
                        t.chunks
                            .iter()
                            .enumerate()
                            .map(|(i, c)| ((file.name.clone(), Some(t.name.clone()), i), c)),
                    );
                }
            }
        }
    }
    out
}

/// Marks everything reachable from every branch and tag: their history in
/// full, and, chunk by chunk, the residual bases those chunks are coded
/// against. Fails if a reachable commit is missing or unreadable: sweeping
/// on a damaged graph could delete what a lost record would have kept (run
/// `fsck`).
pub fn reachable(store: &Store) -> anyhow::Result<Reachable> {
    let mut stack = store.root_commits()?;
    let mut history = HashSet::new();
    let mut records: HashMap<ObjectId, CommitRecord> = HashMap::new();
    let load = |id: &ObjectId| -> anyhow::Result<CommitRecord> {
        store
            .get_commit(id)?
            .with_context(|| format!("reachable commit {id} is missing; run `ckptvc fsck`"))
    };
    while let Some(id) = stack.pop() {
        if !history.insert(id) {
            continue;
        }
        let record = load(&id)?;
        stack.extend(record.parents.iter().copied());
        records.insert(id, record);
    }
    let mut blobs = HashSet::new();
    let mut bases: Vec<(ObjectId, Position)> = Vec::new();
    for record in records.values() {
        for (position, chunk) in positioned_chunks(record) {
            blobs.insert(chunk.blob);
            if let Some(base) = chunk.base.filter(|b| !history.contains(b)) {
                bases.push((base, position));
            }
        }
    }
    let mut base_only: HashMap<ObjectId, HashSet<Position>> = HashMap::new();
    while let Some((id, position)) = bases.pop() {
        if !base_only.entry(id).or_default().insert(position.clone()) {
            continue;
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = records.entry(id) {
            slot.insert(load(&id)?);
        }
        let chunk = positioned_chunks(&records[&id])
            .into_iter()
            .find(|(p, _)| *p == position)
            .map(|(_, c)| c.clone())
            .with_context(|| {
                format!("commit {id}, a residual base, lacks the chunk coded against it; run `ckptvc fsck`")
            })?;
        blobs.insert(chunk.blob);
        if let Some(base) = chunk.base.filter(|b| !history.contains(b)) {
            bases.push((base, position));
        }
    }
    Ok(Reachable {
        history,
        base_only,
        blobs,
    })
}

struct Sweep {
    commits: Vec<ObjectId>,
    blobs: Vec<ObjectId>,
    blob_bytes: u64,
    live_commits: usize,
    live_blobs: usize,
}

fn plan(store: &Store) -> anyhow::Result<Sweep> {
    let live = reachable(store)?;
    let commits: Vec<ObjectId> = store
        .commit_ids()?
        .into_iter()
        .filter(|id| !live.keeps_commit(id))
        .collect();
    let mut blobs = Vec::new();
    let mut blob_bytes = 0;
    for (id, size) in store.blob_sizes()? {
        if !live.blobs.contains(&id) {
            blobs.push(id);
            blob_bytes += size;
        }
    }
    Ok(Sweep {
        commits,
        blobs,
        blob_bytes,
        live_commits: live.history.len() + live.base_only.len(),
        live_blobs: live.blobs.len(),
    })
}

pub fn gc(root: &Path, dry_run: bool, wait: Duration) -> anyhow::Result<GcReport> {
    if dry_run {
        let store = Store::open_read(root)?;
        let sweep = plan(&store)?;
        let disk = store.physical_bytes()?;
        return Ok(report(&sweep, true, disk, disk));
    }
    let (store, sweep) = Store::open_write(root, wait, plan)?;
    let before = store.physical_bytes()?;
    sweep_and_reclaim(&store, &sweep)?;
    let after = store.physical_bytes()?;
    Ok(report(&sweep, false, before, after))
}

/// Runs a full gc on a store already open for writing (used by `prune`).
pub fn gc_locked(store: &Store) -> anyhow::Result<GcReport> {
    let sweep = plan(store)?;
    let before = store.physical_bytes()?;
    sweep_and_reclaim(store, &sweep)?;
    Ok(report(&sweep, false, before, store.physical_bytes()?))
}

fn sweep_and_reclaim(store: &Store, sweep: &Sweep) -> anyhow::Result<()> {
    // Readers opening meanwhile would find files gone; those already open
    // may fail on a blob file gc deletes (an error, never wrong data).
    let _view = store.hold_readers()?;
    if !sweep.commits.is_empty() {
        store.apply(&RefEdit {
            delete_commits: sweep.commits.clone(),
            ..RefEdit::default()
        })?;
    }
    if !sweep.blobs.is_empty() {
        store.delete_blobs(&sweep.blobs)?;
    }
    store.reclaim_space()?;
    super::tipcache::prune_to_branch_tips(store);
    Ok(())
}

fn report(sweep: &Sweep, dry_run: bool, before: u64, after: u64) -> GcReport {
    GcReport {
        dry_run,
        live_commits: sweep.live_commits,
        live_blobs: sweep.live_blobs,
        commits_removed: sweep.commits.len(),
        blobs_removed: sweep.blobs.len(),
        blob_bytes_removed: sweep.blob_bytes,
        disk_bytes_before: before,
        disk_bytes_after: after,
    }
}
