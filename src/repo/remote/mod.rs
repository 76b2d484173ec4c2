//! Remotes: named bucket URLs a local store exchanges commits with, the way
//! git remotes work. This module keeps their list (`<repo>/remotes.json`);
//! [`sync`] moves commits (`push`, `fetch`, `pull`, `clone`, and the lazy
//! download of one commit's chunks at checkout).
//!
//! A remote is itself a store ([`crate::store::BucketStore`]): every
//! read-only operation and `fsck`/`gc` run on it as on a local one.
//! Remote-tracking branches are local branches named `<remote>/<branch>`,
//! so `origin/main@500` is a revision like any other; only `fetch` and
//! `push` move them.

pub mod sync;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use super::Repo;
use super::history::validate_ref_name;
use crate::store::BucketStore;

pub use sync::{
    CloneReport, FetchReport, PushOptions, PushReport, clone, fetch, fill_for_checkout, pull, push,
};

/// Version of [`RemotesFile`]'s layout.
pub const REMOTES_VERSION: u32 = 1;
const REMOTES_FILE: &str = "remotes.json";

/// One configured remote. Credentials are never kept: they come from the
/// environment each time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remote {
    pub name: String,
    pub url: String,
    /// Whether the server refused a second create-only PUT when the remote
    /// was added (refs rely on it).
    pub conditional_writes: bool,
}

/// `<repo>/remotes.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemotesFile {
    pub version: u32,
    pub remotes: Vec<Remote>,
    /// Set by `clone --lazy`: chunks missing here are downloaded from this
    /// remote when a checkout needs them.
    #[serde(default)]
    pub lazy: Option<String>,
}

impl RemotesFile {
    fn path(root: &Path) -> PathBuf {
        root.join(REMOTES_FILE)
    }

    /// The remotes of the local store at `root` (none if it has no file).
    pub fn load(root: &Path) -> anyhow::Result<RemotesFile> {
        let path = Self::path(root);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(RemotesFile {
                    version: REMOTES_VERSION,
                    ..RemotesFile::default()
                });
            }
            Err(e) => return Err(e).with_context(|| format!("{}: cannot read", path.display())),
        };
        let file: RemotesFile = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a remotes file", path.display()))?;
        if file.version != REMOTES_VERSION {
            bail!(
                "{}: version {} is not supported",
                path.display(),
                file.version
            );
        }
        Ok(file)
    }

    /// Writes the file atomically (a temporary file renamed over it).
    pub fn save(&self, root: &Path) -> anyhow::Result<()> {
        let path = Self::path(root);
        let tmp = root.join(format!("{REMOTES_FILE}.tmp"));
        let text = serde_json::to_string_pretty(self).expect("serializable") + "\n";
        std::fs::write(&tmp, text).with_context(|| format!("{}: cannot write", tmp.display()))?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("{}: cannot write", path.display()))?;
        Ok(())
    }

    pub fn get(&self, name: &str) -> anyhow::Result<&Remote> {
        self.remotes
            .iter()
            .find(|r| r.name == name)
            .with_context(|| {
                let known: Vec<&str> = self.remotes.iter().map(|r| r.name.as_str()).collect();
                if known.is_empty() {
                    format!("no remote named `{name}` (this store has no remotes)")
                } else {
                    format!("no remote named `{name}` (known: {})", known.join(", "))
                }
            })
    }

    /// Whether `branch` is a remote-tracking branch (`<remote>/...`).
    pub fn is_tracking(&self, branch: &str) -> bool {
        self.remotes
            .iter()
            .any(|r| branch.starts_with(&format!("{}/", r.name)))
    }
}

/// The local directory of `repo`, or an error naming the operation (remotes
/// belong to local stores).
pub(crate) fn local_root<'r>(repo: &'r Repo, what: &str) -> anyhow::Result<&'r Path> {
    repo.local_root().with_context(|| {
        format!(
            "{what} needs a local store; {} is a remote itself",
            repo.location()
        )
    })
}

/// The remotes of `repo` (empty for a store in a bucket).
pub fn remotes(repo: &Repo) -> anyhow::Result<RemotesFile> {
    match repo.local_root() {
        Some(root) => RemotesFile::load(root),
        None => Ok(RemotesFile {
            version: REMOTES_VERSION,
            ..RemotesFile::default()
        }),
    }
}

/// Adds remote `name` at `url` after checking that it is reachable and
/// honours create-only writes. A remote that does not is added, marked, and
/// refused for pushing (two writers could overwrite each other's refs).
pub fn add(repo: &Repo, name: &str, url: &str, wait: Duration) -> anyhow::Result<Remote> {
    validate_ref_name("remote", name)?;
    if name.contains('/') {
        bail!("invalid remote name `{name}`: no `/` (it prefixes branch names)");
    }
    if !super::repository::is_url(url) {
        bail!("`{url}` is not a URL (s3://bucket/prefix, gs://…, az://…, file:///path)");
    }
    let root = local_root(repo, "remote add")?;
    let (_writer, mut file) = repo.write(wait, |_| {
        let file = RemotesFile::load(root)?;
        if let Ok(existing) = file.get(name) {
            bail!("remote `{name}` already exists ({})", existing.url);
        }
        Ok(file)
    })?;
    let bucket = BucketStore::connect(url)?;
    let conditional_writes = bucket
        .probe_conditional_writes()
        .with_context(|| format!("cannot write to remote `{name}` ({url})"))?;
    let remote = Remote {
        name: name.to_string(),
        url: url.to_string(),
        conditional_writes,
    };
    file.version = REMOTES_VERSION;
    file.remotes.push(remote.clone());
    file.save(root)?;
    Ok(remote)
}

/// Removes remote `name` and its remote-tracking branches.
pub fn remove(repo: &Repo, name: &str, wait: Duration) -> anyhow::Result<Remote> {
    let root = local_root(repo, "remote remove")?;
    let (writer, mut file) = repo.write(wait, |_| {
        let file = RemotesFile::load(root)?;
        file.get(name)?;
        Ok(file)
    })?;
    let prefix = format!("{name}/");
    let tracking: Vec<String> = writer
        .branches()?
        .into_iter()
        .map(|(b, _)| b)
        .filter(|b| b.starts_with(&prefix))
        .collect();
    writer.apply(&crate::store::RefEdit {
        delete_branches: tracking.clone(),
        clear_steps: tracking,
        ..Default::default()
    })?;
    let index = file
        .remotes
        .iter()
        .position(|r| r.name == name)
        .expect("checked above");
    let removed = file.remotes.remove(index);
    if file.lazy.as_deref() == Some(name) {
        file.lazy = None;
    }
    file.save(root)?;
    Ok(removed)
}
