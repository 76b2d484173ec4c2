//! Walking the history: the one place that follows parents and residual
//! bases. Log, graph, branch, commit, gc, fsck, prune and push all ask here.
//!
//! - [`require_commit`]: a commit that must exist, or an error naming it;
//! - [`ancestry`]: the first-parent chain of a commit; [`is_ancestor`];
//! - [`reachable_commits`]: every commit the refs reach, children first
//!   (ordered by [`generations`]);
//! - [`reachable`] / [`reachable_from`]: what refs keep alive, down to the
//!   chunk positions of residual bases that `prune` left behind (and the
//!   side chunks those decode with), and the blobs; [`Position`] names a
//!   chunk inside a commit;
//! - [`checkout_blobs`]: every blob one commit's checkout reads.

use std::collections::{HashMap, HashSet};

use anyhow::Context;

use crate::codec::{self, Codec};
use crate::store::{Backend, ChunkRef, CommitRecord, FileContent, ObjectId};

/// A commit that must be in the store (a parent, a tip, a base).
pub fn require_commit(store: &dyn Backend, id: &ObjectId) -> anyhow::Result<CommitRecord> {
    store
        .get_commit(id)?
        .with_context(|| format!("commit {id} is missing from the store {}", store.location()))
}

/// The first-parent ancestry of `id`, `id` first.
pub fn ancestry(
    store: &dyn Backend,
    id: ObjectId,
) -> anyhow::Result<Vec<(ObjectId, CommitRecord)>> {
    let mut out = Vec::new();
    let mut next = Some(id);
    while let Some(id) = next {
        let record = require_commit(store, &id)?;
        next = record.first_parent();
        out.push((id, record));
    }
    Ok(out)
}

/// Step-index entries a branch whose tip is `id` holds: its ancestry.
pub fn ancestry_steps(store: &dyn Backend, id: ObjectId) -> anyhow::Result<Vec<(u64, ObjectId)>> {
    Ok(ancestry(store, id)?
        .into_iter()
        .map(|(id, record)| (record.step, id))
        .collect())
}

/// Whether `ancestor` is `id` or in its history (through every parent), as
/// far as this store knows: a commit it lacks is no ancestor.
pub fn is_ancestor(store: &dyn Backend, ancestor: ObjectId, id: ObjectId) -> anyhow::Result<bool> {
    let mut stack = vec![id];
    let mut seen = HashSet::new();
    while let Some(next) = stack.pop() {
        if next == ancestor {
            return Ok(true);
        }
        if !seen.insert(next) {
            continue;
        }
        if let Some(summary) = store.get_commit_summary(&next)? {
            stack.extend(summary.parents.iter().copied());
        }
    }
    Ok(false)
}

/// Every commit reachable from a branch or tag, children before parents.
pub fn reachable_commits(store: &dyn Backend) -> anyhow::Result<Vec<(ObjectId, CommitRecord)>> {
    let mut records: HashMap<ObjectId, CommitRecord> = HashMap::new();
    let mut stack = store.root_commits()?;
    while let Some(id) = stack.pop() {
        if records.contains_key(&id) {
            continue;
        }
        let record = require_commit(store, &id)?;
        stack.extend(record.parents.iter().copied());
        records.insert(id, record);
    }
    let depth = generations(&records);
    let mut out: Vec<(ObjectId, CommitRecord)> = records.into_iter().collect();
    out.sort_by_key(|(id, r)| std::cmp::Reverse((depth[id], r.time_ms, r.step)));
    Ok(out)
}

/// Distance from the root along first parents (the DAG has no merges).
fn generations(records: &HashMap<ObjectId, CommitRecord>) -> HashMap<ObjectId, u64> {
    let mut depth = HashMap::new();
    for &start in records.keys() {
        let mut path = Vec::new();
        let mut next = Some(start);
        while let Some(id) = next {
            if depth.contains_key(&id) || !records.contains_key(&id) {
                break;
            }
            path.push(id);
            next = records[&id].first_parent();
        }
        let base = next
            .and_then(|id| depth.get(&id).map(|d| d + 1))
            .unwrap_or(0);
        for (d, id) in (base..).zip(path.into_iter().rev()) {
            depth.insert(id, d);
        }
    }
    depth
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
pub fn reachable(store: &dyn Backend) -> anyhow::Result<Reachable> {
    reachable_from(store, store.root_commits()?)
}

/// What `roots` keep alive: their histories and the bases their chunks
/// need (what a push must send for those commits).
pub fn reachable_from(store: &dyn Backend, roots: Vec<ObjectId>) -> anyhow::Result<Reachable> {
    let mut stack = roots;
    let mut history = HashSet::new();
    let mut records: HashMap<ObjectId, CommitRecord> = HashMap::new();
    while let Some(id) = stack.pop() {
        if !history.insert(id) {
            continue;
        }
        let record = require_commit(store, &id)?;
        stack.extend(record.parents.iter().copied());
        records.insert(id, record);
    }
    let mut blobs = HashSet::new();
    let mut bases: Vec<(ObjectId, Position)> = Vec::new();
    for (id, record) in &records {
        for (position, chunk) in positioned_chunks(record) {
            blobs.insert(chunk.blob);
            // A chunk's sides are in its own commit or its base: only a
            // base outside the history can make anything else live.
            if chunk.base.is_some_and(|b| !history.contains(&b)) {
                let needs = dependencies(store, *id, &position, chunk)?;
                bases.extend(needs.into_iter().filter(|(c, _)| !history.contains(c)));
            }
        }
    }
    let mut chunks = ChunkLookup::new(store, records);
    let mut base_only: HashMap<ObjectId, HashSet<Position>> = HashMap::new();
    while let Some((id, position)) = bases.pop() {
        if !base_only.entry(id).or_default().insert(position.clone()) {
            continue;
        }
        let chunk = chunks.chunk_at(&id, &position)?;
        blobs.insert(chunk.blob);
        let needs = dependencies(store, id, &position, &chunk)?;
        bases.extend(needs.into_iter().filter(|(c, _)| !history.contains(c)));
    }
    Ok(Reachable {
        history,
        base_only,
        blobs,
    })
}

/// Every blob that decoding commit `id` reads: its chunks', and down each
/// chunk's chain of residual bases and side chunks, the chunks of those
/// commits. What a lazy clone must download to check `id` out. The sides
/// a blob names are known only once the blob is here: a blob missing from
/// the store is in the set, but not the sides it needs, so a lazy clone
/// downloads the set and asks again until nothing is missing.
pub fn checkout_blobs(store: &dyn Backend, id: &ObjectId) -> anyhow::Result<HashSet<ObjectId>> {
    let record = require_commit(store, id)?;
    let mut wanted: Vec<(ObjectId, Position)> = positioned_chunks(&record)
        .into_iter()
        .map(|(position, _)| (*id, position))
        .collect();
    let mut chunks = ChunkLookup::new(store, HashMap::from([(*id, record)]));
    let mut seen: HashSet<(ObjectId, Position)> = HashSet::new();
    let mut blobs = HashSet::new();
    while let Some((commit, position)) = wanted.pop() {
        if !seen.insert((commit, position.clone())) {
            continue;
        }
        let chunk = chunks.chunk_at(&commit, &position)?;
        blobs.insert(chunk.blob);
        wanted.extend(dependencies(store, commit, &position, &chunk)?);
    }
    Ok(blobs)
}

/// What decoding `chunk` (at `position` of `commit`) reads besides its own
/// blob: its base commit's chunk at the same position, and the side chunks
/// its blob names (m's v̂; W's m̂ and v̂, of this commit and of the base).
/// A blob not in the store (a lazy clone's, not yet downloaded) gives its
/// base only: its sides are known once it is here.
pub(crate) fn dependencies(
    store: &dyn Backend,
    commit: ObjectId,
    position: &Position,
    chunk: &ChunkRef,
) -> anyhow::Result<Vec<(ObjectId, Position)>> {
    let mut needs: Vec<(ObjectId, Position)> = chunk
        .base
        .map(|b| (b, position.clone()))
        .into_iter()
        .collect();
    if !matches!(chunk.codec, Codec::Quant | Codec::QuantDelta) {
        return Ok(needs);
    }
    if !store.has_blob(&chunk.blob)? {
        return Ok(needs);
    }
    let sides = codec::sides_of(&blob_head(store, &chunk.blob)?)
        .with_context(|| format!("blob {}: its side chunks", chunk.blob.short()))?;
    for side in sides {
        let at = if side.in_base {
            chunk.base.with_context(|| {
                format!(
                    "blob {} names a side in a base it lacks",
                    chunk.blob.short()
                )
            })?
        } else {
            commit
        };
        let file = side.file.unwrap_or_else(|| position.0.clone());
        needs.push((at, (file, Some(side.tensor), position.2)));
    }
    Ok(needs)
}

/// A blob's first bytes, enough for its header and side references (the
/// whole blob when they are longer).
fn blob_head(store: &dyn Backend, id: &ObjectId) -> anyhow::Result<Vec<u8>> {
    const HEAD: u64 = 4096;
    let head = store.get_blob_range(id, 0..HEAD)?;
    if (head.len() as u64) < HEAD || codec::sides_of(&head).is_ok() {
        return Ok(head);
    }
    Ok(store.get_blob(id)?)
}

/// Chunks of commits by position, each commit's record read and indexed
/// once (a scan per lookup would be quadratic in the number of chunks).
struct ChunkLookup<'s> {
    store: &'s dyn Backend,
    records: HashMap<ObjectId, CommitRecord>,
    by_position: HashMap<ObjectId, HashMap<Position, ChunkRef>>,
}

impl<'s> ChunkLookup<'s> {
    fn new(store: &'s dyn Backend, records: HashMap<ObjectId, CommitRecord>) -> Self {
        ChunkLookup {
            store,
            records,
            by_position: HashMap::new(),
        }
    }

    /// The chunk of `commit` at `position`, which a chunk coded against it
    /// needs.
    fn chunk_at(&mut self, commit: &ObjectId, position: &Position) -> anyhow::Result<ChunkRef> {
        if !self.by_position.contains_key(commit) {
            let record = match self.records.remove(commit) {
                Some(record) => record,
                None => require_commit(self.store, commit)?,
            };
            let index = positioned_chunks(&record)
                .into_iter()
                .map(|(p, c)| (p, c.clone()))
                .collect();
            self.by_position.insert(*commit, index);
        }
        self.by_position[commit]
            .get(position)
            .cloned()
            .with_context(|| {
                format!("commit {commit}, a residual base, lacks the chunk coded against it")
            })
    }
}
