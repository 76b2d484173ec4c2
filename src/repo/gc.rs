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

use crate::repo::Repo;

use std::time::Duration;

use serde::Serialize;

use super::walk::reachable;
use crate::store::{ObjectId, RefEdit};

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
    /// Objects interrupted writers left behind (orphan packs, superseded
    /// ref entries of a remote, steps whose shards never all arrived),
    /// removed.
    pub leftovers_removed: usize,
    /// Bytes of the store's database on disk before and after (equal for a
    /// dry run).
    pub disk_bytes_before: u64,
    pub disk_bytes_after: u64,
}

struct Sweep {
    /// Leftovers of interrupted writers (a bucket's orphan packs, old ref
    /// entries), counted apart.
    leftovers: usize,
    commits: Vec<ObjectId>,
    blobs: Vec<ObjectId>,
    blob_bytes: u64,
    live_commits: usize,
    live_blobs: usize,
}

fn plan(store: &Repo, grace: Duration) -> anyhow::Result<Sweep> {
    let live = reachable(store.backend())?;
    let recent = store.recent_objects(grace)?;
    let commits: Vec<ObjectId> = store
        .commit_ids()?
        .into_iter()
        .filter(|id| !live.keeps_commit(id) && !recent.contains(id))
        .collect();
    let mut blobs = Vec::new();
    let mut blob_bytes = 0;
    for (id, size) in store.blob_sizes()? {
        if !live.blobs.contains(&id) && !recent.contains(&id) {
            blobs.push(id);
            blob_bytes += size;
        }
    }
    Ok(Sweep {
        leftovers: 0,
        commits,
        blobs,
        blob_bytes,
        live_commits: live.history.len() + live.base_only.len(),
        live_blobs: live.blobs.len(),
    })
}

/// How `gc` runs.
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    pub dry_run: bool,
    /// How long to wait for another writer (a local store's lock).
    pub lock_wait: Duration,
    /// Objects younger than this are spared (a shared remote's pushes in
    /// progress have not moved their refs yet).
    pub grace: Duration,
}

/// The grace period `gc` gives new objects unless told otherwise.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            dry_run: false,
            lock_wait: Duration::ZERO,
            grace: DEFAULT_GRACE,
        }
    }
}

pub fn gc(repo: &Repo, options: &GcOptions) -> anyhow::Result<GcReport> {
    let grace = options.grace;
    if options.dry_run {
        let mut sweep = plan(repo, grace)?;
        sweep.leftovers =
            repo.sweep_leftovers(grace, true)? + super::seal::sweep_pending(repo, grace, true)?;
        let disk = repo.physical_bytes()?;
        return Ok(report(&sweep, true, disk, disk));
    }
    let (store, mut sweep) = repo.write(options.lock_wait, |view| plan(view, grace))?;
    let before = store.physical_bytes()?;
    sweep_and_reclaim(&store, &sweep)?;
    sweep.leftovers =
        store.sweep_leftovers(grace, false)? + super::seal::sweep_pending(&store, grace, false)?;
    let after = store.physical_bytes()?;
    Ok(report(&sweep, false, before, after))
}

/// Runs a full gc on a store already open for writing (used by `prune`).
pub fn gc_locked(store: &Repo) -> anyhow::Result<GcReport> {
    let sweep = plan(store, DEFAULT_GRACE)?;
    let before = store.physical_bytes()?;
    sweep_and_reclaim(store, &sweep)?;
    Ok(report(&sweep, false, before, store.physical_bytes()?))
}

fn sweep_and_reclaim(store: &Repo, sweep: &Sweep) -> anyhow::Result<()> {
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
        leftovers_removed: sweep.leftovers,
        disk_bytes_before: before,
        disk_bytes_after: after,
    }
}
