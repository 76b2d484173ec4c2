//! `fsck`: proves the store intact, or names what is broken and what it
//! affects.
//!
//! Checks, in order:
//! 1. every blob: readable, hashes (blake3) to its key, size index agrees;
//! 2. every commit record: readable, hashes to its key, parents exist, every
//!    chunk's blob and residual base exist;
//! 3. every chunk of every commit decodes, through its chain of bases, to the
//!    bytes its record's checksum names (never from the reconstruction
//!    cache: fsck trusts only blobs);
//! 4. refs: branches, tags and the step index point to existing commits, and
//!    each step-index entry to a commit at that step.
//!
//! Only what a branch or tag reaches is checked: the history in full, and
//! of commits kept only as residual bases the chunks still needed. Records
//! nothing reaches are garbage awaiting gc and are only counted.
//!
//! Decoding walks one chunk position at a time through the commits in
//! ancestry order, keeping a decoded chunk only while later commits still
//! use it as a base, so a chain is decoded once, not once per commit.

use crate::repo::Repo;
use std::collections::{BTreeMap, HashMap, HashSet};

use rayon::prelude::*;
use serde::Serialize;

use super::reconstruct::{ChunkAddr, Reconstructor};
use super::walk::{Position, Reachable, positioned_chunks, reachable};
use crate::codec;
use crate::store::{ChunkRef, CommitRecord, ObjectId};

#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// The broken object: `blob <id>`, `commit <id>`, `branch <name>`, ...
    pub object: String,
    pub detail: String,
    /// Commits that cannot be checked out intact because of it, as
    /// `<short id> (<branch>@<step>)`.
    pub affects: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FsckReport {
    pub blobs: usize,
    pub commits: usize,
    /// Records no branch or tag reaches, awaiting gc (not checked).
    pub unreachable_commits: usize,
    pub chunks_decoded: usize,
    /// Chunks a lazy clone has not downloaded (not checked; 0 otherwise).
    pub chunks_not_downloaded: usize,
    pub problems: Vec<Problem>,
}

impl FsckReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

pub fn fsck(store: &Repo) -> anyhow::Result<FsckReport> {
    let mut problems = Vec::new();
    let (blob_count, bad_blobs) = check_blobs(store, &mut problems)?;
    let live = match reachable(store.backend()) {
        Ok(live) => Some(live),
        Err(e) => {
            problems.push(Problem {
                object: "history".into(),
                detail: format!("cannot be walked from the refs: {e:#}"),
                affects: Vec::new(),
            });
            None
        }
    };
    // A lazy clone holds only the blobs of the commits it checked out: the
    // others are not missing, just not downloaded, and are not checked.
    let lazy = super::remote::remotes(store)?.lazy.is_some();
    let local_blobs: HashSet<ObjectId> = if lazy {
        store.blob_sizes()?.into_iter().map(|(id, _)| id).collect()
    } else {
        HashSet::new()
    };
    let mut records = check_commits(
        store,
        &bad_blobs,
        live.as_ref(),
        lazy.then_some(&local_blobs),
        &mut problems,
    )?;
    let not_downloaded: HashSet<(ObjectId, Position)> = if lazy {
        records
            .iter()
            .flat_map(|(id, r)| {
                positioned_chunks(r)
                    .into_iter()
                    .filter(|(_, c)| !local_blobs.contains(&c.blob))
                    .map(|(p, _)| (*id, p))
            })
            .collect()
    } else {
        HashSet::new()
    };
    // Records no ref reaches (left for gc, e.g. by an interrupted prune)
    // are garbage: counted, not checked, as their bases may be gone.
    let needed = |id: &ObjectId, position: &Position| {
        live.as_ref().is_none_or(|l| l.needs_chunk(id, position))
            && !not_downloaded.contains(&(*id, position.clone()))
    };
    let unreachable = match &live {
        Some(l) => {
            let before = records.len();
            records.retain(|id, _| l.keeps_commit(id));
            before - records.len()
        }
        None => 0,
    };
    let (decoded, decode_problems) = decode_all(store, &records, &needed);
    problems.extend(decode_problems);
    check_refs(store, &records, &mut problems)?;
    add_blob_effects(&records, &mut problems);
    Ok(FsckReport {
        blobs: blob_count,
        commits: records.len(),
        unreachable_commits: unreachable,
        chunks_decoded: decoded,
        chunks_not_downloaded: not_downloaded.len(),
        problems,
    })
}

fn label(id: &ObjectId, record: &CommitRecord) -> String {
    format!("{} ({}@{})", id.short(), record.branch, record.step)
}

fn check_blobs(
    store: &Repo,
    problems: &mut Vec<Problem>,
) -> anyhow::Result<(usize, HashSet<ObjectId>)> {
    let sizes = store.blob_sizes()?;
    let bad: Vec<Problem> = sizes
        .par_iter()
        .filter_map(|(id, size)| {
            let detail = match store.get_blob(id) {
                Err(e) => format!("cannot be read: {e}"),
                Ok(bytes) if ObjectId::of(&bytes) != *id => {
                    format!("content hashes to {}, not to its key", ObjectId::of(&bytes))
                }
                Ok(bytes) if bytes.len() as u64 != *size => {
                    format!("{} bytes, size index says {size}", bytes.len())
                }
                Ok(_) => return None,
            };
            Some(Problem {
                object: format!("blob {id}"),
                detail,
                affects: Vec::new(),
            })
        })
        .collect();
    let bad_ids = bad
        .iter()
        .filter_map(|p| p.object.strip_prefix("blob ").and_then(ObjectId::from_hex))
        .collect();
    problems.extend(bad);
    Ok((sizes.len(), bad_ids))
}

/// Whether chunk `position` of a commit must be intact: every chunk of a
/// commit in some history, only the chunks still used as bases of a commit
/// that `prune` dropped from history.
type Needed<'a> = dyn Fn(&ObjectId, &Position) -> bool + Sync + 'a;

fn check_commits(
    store: &Repo,
    bad_blobs: &HashSet<ObjectId>,
    live: Option<&Reachable>,
    lazy_local_blobs: Option<&HashSet<ObjectId>>,
    problems: &mut Vec<Problem>,
) -> anyhow::Result<HashMap<ObjectId, CommitRecord>> {
    let needed = |id: &ObjectId, p: &Position| live.is_none_or(|l| l.needs_chunk(id, p));
    let mut records = HashMap::new();
    for id in store.commit_ids()? {
        match store.get_commit(&id) {
            Ok(Some(record)) => {
                records.insert(id, record);
            }
            Ok(None) => {}
            Err(e) => problems.push(Problem {
                object: format!("commit {id}"),
                detail: e.to_string(),
                affects: vec![id.short()],
            }),
        }
    }
    for (id, record) in &records {
        if live.is_some_and(|l| !l.keeps_commit(id)) {
            continue;
        }
        let mut broken = |detail: String| {
            problems.push(Problem {
                object: format!("commit {id}"),
                detail,
                affects: vec![label(id, record)],
            })
        };
        // A commit kept only as a residual base has no history to check.
        if live.is_none_or(|l| l.history.contains(id)) {
            for parent in &record.parents {
                if !records.contains_key(parent) {
                    broken(format!("parent {parent} is missing"));
                }
            }
        }
        for (position, chunk) in positioned_chunks(record) {
            if !needed(id, &position) {
                continue;
            }
            let downloaded = lazy_local_blobs.is_none_or(|local| local.contains(&chunk.blob));
            if downloaded && !bad_blobs.contains(&chunk.blob) && !store.has_blob(&chunk.blob)? {
                broken(format!("blob {} is missing", chunk.blob));
            }
            if let Some(base) = chunk.base
                && !records.contains_key(&base)
            {
                broken(format!("residual base commit {base} is missing"));
            }
        }
    }
    Ok(records)
}

fn positions(record: &CommitRecord) -> Vec<Position> {
    positioned_chunks(record)
        .into_iter()
        .map(|(p, _)| p)
        .collect()
}

/// Commits ordered so that every commit comes after its ancestors and the
/// commits its chunks are coded against (generation number: longest
/// distance from a root along those edges).
fn ancestry_order(records: &HashMap<ObjectId, CommitRecord>) -> Vec<ObjectId> {
    fn generation(
        id: ObjectId,
        records: &HashMap<ObjectId, CommitRecord>,
        memo: &mut HashMap<ObjectId, u64>,
    ) -> u64 {
        // Iterative: chains can be thousands of commits long.
        let mut stack = vec![id];
        while let Some(&top) = stack.last() {
            if memo.contains_key(&top) {
                stack.pop();
                continue;
            }
            // Dependencies: parents and residual bases (after a prune, a
            // base may sit outside the commit's new ancestry).
            let parents: Vec<ObjectId> = records
                .get(&top)
                .map(|r| {
                    let mut deps = r.parents.clone();
                    deps.extend(r.chunks().filter_map(|c| c.base));
                    deps.sort();
                    deps.dedup();
                    deps
                })
                .unwrap_or_default();
            let pending: Vec<ObjectId> = parents
                .iter()
                .copied()
                .filter(|p| records.contains_key(p) && !memo.contains_key(p))
                .collect();
            if pending.is_empty() {
                let g = parents
                    .iter()
                    .filter_map(|p| memo.get(p))
                    .max()
                    .map_or(0, |g| g + 1);
                memo.insert(top, g);
                stack.pop();
            } else {
                stack.extend(pending);
            }
        }
        memo[&id]
    }
    let mut memo = HashMap::new();
    let mut order: Vec<(u64, ObjectId)> = records
        .keys()
        .map(|id| (generation(*id, records, &mut memo), *id))
        .collect();
    order.sort();
    order.into_iter().map(|(_, id)| id).collect()
}

/// Decodes every chunk of every commit. Returns the number decoded and the
/// problems found.
fn decode_all(
    store: &Repo,
    records: &HashMap<ObjectId, CommitRecord>,
    needed: &Needed<'_>,
) -> (usize, Vec<Problem>) {
    let order = ancestry_order(records);
    let by_position: ByPosition<'_> = records
        .iter()
        .map(|(id, r)| (*id, positioned_chunks(r).into_iter().collect()))
        .collect();
    let all_positions: BTreeMap<Position, ()> = records
        .values()
        .flat_map(positions)
        .map(|p| (p, ()))
        .collect();
    // Sides (m's chunks coded in units of the parent's v̂) are decoded
    // across positions, through one reconstructor that keeps the records.
    let sides = Reconstructor::new(store);
    let results: Vec<(usize, Vec<Problem>)> = all_positions
        .par_iter()
        .map(|(position, _)| {
            decode_position(&sides, records, &by_position, &order, needed, position)
        })
        .collect();
    results
        .into_iter()
        .fold((0, Vec::new()), |(n, mut all), (k, problems)| {
            all.extend(problems);
            (n + k, all)
        })
}

/// Each commit's chunks by position, built once (looking them up by name
/// per position would be quadratic in the number of tensors).
type ByPosition<'r> = HashMap<ObjectId, HashMap<Position, &'r ChunkRef>>;

fn decode_position(
    sides: &Reconstructor<'_>,
    records: &HashMap<ObjectId, CommitRecord>,
    by_position: &ByPosition<'_>,
    order: &[ObjectId],
    needed: &Needed<'_>,
    position: &Position,
) -> (usize, Vec<Problem>) {
    let (file, tensor, index) = position;
    let addr = ChunkAddr {
        file,
        tensor: tensor.as_deref(),
        index: *index,
    };
    let chunks: Vec<(ObjectId, &ChunkRef)> = order
        .iter()
        .filter(|id| needed(id, position))
        .filter_map(|id| Some((*id, *by_position.get(id)?.get(position)?)))
        .collect();
    let mut uses: HashMap<ObjectId, usize> = HashMap::new();
    for (_, chunk) in &chunks {
        if let Some(base) = chunk.base {
            *uses.entry(base).or_default() += 1;
        }
    }
    let mut decoded: HashMap<ObjectId, Vec<u8>> = HashMap::new();
    let mut failed: HashSet<ObjectId> = HashSet::new();
    let mut problems = Vec::new();
    let mut count = 0;
    for (id, chunk) in chunks {
        let base = match chunk.base.filter(|_| chunk.codec.needs_base()) {
            Some(base) if failed.contains(&base) => {
                failed.insert(id);
                problems.push(Problem {
                    object: format!("commit {}", id.short()),
                    detail: format!(
                        "{addr}: its residual base {} cannot be decoded",
                        base.short()
                    ),
                    affects: vec![label(&id, &records[&id])],
                });
                continue;
            }
            Some(base) => decoded.get(&base).map(Vec::as_slice),
            None => None,
        };
        match decode_one(sides, &id, chunk, base, addr) {
            Ok(raw) => {
                count += 1;
                if uses.get(&id).copied().unwrap_or(0) > 0 {
                    decoded.insert(id, raw);
                }
            }
            Err(detail) => {
                failed.insert(id);
                problems.push(Problem {
                    object: format!("commit {}", id.short()),
                    detail: format!("{addr} (blob {}): {detail}", chunk.blob.short()),
                    affects: vec![label(&id, &records[&id])],
                });
            }
        }
        if let Some(base) = chunk.base
            && let Some(n) = uses.get_mut(&base)
        {
            *n -= 1;
            if *n == 0 {
                decoded.remove(&base);
            }
        }
    }
    (count, problems)
}

/// Decodes one chunk against its decoded base; a chunk coded in units of
/// another tensor gets that side chunk (checked) through `sides`.
fn decode_one(
    sides: &Reconstructor<'_>,
    id: &ObjectId,
    chunk: &ChunkRef,
    base: Option<&[u8]>,
    addr: ChunkAddr<'_>,
) -> Result<Vec<u8>, String> {
    let blob = sides
        .store()
        .get_blob(&chunk.blob)
        .map_err(|e| e.to_string())?;
    if ObjectId::of(&blob) != chunk.blob {
        return Err("blob content does not match its hash".into());
    }
    if chunk.codec.needs_base() && base.is_none() {
        return Err("its residual base is not available".into());
    }
    let side_chunks = sides
        .side_chunks(id, chunk.base.as_ref(), addr, &blob, true)
        .map_err(|e| format!("its side chunks: {e:#}"))?;
    let raw = codec::decode_with(&blob, base, &side_chunks).map_err(|e| e.to_string())?;
    if ObjectId::of(&raw) != chunk.raw_hash {
        return Err("decoded bytes do not match the recorded checksum".into());
    }
    Ok(raw)
}

fn check_refs(
    store: &Repo,
    records: &HashMap<ObjectId, CommitRecord>,
    problems: &mut Vec<Problem>,
) -> anyhow::Result<()> {
    let branches = store.branches()?;
    let mut pointers: Vec<(String, ObjectId)> = branches
        .iter()
        .map(|(name, id)| (format!("branch {name}"), *id))
        .collect();
    pointers.extend(
        store
            .tags()?
            .into_iter()
            .map(|(name, id)| (format!("tag {name}"), id)),
    );
    for name in store.step_index_branches()? {
        if !branches.iter().any(|(b, _)| *b == name) {
            problems.push(Problem {
                object: format!("step index of `{name}`"),
                detail: "no branch has this name".into(),
                affects: Vec::new(),
            });
        }
        for (step, id) in store.branch_steps(&name)? {
            match records.get(&id) {
                Some(r) if r.step != step => problems.push(Problem {
                    object: format!("step index {name}@{step}"),
                    detail: format!("points to commit {} at step {}", id.short(), r.step),
                    affects: Vec::new(),
                }),
                _ => pointers.push((format!("step index {name}@{step}"), id)),
            }
        }
    }
    for (object, id) in pointers {
        if !records.contains_key(&id) {
            problems.push(Problem {
                object,
                detail: format!("points to commit {id}, which is missing"),
                affects: Vec::new(),
            });
        }
    }
    Ok(())
}

/// Fills in, for each broken blob, the commits whose chunks name it.
fn add_blob_effects(records: &HashMap<ObjectId, CommitRecord>, problems: &mut [Problem]) {
    for problem in problems.iter_mut() {
        let Some(blob) = problem
            .object
            .strip_prefix("blob ")
            .and_then(ObjectId::from_hex)
        else {
            continue;
        };
        let mut affects: Vec<String> = records
            .iter()
            .filter(|(_, r)| r.chunks().any(|c| c.blob == blob))
            .map(|(id, r)| label(id, r))
            .collect();
        affects.sort();
        problem.affects = affects;
    }
}
