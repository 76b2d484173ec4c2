//! Many ranks, one commit: which files are whose, what a rank's shard of a
//! step records, and sealing the shards into one commit.
//!
//! Each rank commits its own files of step S (`commit DIR --step S --shard
//! K/N`): it encodes and stages them with no store-wide lock held
//! (`commit::shard`), then publishes its [`ShardManifest`]. Whoever finds
//! all N manifests present after publishing its own seals the step:
//! under the writer lock (a local store) or by compare-and-swap of the
//! branch (a bucket), the shards' blobs become store blobs and one commit
//! record holding every shard's files is published, atomically as any
//! commit. Until then no reader sees any of it. A rank that never arrives
//! leaves the step pending: [`pending`] lists it and `gc` removes it after
//! its grace period.
//!
//! Each shard is coded against the branch tip it saw when it started (its
//! *base*); the sealed commit's parent is the branch tip at sealing, which
//! must be that base or a descendant of it, so every delta base a shard
//! refers to stays in the sealed commit's history.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::codec::policy::Policy;
use crate::repo::Repo;
use crate::repo::commit::{relative, update_totals};
use crate::repo::inspect::LogEntry;
use crate::repo::walk::is_ancestor;
use crate::store::object::{ErrorTotals, TensorUpdateError, UpdateErrors, version_for};
use crate::store::pending::PendingKey;
use crate::store::{CommitRecord, FileEntry, ObjectId, StoreError};

/// Rank `index` of `count` ranks writing one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl std::str::FromStr for Shard {
    type Err = String;

    /// `K/N`, e.g. `0/4`.
    fn from_str(text: &str) -> Result<Shard, String> {
        let bad = || format!("`{text}` is not a shard: write K/N with 0 <= K < N, e.g. 0/4");
        let (k, n) = text.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            k.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// The rank a file of a sharded checkpoint belongs to, from its name:
/// `__K_0.distcp` (PyTorch DCP), `zero_pp_rank_K_…` (DeepSpeed), or
/// `rankK` / `rank_K` / `rank-K` (not after `mp_`, `pp_` or `tp_`, which
/// number other parallel dimensions) in the file's name or, failing that,
/// in its folder's (`rank3/model.safetensors`). `None` for a file of no
/// rank (metadata, model files written once): rank 0 commits those.
pub fn rank_of(name: &str) -> Option<u32> {
    name.rsplit('/').find_map(rank_in_component)
}

fn rank_in_component(base: &str) -> Option<u32> {
    if let Some(rest) = base.strip_prefix("__")
        && base.ends_with(crate::format::dcp::DATA_EXTENSION)
    {
        return leading_number(rest);
    }
    if let Some(at) = base.find("zero_pp_rank_") {
        return leading_number(&base[at + "zero_pp_rank_".len()..]);
    }
    base.match_indices("rank").find_map(|(at, _)| {
        let before = &base[..at];
        let other_dimension = ["mp_", "pp_", "tp_"].iter().any(|p| before.ends_with(p));
        let after = base[at + 4..].trim_start_matches(['_', '-']);
        (!other_dimension).then(|| leading_number(after)).flatten()
    })
}

fn leading_number(text: &str) -> Option<u32> {
    let digits: String = text.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The shard that commits (and checks out) file `name`: its rank, or 0.
pub fn shard_of(name: &str) -> u32 {
    rank_of(name).unwrap_or(0)
}

/// The commit group of a shard when none is given: torchrun's run id and
/// restart count, so that shards of a restarted job never mix with those
/// of the attempt that crashed; empty outside torchrun.
pub fn default_group() -> String {
    match (
        std::env::var("TORCHELASTIC_RUN_ID"),
        std::env::var("TORCHELASTIC_RESTART_COUNT"),
    ) {
        (Ok(id), Ok(restart)) => format!("{id}.{restart}"),
        (Ok(id), Err(_)) => id,
        _ => String::new(),
    }
}

/// Version of [`ShardManifest`]. Version 2 appends the shard's
/// [`ShardUpdateErrors`] (an `Option`) after its files; version 1 is read
/// as version 2 without them.
pub const MANIFEST_VERSION: u32 = 2;
const OLDEST_MANIFEST_VERSION: u32 = 1;

/// One rank's part of a pending step (postcard, versioned; opaque to the
/// store layer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardManifest {
    pub version: u32,
    pub shard: u32,
    pub count: u32,
    /// The commit this shard's deltas were coded against.
    pub base: Option<ObjectId>,
    pub keyframe: bool,
    /// Length of the longest delta chain of this shard's chunks.
    pub chain_depth: u32,
    pub policy: Policy,
    pub message: String,
    pub time_ms: u64,
    pub input_bytes: u64,
    /// Bytes of the blobs this shard added.
    pub stored_bytes: u64,
    /// (Σ squared error, Σ squared input) of lossy W, m and v.
    pub error_sums: [(f64, f64); 3],
    pub files: Vec<FileEntry>,
    /// Version 2 on (the tail): the errors in Adam's update.
    #[serde(skip)]
    pub update_errors: Option<ShardUpdateErrors>,
}

/// A shard's errors in Adam's update: per tensor (`file` indexes the
/// manifest's files), and per role (W: both moments, m, v) as sums that
/// seal adds over the shards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardUpdateErrors {
    pub tensors: Vec<TensorUpdateError>,
    pub role_sums: [(f64, f64); 3],
}

impl ShardManifest {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = postcard::to_stdvec(self).expect("serializing to a Vec cannot fail");
        if self.version >= 2 {
            let tail = postcard::to_stdvec(&self.update_errors);
            bytes.extend(tail.expect("serializing to a Vec cannot fail"));
        }
        bytes
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<ShardManifest, String> {
        let (version, _) = postcard::take_from_bytes::<u32>(bytes).map_err(|e| e.to_string())?;
        if !(OLDEST_MANIFEST_VERSION..=MANIFEST_VERSION).contains(&version) {
            return Err(format!(
                "shard manifest version {version} is not supported (this build reads {OLDEST_MANIFEST_VERSION} to {MANIFEST_VERSION})"
            ));
        }
        let (mut manifest, tail) =
            postcard::take_from_bytes::<ShardManifest>(bytes).map_err(|e| e.to_string())?;
        if version >= 2 {
            manifest.update_errors = postcard::from_bytes(tail)
                .map_err(|e| format!("the manifest's update errors do not parse: {e}"))?;
        }
        Ok(manifest)
    }
}

/// The identity of a shard's files, under which its reconstruction cache
/// is kept: equal for the manifest and for the sealed commit's same files.
pub fn files_id(files: &[FileEntry]) -> ObjectId {
    ObjectId::of(&postcard::to_stdvec(files).expect("serializing to a Vec cannot fail"))
}

/// A pending step, for `status` and `gc`.
#[derive(Debug, Clone, Serialize)]
pub struct PendingReport {
    pub branch: String,
    pub step: u64,
    pub group: String,
    /// Shards that have arrived, and how many the step needs.
    pub arrived: Vec<u32>,
    pub count: Option<u32>,
    pub age_secs: u64,
}

/// Every pending (unsealed) step of the store.
pub fn pending(repo: &Repo) -> anyhow::Result<Vec<PendingReport>> {
    let mut out = Vec::new();
    for info in repo.pending_steps()? {
        let count = repo
            .shard_manifests(&info.key)?
            .first()
            .and_then(|(_, bytes)| ShardManifest::from_bytes(bytes).ok())
            .map(|m| m.count);
        out.push(PendingReport {
            branch: info.key.branch,
            step: info.key.step,
            group: info.key.group,
            arrived: info.shards,
            count,
            age_secs: info.age_secs,
        });
    }
    Ok(out)
}

/// Removes (or with `dry_run` counts) pending steps untouched for longer
/// than `grace`, and those whose step has been sealed meanwhile.
pub fn sweep_pending(repo: &Repo, grace: Duration, dry_run: bool) -> anyhow::Result<usize> {
    let mut removed = 0;
    for info in repo.pending_steps()? {
        let sealed = repo
            .commit_at_step(&info.key.branch, info.key.step)?
            .is_some();
        if sealed || info.age_secs >= grace.as_secs() {
            if !dry_run {
                repo.drop_pending(&info.key)?;
            }
            removed += 1;
        }
    }
    Ok(removed)
}

/// What sealing did.
#[derive(Debug, Clone, Serialize)]
pub struct Sealed {
    #[serde(skip)]
    pub id: ObjectId,
    #[serde(flatten)]
    pub entry: LogEntry,
    /// Whether this process sealed it (or found it sealed by another).
    pub by_this_process: bool,
}

/// How long a rank that found every shard in waits for the writer lock.
const SEAL_LOCK_WAIT: Duration = Duration::from_secs(600);

/// Seals `key` if all `count` shards have arrived; `None` while some are
/// missing.
pub fn try_seal(
    repo: &Repo,
    key: &PendingKey,
    count: u32,
    lock_wait: Duration,
) -> anyhow::Result<Option<Sealed>> {
    if (repo.shard_manifests(key)?.len() as u32) < count {
        return Ok(None);
    }
    // Several ranks may find every shard in at once; each waits its turn
    // (sealing is short) and the later ones find the step sealed.
    let (store, ()) = repo.write(lock_wait.max(SEAL_LOCK_WAIT), |_| Ok(()))?;
    // The tip before the step: a bucket has no writer lock, and a rank that
    // seals the step after this read moves the tip, so that the compare-
    // and-swap below fails instead of stacking a second commit of the step
    // on the first.
    let parent = store.branch_tip(&key.branch)?;
    if let Some(id) = store.commit_at_step(&key.branch, key.step)? {
        return sealed_elsewhere(&store, key, id);
    }
    let manifests = read_manifests(&store, key, count)?;
    if manifests.len() < count as usize {
        return Ok(None);
    }
    check_bases(&store, key, &manifests, parent)?;
    let record = sealed_record(key, &manifests, parent)?;
    store.adopt_shards(key)?;
    let view = store.hold_readers()?;
    store.flush_blobs()?;
    let id = match store.publish_commit(&record, &[]) {
        Ok(id) => id,
        // Two ranks sealing a bucket at once: the one whose compare-and-
        // swap lost finds the step sealed by the other, whose commit stands.
        Err(e @ StoreError::RefMoved { .. }) => {
            drop(view);
            return match store.commit_at_step(&key.branch, key.step)? {
                Some(id) => sealed_elsewhere(&store, key, id),
                None => Err(e.into()),
            };
        }
        Err(e) => return Err(e.into()),
    };
    drop(view);
    store.drop_pending(key)?;
    Ok(Some(Sealed {
        entry: LogEntry::new(&id, &(&record).into()),
        id,
        by_this_process: true,
    }))
}

fn sealed_elsewhere(
    store: &Repo,
    key: &PendingKey,
    id: ObjectId,
) -> anyhow::Result<Option<Sealed>> {
    let summary = store
        .get_commit_summary(&id)?
        .with_context(|| format!("commit {id} is missing"))?;
    store.drop_pending(key)?;
    Ok(Some(Sealed {
        entry: LogEntry::new(&id, &summary),
        id,
        by_this_process: false,
    }))
}

fn read_manifests(
    store: &Repo,
    key: &PendingKey,
    count: u32,
) -> anyhow::Result<Vec<ShardManifest>> {
    let mut manifests = Vec::new();
    for (shard, bytes) in store.shard_manifests(key)? {
        let manifest = ShardManifest::from_bytes(&bytes).map_err(|e| {
            anyhow::anyhow!(
                "shard {shard} of step {} on `{}`: unreadable manifest: {e}",
                key.step,
                key.branch
            )
        })?;
        if manifest.shard != shard || manifest.count != count {
            bail!(
                "shard {shard} of step {} on `{}` was committed as {}/{}, not as one of {count} shards",
                key.step,
                key.branch,
                manifest.shard,
                manifest.count
            );
        }
        manifests.push(manifest);
    }
    Ok(manifests)
}

/// Every shard's delta bases must stay in the sealed commit's history.
fn check_bases(
    store: &Repo,
    key: &PendingKey,
    manifests: &[ShardManifest],
    parent: Option<ObjectId>,
) -> anyhow::Result<()> {
    for m in manifests {
        let Some(base) = m.base else { continue };
        let on_branch = match parent {
            Some(tip) => tip == base || is_ancestor(store.backend(), base, tip)?,
            None => false,
        };
        if !on_branch {
            bail!(
                "shard {} of step {} was coded against commit {}, which is no longer on branch `{}`; commit the step again",
                m.shard,
                key.step,
                base.short(),
                key.branch
            );
        }
    }
    Ok(())
}

/// One commit record of all shards' files. Deterministic in the manifests
/// and the parent, so two ranks sealing at once build the same record.
fn sealed_record(
    key: &PendingKey,
    manifests: &[ShardManifest],
    parent: Option<ObjectId>,
) -> anyhow::Result<CommitRecord> {
    let mut files: Vec<FileEntry> = manifests.iter().flat_map(|m| m.files.clone()).collect();
    files.sort_by(|a, b| a.name.cmp(&b.name));
    let mut names = BTreeSet::new();
    if let Some(twice) = files.iter().find(|f| !names.insert(f.name.as_str())) {
        bail!(
            "file {} of step {} was committed by two shards",
            twice.name,
            key.step
        );
    }
    let keyframe = manifests.iter().all(|m| m.keyframe);
    let mut policies = manifests.iter().filter(|m| !m.keyframe).map(|m| &m.policy);
    let policy = policies.next().cloned().unwrap_or(Policy::Lossless);
    if policies.any(|p| *p != policy) {
        bail!(
            "the shards of step {} were coded with different policies",
            key.step
        );
    }
    let mut sums = [(0.0, 0.0); 3];
    for m in manifests {
        for (total, (e, n)) in sums.iter_mut().zip(m.error_sums) {
            total.0 += e;
            total.1 += n;
        }
    }
    let relative = |(e, n): (f64, f64)| relative(e, n);
    let update_errors = sealed_update_errors(manifests, &files);
    Ok(CommitRecord {
        version: version_for(&files, &policy, update_errors.as_ref()),
        parents: parent.into_iter().collect(),
        branch: key.branch.clone(),
        step: key.step,
        time_ms: manifests.iter().map(|m| m.time_ms).max().unwrap_or(0),
        message: manifests
            .iter()
            .map(|m| m.message.as_str())
            .find(|m| !m.is_empty())
            .unwrap_or("")
            .to_string(),
        keyframe,
        chain_depth: manifests.iter().map(|m| m.chain_depth).max().unwrap_or(0),
        policy,
        input_bytes: manifests.iter().map(|m| m.input_bytes).sum(),
        stored_bytes: manifests.iter().map(|m| m.stored_bytes).sum(),
        errors: ErrorTotals {
            w: relative(sums[0]),
            m: relative(sums[1]),
            v: relative(sums[2]),
        },
        files,
        update_errors,
    })
}

/// The shards' update errors as one record's: tensors re-indexed into the
/// sealed (name-sorted) `files`, role sums added; `None` if no shard has any.
fn sealed_update_errors(manifests: &[ShardManifest], files: &[FileEntry]) -> Option<UpdateErrors> {
    let mut roles = [(0.0, 0.0); 3];
    let mut tensors = Vec::new();
    for m in manifests {
        let Some(shard) = &m.update_errors else {
            continue;
        };
        for (total, (e, n)) in roles.iter_mut().zip(shard.role_sums) {
            total.0 += e;
            total.1 += n;
        }
        for t in &shard.tensors {
            let name = &m.files[t.file as usize].name;
            let file = files.partition_point(|f| f.name < *name);
            tensors.push(TensorUpdateError {
                file: file as u32,
                ..*t
            });
        }
    }
    if tensors.is_empty() {
        return None;
    }
    tensors.sort_by_key(|t| (t.file, t.tensor));
    Some(UpdateErrors {
        totals: update_totals(roles),
        tensors,
    })
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_belong_to_their_rank() {
        assert_eq!(rank_of("__3_0.distcp"), Some(3));
        assert_eq!(rank_of("optimizer_0/__12_0.distcp"), Some(12));
        assert_eq!(
            rank_of("global_step6/zero_pp_rank_1_mp_rank_00_optim_states.pt"),
            Some(1)
        );
        assert_eq!(rank_of("global_step6/mp_rank_00_model_states.pt"), None);
        assert_eq!(rank_of("rank2.safetensors"), Some(2));
        assert_eq!(rank_of("model_rank-05.pt"), Some(5));
        assert_eq!(rank_of(".metadata"), None);
        assert_eq!(rank_of("latest"), None);
        assert_eq!(rank_of("rank3/model.safetensors"), Some(3));
        assert_eq!(rank_of("step/model.safetensors"), None);
        assert_eq!(shard_of("latest"), 0);
    }

    #[test]
    fn shards_parse() {
        assert_eq!("1/4".parse(), Ok(Shard { index: 1, count: 4 }));
        assert!("4/4".parse::<Shard>().is_err());
        assert!("x".parse::<Shard>().is_err());
    }
}
