//! `import` and `watch`: a training run's output directory into commits.
//!
//! A run directory holds one folder per saved step: `checkpoint-<step>`
//! (Hugging Face Trainer), `step-<step>` / `step_<step>`, or
//! `global_step<step>` (DeepSpeed). Import commits them in step order onto
//! one branch, skipping steps that branch already has, so it can be run
//! again as the run goes on. Watch does the same in a loop, committing a
//! folder only once it is complete, and can delete the originals once their
//! commit has been read back and verified.

use crate::repo::Repo;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use rayon::prelude::*;
use serde::Serialize;

use super::commit::{CommitOptions, commit};
use super::progress::{NoProgress, Progress};
use super::reconstruct::{ChunkAddr, Reconstructor};
use crate::format::pairing::TRAINER_STATE;
use crate::store::{FileContent, ObjectId};

/// One checkpoint folder of a run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepFolder {
    pub step: u64,
    pub dir: PathBuf,
}

/// The step a folder name stands for, if it is a checkpoint folder's name.
pub fn step_of(name: &str) -> Option<u64> {
    let digits = ["checkpoint-", "step-", "step_", "global_step"]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The checkpoint folders directly under `run_dir`, in step order. Two
/// folders for one step are an error: which one is the checkpoint?
pub fn scan(run_dir: &Path) -> anyhow::Result<Vec<StepFolder>> {
    let entries = std::fs::read_dir(run_dir)
        .with_context(|| format!("{}: cannot read run directory", run_dir.display()))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("{}: cannot read", run_dir.display()))?;
        let Some(step) = entry.file_name().to_str().and_then(step_of) else {
            continue;
        };
        if entry.path().is_dir() {
            found.push(StepFolder {
                step,
                dir: entry.path(),
            });
        }
    }
    found.sort_by(|a, b| (a.step, &a.dir).cmp(&(b.step, &b.dir)));
    if let Some(pair) = found.windows(2).find(|w| w[0].step == w[1].step) {
        anyhow::bail!(
            "{} and {} are both step {}: keep one of them",
            pair[0].dir.display(),
            pair[1].dir.display(),
            pair[0].step
        );
    }
    Ok(found)
}

/// Whether a folder is complete. The Trainer writes `trainer_state.json`
/// last, so a `checkpoint-<step>` folder without it is still being written
/// (or was cut short by a crash) and must not be committed.
pub fn is_complete(folder: &StepFolder) -> bool {
    let is_trainer = folder
        .dir
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("checkpoint-"));
    !is_trainer || folder.dir.join(TRAINER_STATE).is_file()
}

#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Branch to commit to; `None`: the current branch.
    pub branch: Option<String>,
    /// Where a new branch starts (only for the first commit of a new branch).
    pub parent: Option<String>,
    pub policy: Option<crate::codec::policy::Policy>,
    pub lock_wait: Duration,
}

/// One committed step.
#[derive(Debug, Clone, Serialize)]
pub struct ImportedStep {
    pub step: u64,
    pub id: String,
    pub dir: PathBuf,
    pub input_bytes: u64,
    pub stored_bytes: u64,
    pub notes: Vec<String>,
}

/// What an import did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportReport {
    pub branch: String,
    pub imported: Vec<ImportedStep>,
    /// Steps the branch already had.
    pub skipped: Vec<u64>,
    /// `checkpoint-<step>` folders without `trainer_state.json`.
    pub incomplete: Vec<u64>,
    pub input_bytes: u64,
    pub stored_bytes: u64,
    /// input_bytes / stored_bytes (1 when nothing was imported; infinite,
    /// `null` in JSON, when everything was already stored).
    pub ratio: f64,
}

impl ImportReport {
    fn new(branch: &str) -> ImportReport {
        ImportReport {
            branch: branch.to_string(),
            ratio: 1.0,
            ..ImportReport::default()
        }
    }

    fn add(&mut self, step: ImportedStep) {
        self.input_bytes += step.input_bytes;
        self.stored_bytes += step.stored_bytes;
        self.ratio = super::inspect::ratio(self.input_bytes, self.stored_bytes);
        self.imported.push(step);
    }
}

/// Forwards byte counts to an outer bar that spans several commits.
struct Nested<'p>(&'p dyn Progress);

impl Progress for Nested<'_> {
    fn advance(&self, bytes: u64) {
        self.0.advance(bytes);
    }
}

/// The checkpoint folders of a run directory sorted against one branch.
struct Survey {
    branch: String,
    /// The branch does not exist yet: its first commit forks from `--parent`.
    new_branch: bool,
    /// Complete folders the branch does not have, in step order.
    pending: Vec<StepFolder>,
    skipped: Vec<u64>,
    incomplete: Vec<u64>,
}

/// Scans `run_dir` and sorts its folders against the target branch (one
/// read-only open of the store for all of them).
fn survey(store: &Repo, run_dir: &Path, options: &ImportOptions) -> anyhow::Result<Survey> {
    let folders = scan(run_dir)?;
    let branch = match &options.branch {
        Some(b) => b.clone(),
        None => store.head_branch()?,
    };
    let fork_step = fork_step(store, &branch, options)?;
    let mut survey = Survey {
        new_branch: store.branch_tip(&branch)?.is_none(),
        branch,
        pending: Vec::new(),
        skipped: Vec::new(),
        incomplete: Vec::new(),
    };
    for folder in folders {
        let before_fork = fork_step.is_some_and(|s| folder.step <= s);
        if before_fork || store.commit_at_step(&survey.branch, folder.step)?.is_some() {
            survey.skipped.push(folder.step);
        } else if !is_complete(&folder) {
            survey.incomplete.push(folder.step);
        } else {
            survey.pending.push(folder);
        }
    }
    Ok(survey)
}

/// Commits every complete checkpoint folder under `run_dir` that the
/// branch does not have yet, in step order.
pub fn import(
    repo: &Repo,
    run_dir: &Path,
    options: &ImportOptions,
    progress: &dyn Progress,
) -> anyhow::Result<ImportReport> {
    let survey = survey(repo, run_dir, options)?;
    let mut report = ImportReport::new(&survey.branch);
    report.skipped = survey.skipped;
    report.incomplete = survey.incomplete;
    let total: u64 = survey.pending.iter().map(|f| folder_bytes(&f.dir)).sum();
    progress.begin("import", total);
    let mut new_branch = survey.new_branch;
    for folder in &survey.pending {
        let parent = fork_parent(&mut new_branch, options);
        let step = commit_folder(repo, folder, &survey.branch, parent, options, progress)?;
        report.add(step);
    }
    progress.finish();
    Ok(report)
}

/// For a branch that does not exist yet: the step of the commit it will
/// fork from (`--parent`, or the current branch's tip), whose history it
/// inherits; folders up to that step are already in it.
fn fork_step(store: &Repo, branch: &str, options: &ImportOptions) -> anyhow::Result<Option<u64>> {
    if store.branch_tip(branch)?.is_some() {
        return Ok(None);
    }
    let fork = match &options.parent {
        Some(rev) => Some(super::rev::resolve(store.backend(), rev)?),
        None => {
            let head = store.head_branch()?;
            if head == branch {
                None
            } else {
                store.branch_tip(&head)?
            }
        }
    };
    let Some(fork) = fork else { return Ok(None) };
    let summary = store
        .get_commit_summary(&fork)?
        .with_context(|| format!("commit {fork} is missing"))?;
    Ok(Some(summary.step))
}

/// `--parent` for the commit that creates the branch, `None` after it.
fn fork_parent(new_branch: &mut bool, options: &ImportOptions) -> Option<String> {
    std::mem::take(new_branch)
        .then(|| options.parent.clone())
        .flatten()
}

fn commit_folder(
    repo: &Repo,
    folder: &StepFolder,
    branch: &str,
    parent: Option<String>,
    options: &ImportOptions,
    progress: &dyn Progress,
) -> anyhow::Result<ImportedStep> {
    let commit_options = CommitOptions {
        step: folder.step,
        branch: Some(branch.to_string()),
        parent,
        message: format!("imported from {}", folder.dir.display()),
        force_keyframe: false,
        policy: options.policy.clone(),
        lock_wait: options.lock_wait,
    };
    let outcome =
        commit(repo, &folder.dir, &commit_options, &Nested(progress)).with_context(|| {
            format!(
                "{}: cannot commit step {}",
                folder.dir.display(),
                folder.step
            )
        })?;
    Ok(ImportedStep {
        step: folder.step,
        id: outcome.id.to_hex(),
        dir: folder.dir.clone(),
        input_bytes: outcome.record.input_bytes,
        stored_bytes: outcome.record.stored_bytes,
        notes: outcome.notes,
    })
}

/// Sum of the sizes of the regular files under `dir` (for the progress bar).
fn folder_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => folder_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// A folder's listing (names, sizes, modification times): a folder is
/// settled when two polls see the same signature.
fn signature(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(m) = e.metadata() else { continue };
        if m.is_dir() {
            out.extend(signature(&e.path()));
        } else {
            out.push((e.path(), m.len(), m.modified().ok()));
        }
    }
    out.sort();
    out
}

/// Reads every chunk of commit `id` back and checks it against its
/// recorded blake3 (what checkout does), without writing anything.
pub fn verify_commit(store: &Repo, id: &ObjectId) -> anyhow::Result<u64> {
    let reconstructor = Reconstructor::new(store);
    let record = reconstructor.record(id)?;
    let mut addrs = Vec::new();
    for file in &record.files {
        if let FileContent::Opaque { chunks } = &file.content {
            addrs.extend((0..chunks.len()).map(|index| (file.name.as_str(), None, index)));
        }
        for t in file.tensors() {
            addrs.extend(
                (0..t.chunks.len()).map(|index| (file.name.as_str(), Some(t.name.as_str()), index)),
            );
        }
    }
    addrs.par_iter().try_for_each(|&(file, tensor, index)| {
        reconstructor
            .chunk(
                id,
                ChunkAddr {
                    file,
                    tensor,
                    index,
                },
            )
            .map(drop)
    })?;
    Ok(addrs.len() as u64)
}

#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub import: ImportOptions,
    /// Seconds between polls of the run directory.
    pub interval: Duration,
    /// Delete each folder once its commit is verified.
    pub delete_imported: bool,
    /// Return after this long without a new folder (`None`: run until killed).
    pub idle_exit: Option<Duration>,
}

/// What `watch` reports as it goes.
pub trait WatchEvents {
    fn committed(&self, step: &ImportedStep);
    fn deleted(&self, dir: &Path);
}

/// Imports new checkpoint folders as they appear and are complete: a
/// Trainer folder once `trainer_state.json` exists, and any folder once its
/// listing (names, sizes, times) is the same on two polls in a row.
pub fn watch(
    repo: &Repo,
    run_dir: &Path,
    options: &WatchOptions,
    events: &dyn WatchEvents,
) -> anyhow::Result<ImportReport> {
    // The branch is fixed at the start: a `switch` while watch runs must
    // not send later steps elsewhere.
    let branch = match &options.import.branch {
        Some(b) => b.clone(),
        None => repo.head_branch()?,
    };
    let import = ImportOptions {
        branch: Some(branch.clone()),
        ..options.import.clone()
    };
    let mut report = ImportReport::new(&branch);
    let mut last_seen: std::collections::HashMap<PathBuf, Vec<_>> = Default::default();
    let mut last_progress = Instant::now();
    loop {
        // Each poll looks at the store anew: commits made since (by this
        // watch or anyone) must count.
        let view = repo.reopen()?;
        let survey = survey(&view, run_dir, &import)?;
        let mut new_branch = survey.new_branch;
        for folder in survey.pending {
            let now = signature(&folder.dir);
            let settled = last_seen.get(&folder.dir) == Some(&now);
            last_seen.insert(folder.dir.clone(), now);
            if !settled {
                continue;
            }
            let parent = fork_parent(&mut new_branch, &import);
            let step = commit_folder(&view, &folder, &branch, parent, &import, &NoProgress)?;
            events.committed(&step);
            if options.delete_imported {
                let id = ObjectId::from_hex(&step.id).expect("hex of an id");
                verify_commit(&repo.reopen()?, &id).with_context(|| {
                    format!(
                        "step {} did not verify after commit; {} is kept",
                        step.step,
                        folder.dir.display()
                    )
                })?;
                std::fs::remove_dir_all(&folder.dir)
                    .with_context(|| format!("{}: cannot delete", folder.dir.display()))?;
                events.deleted(&folder.dir);
            }
            last_seen.remove(&folder.dir);
            report.add(step);
            last_progress = Instant::now();
        }
        if options
            .idle_exit
            .is_some_and(|idle| last_progress.elapsed() >= idle)
        {
            return Ok(report);
        }
        std::thread::sleep(options.interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_names_give_steps() {
        assert_eq!(step_of("checkpoint-500"), Some(500));
        assert_eq!(step_of("step-000020"), Some(20));
        assert_eq!(step_of("step_7"), Some(7));
        assert_eq!(step_of("global_step1200"), Some(1200));
        for name in [
            "checkpoint-",
            "checkpoint-12a",
            "tmp-checkpoint-5",
            "runs",
            "step--1",
        ] {
            assert_eq!(step_of(name), None, "{name}");
        }
    }

    #[test]
    fn scan_orders_by_step_and_refuses_duplicates() {
        let run = tempfile::tempdir().unwrap();
        for name in ["checkpoint-100", "checkpoint-20", "runs", "checkpoint-3"] {
            std::fs::create_dir(run.path().join(name)).unwrap();
        }
        std::fs::write(run.path().join("checkpoint-7"), b"a file, not a folder").unwrap();
        let steps: Vec<u64> = scan(run.path()).unwrap().iter().map(|f| f.step).collect();
        assert_eq!(steps, vec![3, 20, 100]);
        std::fs::create_dir(run.path().join("step-20")).unwrap();
        let err = scan(run.path()).unwrap_err().to_string();
        assert!(err.contains("both step 20"), "{err}");
    }
}
