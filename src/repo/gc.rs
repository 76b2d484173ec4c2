//! `gc`: mark what the refs reach, sweep the rest, give the space back.
//!
//! The plan is computed first and is all `--dry-run` shows:
//! 1. **mark** — from every branch tip and every tag, walk parents; every
//!    commit reached is live, and so is every blob its chunks name and every
//!    commit its chunks are coded against (a residual's `base`), since those
//!    are needed to decode it;
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

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::store::{ObjectId, RefEdit, Store};

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

/// The commits and blobs reachable from branches and tags.
pub struct Reachable {
    pub commits: HashSet<ObjectId>,
    pub blobs: HashSet<ObjectId>,
}

/// Marks everything reachable from every branch and tag. Fails if a
/// reachable commit is missing or unreadable: sweeping on a damaged graph
/// could delete what a lost record would have kept (run `fsck`).
pub fn reachable(store: &Store) -> anyhow::Result<Reachable> {
    let mut stack: Vec<ObjectId> = store
        .branches()?
        .into_iter()
        .chain(store.tags()?)
        .map(|(_, id)| id)
        .collect();
    let mut commits = HashSet::new();
    let mut blobs = HashSet::new();
    while let Some(id) = stack.pop() {
        if !commits.insert(id) {
            continue;
        }
        let record = store
            .get_commit(&id)?
            .with_context(|| format!("reachable commit {id} is missing; run `ckptvc fsck`"))?;
        stack.extend(record.parents.iter().copied());
        for chunk in record.chunks() {
            blobs.insert(chunk.blob);
            stack.extend(chunk.base);
        }
    }
    Ok(Reachable { commits, blobs })
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
        .filter(|id| !live.commits.contains(id))
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
        live_commits: live.commits.len(),
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
    let tips: Vec<ObjectId> = store.branches()?.into_iter().map(|(_, id)| id).collect();
    super::tipcache::prune(&store.cache_dir(), &tips);
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
