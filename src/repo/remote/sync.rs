//! Moving commits between a local store and a remote.
//!
//! - [`push`]: sends what the remote lacks (blobs in packs, then commit
//!   records), then moves each remote branch from the tip it was seen at to
//!   the local tip with a compare-and-swap: of two pushes to one branch,
//!   exactly one wins; the other is refused and nothing is lost.
//! - [`fetch`]: brings the remote's new commits (records, and blobs unless
//!   the store is lazy) and sets the remote-tracking branches
//!   `<remote>/<branch>` in one local batch, after the blobs are durable.
//! - [`pull`]: fetch, then fast-forward the current branch.
//! - [`clone`]: a new local store holding the remote's config, branches and
//!   HEAD; `--lazy` takes records and refs only.
//! - [`fill_for_checkout`]: in a lazy store, downloads just the blobs one
//!   commit needs (its chunks and their chains of bases), each checked
//!   against its blake3 id, and keeps them.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use super::{Remote, RemotesFile, local_root};
use crate::repo::Repo;
use crate::repo::error::RepoError;
use crate::repo::progress::Progress;
use crate::repo::walk::{checkout_blobs, is_ancestor, reachable_from};
use crate::store::bucket::Traffic;
use crate::store::{
    BlobStore, BucketStore, CommitSummary, MetaStore, ObjectId, RefEdit, RefKind, StoreError,
};

/// Bytes of blobs asked of the remote at once: a few ranged GETs in
/// flight, and a bounded amount of memory whatever the checkpoint's size.
const DOWNLOAD_BATCH_BYTES: u64 = 64 << 20;

/// What `push` is asked to send.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// Branches to push; empty: the current branch.
    pub branches: Vec<String>,
    pub all: bool,
    pub tags: bool,
    /// Move remote branches even when that drops commits they have.
    pub force: bool,
    pub lock_wait: Duration,
}

/// One branch of a push.
#[derive(Debug, Clone, Serialize)]
pub struct PushedRef {
    pub name: String,
    /// `branch` or `tag`.
    pub kind: &'static str,
    /// Remote tip before (`None`: new on the remote).
    pub from: Option<String>,
    pub to: String,
    /// `created`, `fast-forward`, `forced` or `up-to-date`.
    pub status: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    pub remote: String,
    pub refs: Vec<PushedRef>,
    pub commits_sent: usize,
    pub blobs_sent: usize,
    /// Encoded bytes of the blobs sent.
    pub blob_bytes_sent: u64,
    /// Requests and bytes on the wire.
    pub traffic: Traffic,
}

#[derive(Debug, Clone, Serialize)]
pub struct FetchedRef {
    /// The remote-tracking branch, `<remote>/<branch>`.
    pub tracking: String,
    pub from: Option<String>,
    pub to: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct FetchReport {
    pub remote: String,
    pub refs: Vec<FetchedRef>,
    /// Remote-tracking branches whose remote branch is gone.
    pub pruned: Vec<String>,
    /// Tags new here, taken from the remote.
    pub tags: Vec<String>,
    /// Remote tags whose name a local tag on another commit has (left as
    /// they are).
    pub tags_differing: Vec<String>,
    pub commits_fetched: usize,
    pub blobs_fetched: usize,
    pub blob_bytes_fetched: u64,
    /// Blobs left on the remote because the store is lazy.
    pub lazy: bool,
    pub traffic: Traffic,
}

#[derive(Debug, Clone, Serialize)]
pub struct CloneReport {
    pub url: String,
    pub dir: String,
    pub branches: Vec<String>,
    pub head: String,
    pub fetch: FetchReport,
}

fn open_remote(remote: &Remote) -> anyhow::Result<BucketStore> {
    BucketStore::open(&remote.url).with_context(|| format!("remote `{}`", remote.name))
}

/// Pushes branches (and tags) to remote `name`.
pub fn push(
    repo: &Repo,
    name: &str,
    options: &PushOptions,
    progress: &dyn Progress,
) -> anyhow::Result<PushReport> {
    let root = local_root(repo, "push")?;
    let remotes = RemotesFile::load(root)?;
    let remote = remotes.get(name)?.clone();
    if !remote.conditional_writes {
        bail!(
            "remote `{name}` ({}) did not honour conditional writes when it was added, so two pushes could overwrite each other's branches; refusing to push",
            remote.url
        );
    }
    let bucket = BucketStore::open_or_create(&remote.url, &repo.config()?)
        .with_context(|| format!("remote `{name}`"))?;
    if !bucket.probe_conditional_writes()? {
        bail!(
            "remote `{name}` ({}) no longer refuses a second create-only write; refusing to push",
            remote.url
        );
    }
    let branches = branches_to_push(repo, &remotes, options)?;
    let tags = if options.tags {
        repo.tags()?
    } else {
        Vec::new()
    };

    // What each ref will move from, checked before anything is sent.
    let mut plans = Vec::new();
    for (branch, tip) in &branches {
        let seen = bucket.branch_tip(branch)?;
        plans.push(plan_ref(
            repo,
            RefKind::Branch,
            branch,
            *tip,
            seen,
            options.force,
            &remote,
        )?);
    }
    for (tag, target) in &tags {
        let seen = bucket.tag_target(tag)?;
        plans.push(plan_ref(
            repo,
            RefKind::Tag,
            tag,
            *target,
            seen,
            options.force,
            &remote,
        )?);
    }

    let roots: Vec<ObjectId> = plans.iter().map(|p| p.to).collect();
    let live = reachable_from(repo.backend(), roots)?;
    let remote_commits: HashSet<ObjectId> = bucket.commit_ids()?.into_iter().collect();
    let mut commits: Vec<ObjectId> = live
        .history
        .iter()
        .chain(live.base_only.keys())
        .filter(|id| !remote_commits.contains(id))
        .copied()
        .collect();
    commits.sort();
    let mut blobs = Vec::new();
    for id in &live.blobs {
        if !bucket.has_blob(id)? {
            blobs.push(*id);
        }
    }
    blobs.sort();

    // Blobs, then records, then refs: no ref on the remote ever points at
    // something missing, whatever step an interruption stops at.
    let blob_bytes_sent = send_blobs(repo, &bucket, &blobs, progress)?;
    for id in &commits {
        let bytes = repo
            .get_commit_bytes(id)?
            .with_context(|| format!("commit {id} is missing from the local store"))?;
        bucket.apply(&RefEdit {
            put_commits: vec![(*id, bytes)],
            ..RefEdit::default()
        })?;
    }
    let mut refs = Vec::new();
    for plan in &plans {
        if plan.status != "up-to-date" {
            bucket
                .compare_and_swap_ref(plan.kind, &plan.name, plan.from, Some(plan.to))
                .map_err(|e| moved_error(e, &remote, plan))?;
        }
        refs.push(PushedRef {
            name: plan.name.clone(),
            kind: plan.kind.noun(),
            from: plan.from.map(|id| id.to_hex()),
            to: plan.to.to_hex(),
            status: plan.status,
        });
    }
    update_tracking_after_push(repo, &remote, &plans, options.lock_wait)?;
    Ok(PushReport {
        remote: name.to_string(),
        refs,
        commits_sent: commits.len(),
        blobs_sent: blobs.len(),
        blob_bytes_sent,
        traffic: bucket.traffic(),
    })
}

/// The local branches a push sends, with their tips.
fn branches_to_push(
    repo: &Repo,
    remotes: &RemotesFile,
    options: &PushOptions,
) -> anyhow::Result<Vec<(String, ObjectId)>> {
    if options.all {
        return Ok(repo
            .branches()?
            .into_iter()
            .filter(|(b, _)| !remotes.is_tracking(b))
            .collect());
    }
    let names = if options.branches.is_empty() {
        vec![repo.head_branch()?]
    } else {
        options.branches.clone()
    };
    names
        .into_iter()
        .map(|b| {
            if remotes.is_tracking(&b) {
                bail!("`{b}` is a remote-tracking branch; push the local branch instead");
            }
            let tip = repo
                .branch_tip(&b)?
                .with_context(|| format!("no branch named `{b}`"))?;
            Ok((b, tip))
        })
        .collect()
}

struct RefPlan {
    kind: RefKind,
    name: String,
    from: Option<ObjectId>,
    to: ObjectId,
    status: &'static str,
}

/// Fast-forward only: the remote's tip must be in the local history of the
/// new tip (tags: must not exist, or already match), unless forced.
fn plan_ref(
    repo: &Repo,
    kind: RefKind,
    name: &str,
    to: ObjectId,
    seen: Option<ObjectId>,
    force: bool,
    remote: &Remote,
) -> anyhow::Result<RefPlan> {
    let status = match seen {
        None => "created",
        Some(from) if from == to => "up-to-date",
        Some(from) if kind == RefKind::Branch && is_ancestor(repo.backend(), from, to)? => {
            "fast-forward"
        }
        Some(_) if force => "forced",
        Some(_) if kind == RefKind::Tag => bail!(
            "remote {} has tag `{name}` on another commit; pass force to move it",
            remote.name
        ),
        Some(_) => {
            return Err(RepoError::NotFastForward {
                remote: remote.name.clone(),
                branch: name.to_string(),
            }
            .into());
        }
    };
    Ok(RefPlan {
        kind,
        name: name.to_string(),
        from: seen,
        to,
        status,
    })
}

fn moved_error(e: StoreError, remote: &Remote, plan: &RefPlan) -> anyhow::Error {
    match e {
        StoreError::RefMoved { .. } => anyhow::Error::new(e).context(format!(
            "remote {} {} `{}` moved while pushing (another push won); fetch and push again",
            remote.name,
            plan.kind.noun(),
            plan.name
        )),
        e => e.into(),
    }
}

/// Copies blobs from the local store into the remote's packs.
fn send_blobs(
    repo: &Repo,
    bucket: &BucketStore,
    blobs: &[ObjectId],
    progress: &dyn Progress,
) -> anyhow::Result<u64> {
    let sizes: HashMap<ObjectId, u64> = repo.blob_sizes()?.into_iter().collect();
    let total = blobs.iter().filter_map(|id| sizes.get(id)).sum();
    let mut bytes = 0;
    progress.begin("push", total);
    for id in blobs {
        let blob = repo.get_blob(id)?;
        bytes += blob.len() as u64;
        bucket.put_blob(id, &blob)?;
        progress.advance(blob.len() as u64);
    }
    bucket.flush_blobs()?;
    progress.finish();
    Ok(bytes)
}

/// After a push, `<remote>/<branch>` is what the remote now has.
fn update_tracking_after_push(
    repo: &Repo,
    remote: &Remote,
    plans: &[RefPlan],
    wait: Duration,
) -> anyhow::Result<()> {
    let (writer, ()) = repo.write(wait, |_| Ok(()))?;
    let mut edit = RefEdit::default();
    for plan in plans.iter().filter(|p| p.kind == RefKind::Branch) {
        let tracking = format!("{}/{}", remote.name, plan.name);
        set_branch_with_steps(&writer, &mut edit, &tracking, plan.to, &HashMap::new())?;
    }
    writer.apply(&edit)?;
    Ok(())
}

/// Adds to `edit` branch `name` at `tip` with its whole step index, reading
/// records from `fetched` or the local store.
fn set_branch_with_steps(
    local: &Repo,
    edit: &mut RefEdit,
    name: &str,
    tip: ObjectId,
    fetched: &HashMap<ObjectId, Vec<u8>>,
) -> anyhow::Result<()> {
    let mut next = Some(tip);
    edit.clear_steps.push(name.to_string());
    while let Some(id) = next {
        let summary = summary_of(local, fetched, &id)?;
        edit.set_steps.push((name.to_string(), summary.step, id));
        next = summary.first_parent();
    }
    edit.set_branches.push((name.to_string(), tip));
    Ok(())
}

fn summary_of(
    local: &Repo,
    fetched: &HashMap<ObjectId, Vec<u8>>,
    id: &ObjectId,
) -> anyhow::Result<CommitSummary> {
    if let Some(bytes) = fetched.get(id) {
        return Ok(crate::store::backend::decode_summary(id, bytes)?);
    }
    local
        .get_commit_summary(id)?
        .with_context(|| format!("commit {id} is missing from the local store"))
}

/// Fetches remote `name` into the local store.
pub fn fetch(
    repo: &Repo,
    name: &str,
    wait: Duration,
    progress: &dyn Progress,
) -> anyhow::Result<FetchReport> {
    let root = local_root(repo, "fetch")?;
    let remotes = RemotesFile::load(root)?;
    let remote = remotes.get(name)?.clone();
    let lazy = remotes.lazy.as_deref() == Some(name);
    let bucket = open_remote(&remote)?;
    let remote_branches = bucket.branches()?;
    let remote_tags = bucket.tags()?;

    let (writer, ()) = repo.write(wait, |_| Ok(()))?;
    let tips = remote_branches
        .iter()
        .chain(&remote_tags)
        .map(|(_, id)| *id);
    let (fetched, wanted_blobs) = fetch_records(&writer, &bucket, tips)?;
    let (blobs_fetched, blob_bytes_fetched) = if lazy {
        (0, 0)
    } else {
        fetch_blobs_of(&writer, &bucket, wanted_blobs, progress)?
    };

    // Records, tracking branches and their step indexes in one batch, after
    // the blobs are durable: a crash leaves the old refs or the new ones.
    let mut edit = RefEdit {
        put_commits: fetched.iter().map(|(id, b)| (*id, b.clone())).collect(),
        ..RefEdit::default()
    };
    let mut refs = Vec::new();
    for (branch, tip) in &remote_branches {
        let tracking = format!("{name}/{branch}");
        let before = writer.branch_tip(&tracking)?;
        if before == Some(*tip) {
            continue;
        }
        set_branch_with_steps(&writer, &mut edit, &tracking, *tip, &fetched)?;
        refs.push(FetchedRef {
            tracking,
            from: before.map(|id| id.to_hex()),
            to: tip.to_hex(),
        });
    }
    let prefix = format!("{name}/");
    let pruned: Vec<String> = writer
        .branches()?
        .into_iter()
        .filter_map(|(b, _)| {
            let rest = b.strip_prefix(&prefix)?;
            (!remote_branches.iter().any(|(rb, _)| rb == rest)).then_some(b)
        })
        .collect();
    edit.delete_branches.extend(pruned.iter().cloned());
    edit.clear_steps.extend(pruned.iter().cloned());
    // Tags the store lacks come along; a local tag of the same name on
    // another commit stays as it is (reported, not moved).
    let mut tags = Vec::new();
    let mut tags_differing = Vec::new();
    for (name, id) in &remote_tags {
        match writer.tag_target(name)? {
            None => {
                edit.set_tags.push((name.clone(), *id));
                tags.push(name.clone());
            }
            Some(local) if local != *id => tags_differing.push(name.clone()),
            Some(_) => {}
        }
    }
    if !edit.is_empty() {
        writer.apply(&edit)?;
    }
    Ok(FetchReport {
        remote: name.to_string(),
        refs,
        pruned,
        tags,
        tags_differing,
        commits_fetched: fetched.len(),
        blobs_fetched,
        blob_bytes_fetched,
        lazy,
        traffic: bucket.traffic(),
    })
}

/// Commit records by id, as stored.
type Records = HashMap<ObjectId, Vec<u8>>;

/// Downloads every record reachable from `tips` (through parents and
/// residual bases) that the local store lacks, checked against its id.
/// Returns the records' bytes as stored (a re-encoding could differ from
/// them, and so from their id, for older record versions) and the blobs
/// they name.
fn fetch_records(
    local: &Repo,
    bucket: &BucketStore,
    tips: impl Iterator<Item = ObjectId>,
) -> anyhow::Result<(Records, HashSet<ObjectId>)> {
    let mut fetched: HashMap<ObjectId, Vec<u8>> = HashMap::new();
    let mut blobs = HashSet::new();
    let mut stack: Vec<ObjectId> = tips.collect();
    while let Some(id) = stack.pop() {
        if fetched.contains_key(&id) || local.get_commit_bytes(&id)?.is_some() {
            continue;
        }
        let bytes = bucket.get_commit_bytes(&id)?.with_context(|| {
            format!(
                "remote {} refers to commit {id}, which it does not have",
                bucket.url()
            )
        })?;
        let record = crate::store::backend::decode_commit(&id, &bytes)?;
        stack.extend(record.parents.iter().copied());
        for file in &record.files {
            stack.extend(file.chunks().filter_map(|c| c.base));
            blobs.extend(file.chunks().map(|c| c.blob));
        }
        fetched.insert(id, bytes);
    }
    Ok((fetched, blobs))
}

/// Downloads the blobs of newly fetched records that the local store
/// lacks (only those on the remote: a base kept by `prune` keeps only some
/// chunks).
fn fetch_blobs_of(
    local: &Repo,
    bucket: &BucketStore,
    wanted: HashSet<ObjectId>,
    progress: &dyn Progress,
) -> anyhow::Result<(usize, u64)> {
    let mut missing = Vec::new();
    for id in wanted {
        if !local.has_blob(&id)? && bucket.has_blob(&id)? {
            missing.push(id);
        }
    }
    download_into(local, bucket, missing, progress)
}

/// Downloads `ids` from the bucket (checked against their ids) into the
/// local store, durable when this returns.
fn download_into(
    local: &Repo,
    bucket: &BucketStore,
    mut ids: Vec<ObjectId>,
    progress: &dyn Progress,
) -> anyhow::Result<(usize, u64)> {
    ids.sort();
    let sizes: HashMap<ObjectId, u64> = bucket.blob_sizes()?.into_iter().collect();
    let mut bytes = 0;
    progress.begin("fetch", ids.iter().filter_map(|id| sizes.get(id)).sum());
    for batch in bucket.download_batches(&ids, DOWNLOAD_BATCH_BYTES)? {
        for (id, blob) in bucket.get_blobs(&batch)? {
            bytes += blob.len() as u64;
            local.put_blob(&id, &blob)?;
            progress.advance(blob.len() as u64);
        }
    }
    local.flush_blobs()?;
    progress.finish();
    Ok((ids.len(), bytes))
}

/// Fetches, then fast-forwards the current branch to `<remote>/<branch>`.
pub fn pull(
    repo: &Repo,
    name: &str,
    wait: Duration,
    progress: &dyn Progress,
) -> anyhow::Result<FetchReport> {
    let report = fetch(repo, name, wait, progress)?;
    let view = repo.reopen()?;
    let branch = view.head_branch()?;
    let tracking = format!("{name}/{branch}");
    let Some(theirs) = view.branch_tip(&tracking)? else {
        bail!("remote {name} has no branch `{branch}`");
    };
    let ours = view.branch_tip(&branch)?;
    match ours {
        Some(ours) if is_ancestor(view.backend(), theirs, ours)? => return Ok(report),
        Some(ours) if !is_ancestor(view.backend(), ours, theirs)? => {
            bail!("branch `{branch}` and {tracking} have diverged; start a branch from one of them")
        }
        _ => {}
    }
    let (writer, ()) = view.write(wait, |check| {
        if check.branch_tip(&branch)? != ours {
            bail!("branch `{branch}` moved while pulling; pull again");
        }
        Ok(())
    })?;
    let mut edit = RefEdit::default();
    set_branch_with_steps(&writer, &mut edit, &branch, theirs, &HashMap::new())?;
    writer.apply(&edit)?;
    Ok(report)
}

/// Clones the store at `url` into a new local store at `dir`, with remote
/// `origin`. With `lazy`, only records and refs come now; each checkout
/// downloads the chunks its commit needs.
pub fn clone(
    url: &str,
    dir: &Path,
    lazy: bool,
    progress: &dyn Progress,
) -> anyhow::Result<CloneReport> {
    let bucket = BucketStore::open(url)?;
    let config = bucket.config()?;
    let head = bucket.head_branch()?;
    drop(bucket);
    let existed = dir.exists();
    let repo = Repo::init(dir, &config)?;
    let result = fill_clone(&repo, url, dir, lazy, head, progress);
    if result.is_err() {
        // A clone that failed half-way leaves nothing behind.
        drop(repo);
        remove_new_store(dir, existed);
    }
    result
}

/// Removes a store `clone` made: the whole directory when it made it, else
/// only the store's own entries in it.
fn remove_new_store(dir: &Path, existed: bool) {
    if !existed {
        let _ = std::fs::remove_dir_all(dir);
        return;
    }
    for entry in ["FORMAT", "lock", "view.lock", "db", "cache", "remotes.json"] {
        let path = dir.join(entry);
        let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
    }
}

/// The rest of a clone once the empty store exists: remote `origin`, a
/// fetch, and a local branch for each remote one.
fn fill_clone(
    repo: &Repo,
    url: &str,
    dir: &Path,
    lazy: bool,
    head: String,
    progress: &dyn Progress,
) -> anyhow::Result<CloneReport> {
    let remote = Remote {
        name: "origin".into(),
        url: url.to_string(),
        conditional_writes: BucketStore::connect(url)?.probe_conditional_writes()?,
    };
    RemotesFile {
        version: super::REMOTES_VERSION,
        remotes: vec![remote],
        lazy: lazy.then(|| "origin".to_string()),
    }
    .save(dir)?;
    let report = fetch(repo, "origin", Duration::ZERO, progress)?;
    let view = repo.reopen()?;
    let (writer, ()) = view.write(Duration::ZERO, |_| Ok(()))?;
    let mut edit = RefEdit::default();
    let mut branches = Vec::new();
    for (tracking, tip) in writer.branches()? {
        if let Some(branch) = tracking.strip_prefix("origin/") {
            set_branch_with_steps(&writer, &mut edit, branch, tip, &HashMap::new())?;
            branches.push(branch.to_string());
        }
    }
    let head = if branches.contains(&head) {
        head
    } else {
        branches.first().cloned().unwrap_or_else(|| "main".into())
    };
    edit.head = Some(head.clone());
    writer.apply(&edit)?;
    Ok(CloneReport {
        url: url.to_string(),
        dir: dir.display().to_string(),
        branches,
        head,
        fetch: report,
    })
}

/// In a lazy store, downloads the blobs commit `id` needs that are not here
/// yet. Returns how many were downloaded (0 in a complete store).
pub fn fill_for_checkout(
    repo: &Repo,
    id: &ObjectId,
    wait: Duration,
    progress: &dyn Progress,
) -> anyhow::Result<(usize, u64)> {
    let Some(root) = repo.local_root() else {
        return Ok((0, 0));
    };
    let remotes = RemotesFile::load(root)?;
    let Some(lazy) = remotes.lazy.clone() else {
        return Ok((0, 0));
    };
    let missing = missing_for_checkout(repo, id)?;
    if missing.is_empty() {
        return Ok((0, 0));
    }
    let bucket = open_remote(remotes.get(&lazy)?)?;
    let (writer, ()) = repo.write(wait, |_| Ok(()))?;
    let mut total = (0, 0);
    let mut missing = missing;
    // A blob names its side chunks (W's moments, m's v̂) only once it is
    // here: download what is known to be needed, then look again (through
    // the writer, which sees what it wrote).
    while !missing.is_empty() {
        let (n, bytes) = download_into(&writer, &bucket, missing.clone(), progress)
            .with_context(|| format!("downloading commit {} from remote `{lazy}`", id.short()))?;
        total = (total.0 + n, total.1 + bytes);
        let still = missing_for_checkout(&writer, id)?;
        if still.iter().any(|blob| missing.contains(blob)) {
            bail!(
                "commit {}: remote `{lazy}` did not provide every blob it needs",
                id.short()
            );
        }
        missing = still;
    }
    Ok(total)
}

/// The blobs checking `id` out reads that `repo` does not hold.
fn missing_for_checkout(repo: &Repo, id: &ObjectId) -> anyhow::Result<Vec<ObjectId>> {
    let mut missing = Vec::new();
    for blob in checkout_blobs(repo.backend(), id)? {
        if !repo.has_blob(&blob)? {
            missing.push(blob);
        }
    }
    Ok(missing)
}
