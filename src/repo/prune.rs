//! `prune`: retention for long runs. Keeps the newest commits of a branch and
//! every commit at a multiple of a step interval (plus tagged commits and
//! everything another branch or tag still reaches), drops the rest from the
//! branch's history, then runs gc.
//!
//! The plan:
//! 1. walk the branch's first-parent ancestry; mark what to keep;
//! 2. rewrite each kept commit above the first dropped one, oldest first:
//!    its parent becomes the nearest kept ancestor. A chunk coded against a
//!    dropped commit is *rebased* when that is cheaper than keeping the
//!    dropped chunks it decodes through (down bases and side chunks): its
//!    exact reconstruction (what checkout returned before) is re-encoded
//!    losslessly, as a keyframe or an xor-delta against the new parent's
//!    chunk. Otherwise it keeps its base, and gc keeps just the dropped
//!    chunks it needs (see `gc`). A dropped commit above a rewritten one
//!    gets a new record too, its bases renamed, so that what is kept
//!    decodes through the rewritten commits and never through superseded
//!    ones. Either way every kept commit checks out bit-identically;
//! 3. publish in one synced batch: new records, the branch tip, its step
//!    index, and tags moved to the rewritten commits;
//! 4. gc: the dropped and the superseded records and their blobs go.
//!
//! Commits that another branch or a tag reaches are never rewritten: they
//! are ancestors of every rewritten commit, so their ids stay valid.

use crate::repo::Repo;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, bail};
use rayon::prelude::*;
use serde::Serialize;

use super::gc::{GcReport, gc_locked};
use super::reconstruct::{ChunkAddr, Reconstructor, find_chunk};
use super::walk::Position as Addr;
use super::walk::{ancestry, dependencies};
use crate::codec;
use crate::store::{ChunkRef, CommitRecord, FileContent, ObjectId, RefEdit, TensorEntry};

#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// `None`: the current branch.
    pub branch: Option<String>,
    /// Keep this many newest commits of the branch (at least 1: the tip).
    pub keep_last: usize,
    /// Keep every commit whose step is a multiple of this.
    pub keep_every: Option<u64>,
    pub dry_run: bool,
    pub lock_wait: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    pub branch: String,
    pub dry_run: bool,
    /// Steps kept and dropped, oldest first.
    pub kept: Vec<u64>,
    pub dropped: Vec<u64>,
    /// Kept commits given a new record (new parent or rebased chunks).
    pub rewritten: usize,
    /// Chunks re-encoded because their base was dropped.
    pub rebased_chunks: usize,
    pub gc: Option<GcReport>,
}

struct Plan {
    branch: String,
    /// The branch's ancestry, oldest first, with keep flags.
    chain: Vec<(ObjectId, CommitRecord, bool)>,
    /// Kept because something else reaches them: never rewritten.
    shared: HashSet<ObjectId>,
}

fn plan(store: &Repo, options: &PruneOptions) -> anyhow::Result<Plan> {
    if options.keep_last == 0 {
        bail!("keep-last must be at least 1 (the branch tip is always kept)");
    }
    if options.keep_every == Some(0) {
        bail!("keep-every must be at least 1");
    }
    let branch = match &options.branch {
        Some(b) => b.clone(),
        None => store.head_branch()?,
    };
    let tip = store
        .branch_tip(&branch)?
        .with_context(|| format!("no branch named `{branch}`"))?;
    let mut shared = HashSet::new();
    for (name, id) in store.branches()? {
        if name != branch {
            shared.extend(ancestry(store.backend(), id)?.into_iter().map(|(id, _)| id));
        }
    }
    let tagged: HashSet<ObjectId> = store.tags()?.into_iter().map(|(_, id)| id).collect();
    let mut chain: Vec<(ObjectId, CommitRecord, bool)> = ancestry(store.backend(), tip)?
        .into_iter()
        .enumerate()
        .map(|(newest_first, (id, record))| {
            let keep = newest_first < options.keep_last
                || options.keep_every.is_some_and(|k| record.step % k == 0)
                || tagged.contains(&id)
                || shared.contains(&id);
            (id, record, keep)
        })
        .collect();
    chain.reverse();
    Ok(Plan {
        branch,
        chain,
        shared,
    })
}

pub fn prune(repo: &Repo, options: &PruneOptions) -> anyhow::Result<PruneReport> {
    if options.dry_run {
        let plan = plan(repo, options)?;
        return Ok(report(&plan, true, 0, 0, None));
    }
    let (store, plan) = repo.write(options.lock_wait, |view| plan(view, options))?;
    if plan.chain.iter().all(|(_, _, keep)| *keep) {
        return Ok(report(&plan, false, 0, 0, None));
    }
    let (edit, rewritten, rebased) = rewrite(&store, &plan)?;
    let view = store.hold_readers()?;
    store.flush_blobs()?;
    let old_tip = plan.chain.last().map(|(id, _, _)| *id);
    store.apply(&edit)?;
    drop(view);
    // The reconstruction of the tip did not change: its cache stays valid.
    if let (Some(old), Some((_, new))) = (old_tip, edit.set_branches.first()) {
        super::tipcache::rename(&store.cache_dir(), &old, new);
    }
    let gc = gc_locked(&store)?;
    Ok(report(&plan, false, rewritten, rebased, Some(gc)))
}

fn report(
    plan: &Plan,
    dry_run: bool,
    rewritten: usize,
    rebased_chunks: usize,
    gc: Option<GcReport>,
) -> PruneReport {
    let steps = |keep: bool| {
        plan.chain
            .iter()
            .filter(|(_, _, k)| *k == keep)
            .map(|(_, r, _)| r.step)
            .collect()
    };
    PruneReport {
        branch: plan.branch.clone(),
        dry_run,
        kept: steps(true),
        dropped: steps(false),
        rewritten,
        rebased_chunks,
        gc,
    }
}

/// New records for the kept commits, oldest first, and the ref edit that
/// publishes them. Returns (edit, commits rewritten, chunks rebased).
fn rewrite(store: &Repo, plan: &Plan) -> anyhow::Result<(RefEdit, usize, usize)> {
    let reconstructor = Reconstructor::new(store);
    let dropped: HashSet<ObjectId> = plan
        .chain
        .iter()
        .filter(|(_, _, keep)| !keep)
        .map(|(id, _, _)| *id)
        .collect();
    let by_id: HashMap<ObjectId, &CommitRecord> =
        plan.chain.iter().map(|(id, r, _)| (*id, r)).collect();
    // old id -> new id of rewritten commits
    let mut renamed: HashMap<ObjectId, ObjectId> = HashMap::new();
    let mut edit = RefEdit::default();
    let mut new_parent: Option<(ObjectId, ObjectId, u32)> = None; // (old, new, depth)
    let (mut rewritten, mut rebased) = (0, 0);
    for (old_id, record, keep) in &plan.chain {
        if !keep {
            // A dropped commit whose chunks a kept one may still decode
            // through gets its bases renamed too, so that such chains run
            // through the rewritten commits, not the superseded ones (which
            // gc can then delete, with what only they needed).
            if let Some((id, bytes)) = renamed_bases(record, &renamed) {
                edit.put_commits.push((id, bytes));
                renamed.insert(*old_id, id);
            }
            continue;
        }
        let mut new = record.clone();
        new.parents = new_parent
            .map(|(_, new_id, _)| new_id)
            .into_iter()
            .collect();
        let mut rebase_jobs = Vec::new();
        for_each_chunk_mut(&mut new, |addr, chunk| {
            if let Some(base) = chunk.base {
                if dropped.contains(&base) {
                    rebase_jobs.push(addr);
                }
                if let Some(renamed_base) = renamed.get(&base) {
                    chunk.base = Some(*renamed_base);
                }
            }
        });
        let candidates: Vec<(Addr, ChunkRef, Vec<u8>)> = rebase_jobs
            .par_iter()
            .map(|addr| {
                rebase_chunk(&reconstructor, *old_id, new_parent, addr)
                    .map(|(chunk, blob)| (addr.clone(), chunk, blob))
            })
            .collect::<anyhow::Result<_>>()?;
        // Rebase only where it is clearly cheaper (by a tenth) than keeping
        // the dropped chunks the chunk decodes through (down bases and
        // sides); gc then keeps just those chunks. The margin covers what
        // the estimate misses: a chunk may stay anyway because another
        // chunk needs it.
        // A chunk that keeps a dropped base may also decode with side
        // chunks of that commit or its base (m's v̂, W's moments): gc keeps
        // those as it keeps bases (walk::reachable follows both). Their
        // chains stay then, so rebasing the chunks at those positions would
        // only add bytes: they keep their bases too (`keep_with_sides`).
        let doomed = Doomed {
            store,
            records: &by_id,
            dropped: &dropped,
        };
        let costs: HashMap<Addr, (u64, u64)> = candidates
            .iter()
            .map(|(addr, _, blob)| {
                let original = find_position(record, addr).expect("position of this record");
                let keep_cost = doomed.keep_cost(*old_id, original, addr)?;
                Ok((addr.clone(), (blob.len() as u64, keep_cost)))
            })
            .collect::<anyhow::Result<_>>()?;
        let cheaper = |(rebased, kept): (u64, u64)| rebased * 10 < kept * 9;
        let mut rebase: HashMap<Addr, bool> = costs
            .iter()
            .map(|(a, &c)| (a.clone(), cheaper(c)))
            .collect();
        keep_with_sides(store, &by_id, &dropped, (*old_id, record), &mut rebase)?;
        let mut rebuilt: HashMap<Addr, ChunkRef> = HashMap::new();
        for (addr, chunk, blob) in candidates {
            if !rebase[&addr] {
                continue;
            }
            if !store.has_blob(&chunk.blob)? {
                store.put_blob(&chunk.blob, &blob)?;
            }
            rebuilt.insert(addr, chunk);
        }
        rebased += rebuilt.len();
        // stored_bytes counts what this commit added: the re-encoded
        // chunks replace the residuals they stand for.
        let mut stored = new.stored_bytes;
        for_each_chunk_mut(&mut new, |addr, chunk| {
            if let Some(replacement) = rebuilt.get(&addr) {
                stored = stored.saturating_sub(chunk.stored_len) + replacement.stored_len;
                *chunk = replacement.clone();
            }
        });
        new.stored_bytes = stored;
        let has_base = new.chunks().any(|c| c.base.is_some());
        new.keyframe = !has_base;
        new.chain_depth = match (has_base, new_parent) {
            (true, Some((_, _, depth))) => depth + 1,
            _ => 0,
        };
        let new_id = if new == *record {
            *old_id
        } else {
            if plan.shared.contains(old_id) {
                bail!(
                    "internal error: commit {} is shared with another branch and cannot be rewritten",
                    old_id.short()
                );
            }
            let bytes = new.to_bytes();
            let id = ObjectId::of(&bytes);
            edit.put_commits.push((id, bytes));
            rewritten += 1;
            renamed.insert(*old_id, id);
            id
        };
        edit.set_steps.push((plan.branch.clone(), new.step, new_id));
        new_parent = Some((*old_id, new_id, new.chain_depth));
    }
    let (_, tip, _) = new_parent.context("the branch tip is always kept")?;
    edit.set_branches.push((plan.branch.clone(), tip));
    edit.clear_steps.push(plan.branch.clone());
    for (name, id) in store.tags()? {
        if let Some(new_id) = renamed.get(&id) {
            edit.set_tags.push((name, *new_id));
        }
    }
    Ok((edit, rewritten, rebased))
}

/// Makes every rebase candidate whose position a kept-base candidate (or a
/// chunk down its chain of dropped bases) names as a side keep its base
/// too, until no decision changes (W names m and v; m names v).
fn keep_with_sides(
    store: &Repo,
    records: &HashMap<ObjectId, &CommitRecord>,
    dropped: &HashSet<ObjectId>,
    (commit, record): (ObjectId, &CommitRecord),
    rebase: &mut HashMap<Addr, bool>,
) -> anyhow::Result<()> {
    let mut sides: HashMap<Addr, Vec<Addr>> = HashMap::new();
    for addr in rebase.keys() {
        let mut chunk = find_position(record, addr).expect("position of this record");
        let mut named = side_positions(store, commit, chunk, addr)?;
        while let Some(id) = chunk.base.filter(|b| dropped.contains(b)) {
            let Some(base_chunk) = records.get(&id).and_then(|r| find_position(r, addr)) else {
                break;
            };
            named.extend(side_positions(store, id, base_chunk, addr)?);
            chunk = base_chunk;
        }
        named.sort();
        named.dedup();
        sides.insert(addr.clone(), named);
    }
    let mut changed = true;
    while changed {
        changed = false;
        for (addr, named) in &sides {
            if rebase[addr] {
                continue;
            }
            for side in named {
                if let Some(decision) = rebase.get_mut(side)
                    && *decision
                {
                    *decision = false;
                    changed = true;
                }
            }
        }
    }
    Ok(())
}

/// The positions of the side chunks `chunk` (at `addr` of `commit`)
/// decodes with, in its commit or its base: its dependencies but the base,
/// the one at its own position.
fn side_positions(
    store: &Repo,
    commit: ObjectId,
    chunk: &ChunkRef,
    addr: &Addr,
) -> anyhow::Result<Vec<Addr>> {
    let needs = dependencies(store.backend(), commit, addr, chunk)?;
    Ok(needs
        .into_iter()
        .map(|(_, position)| position)
        .filter(|position| position != addr)
        .collect())
}

/// `record` with every base (and parent) that was rewritten renamed, as a
/// new record and its id; `None` when nothing it names was rewritten.
fn renamed_bases(
    record: &CommitRecord,
    renamed: &HashMap<ObjectId, ObjectId>,
) -> Option<(ObjectId, Vec<u8>)> {
    let mut new = record.clone();
    for parent in &mut new.parents {
        if let Some(r) = renamed.get(parent) {
            *parent = *r;
        }
    }
    for_each_chunk_mut(&mut new, |_, chunk| {
        if let Some(r) = chunk.base.and_then(|b| renamed.get(&b)) {
            chunk.base = Some(*r);
        }
    });
    if new == *record {
        return None;
    }
    let bytes = new.to_bytes();
    Some((ObjectId::of(&bytes), bytes))
}

fn for_each_chunk_mut(record: &mut CommitRecord, mut f: impl FnMut(Addr, &mut ChunkRef)) {
    for file in &mut record.files {
        let name = file.name.clone();
        if let FileContent::Opaque { chunks } = &mut file.content {
            for (i, chunk) in chunks.iter_mut().enumerate() {
                f((name.clone(), None, i), chunk);
            }
            continue;
        }
        for tensor in file.tensors_mut() {
            for (i, chunk) in tensor.chunks.iter_mut().enumerate() {
                f((name.clone(), Some(tensor.name.clone()), i), chunk);
            }
        }
    }
}

/// Re-encodes chunk `addr` of commit `old_id` losslessly from its exact
/// reconstruction: a keyframe, or an xor-delta against the new parent's
/// chunk at the same position if that is smaller.
fn rebase_chunk(
    reconstructor: &Reconstructor<'_>,
    old_id: ObjectId,
    new_parent: Option<(ObjectId, ObjectId, u32)>,
    (file, tensor, index): &Addr,
) -> anyhow::Result<(ChunkRef, Vec<u8>)> {
    let addr = ChunkAddr {
        file,
        tensor: tensor.as_deref(),
        index: *index,
    };
    let raw = reconstructor.chunk(&old_id, addr)?;
    let record = reconstructor.record(&old_id)?;
    let elem_size = tensor
        .as_deref()
        .and_then(|t| record.tensor(file, t))
        .map_or(1, TensorEntry::element_size);
    // The new parent's chunk here reconstructs exactly as the old one did.
    let parent_raw = new_parent.and_then(|(old, _, _)| reconstructor.chunk(&old, addr).ok());
    let (blob, is_delta) = codec::encode_lossless(&raw, parent_raw.as_deref(), elem_size);
    let base = new_parent.map(|(_, new, _)| new).filter(|_| is_delta);
    let header = codec::BlobHeader::parse(&blob).expect("just encoded");
    let chunk = ChunkRef {
        blob: ObjectId::of(&blob),
        codec: header.codec,
        raw_len: raw.len() as u64,
        stored_len: blob.len() as u64,
        raw_hash: ObjectId::of(&raw),
        base,
    };
    Ok((chunk, blob))
}

fn find_position<'r>(record: &'r CommitRecord, addr: &Addr) -> Option<&'r ChunkRef> {
    let (file, tensor, index) = addr;
    find_chunk(
        record,
        ChunkAddr {
            file,
            tensor: tensor.as_deref(),
            index: *index,
        },
    )
}

/// What prune is about to let go: the dropped commits.
struct Doomed<'a> {
    store: &'a Repo,
    records: &'a HashMap<ObjectId, &'a CommitRecord>,
    dropped: &'a HashSet<ObjectId>,
}

impl Doomed<'_> {
    fn contains(&self, id: &ObjectId) -> bool {
        self.dropped.contains(id)
    }

    /// Stored bytes of the doomed chunks that `chunk` (at `addr` of the kept
    /// commit `commit`) decodes through, down bases and side chunks: what
    /// keeping its base keeps alive.
    fn keep_cost(&self, commit: ObjectId, chunk: &ChunkRef, addr: &Addr) -> anyhow::Result<u64> {
        let mut seen: HashSet<(ObjectId, Addr)> = HashSet::new();
        let mut stack = self.needs(commit, chunk, addr)?;
        let mut cost = 0;
        while let Some((id, at)) = stack.pop() {
            if !self.contains(&id) || !seen.insert((id, at.clone())) {
                continue;
            }
            let Some(needed) = self.records.get(&id).and_then(|r| find_position(r, &at)) else {
                continue;
            };
            cost += needed.stored_len;
            stack.extend(self.needs(id, needed, &at)?);
        }
        Ok(cost)
    }

    /// The chunks decoding `chunk` (at `addr` of `commit`) reads: its base
    /// and its side chunks, as (commit, position).
    fn needs(
        &self,
        commit: ObjectId,
        chunk: &ChunkRef,
        addr: &Addr,
    ) -> anyhow::Result<Vec<(ObjectId, Addr)>> {
        dependencies(self.store.backend(), commit, addr, chunk)
    }
}
