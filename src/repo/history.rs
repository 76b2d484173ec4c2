//! Branches, tags and the current branch: `branch`, `switch`, `tag`.
//!
//! A branch is a tip plus its own step index, which covers the branch's
//! whole first-parent ancestry: a branch forked at `main@500` resolves
//! `retry@500` (and every earlier step) to the same commits as `main`, and
//! its own later steps to its own commits.

use crate::repo::Repo;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use super::rev::resolve;
use super::walk::ancestry_steps;
use crate::store::{ObjectId, RefEdit, RefKind};

/// One line of `branch`.
#[derive(Debug, Clone, Serialize)]
pub struct BranchInfo {
    pub name: String,
    pub tip: String,
    pub tip_step: u64,
    /// Commits in the branch's first-parent ancestry, tip included.
    pub commits: usize,
    pub current: bool,
}

/// One line of `tag`.
#[derive(Debug, Clone, Serialize)]
pub struct TagInfo {
    pub name: String,
    pub commit: String,
    pub step: u64,
    pub branch: String,
}

/// What `branch NAME`, `branch -d`, `tag NAME`, `tag -d` and `switch` did
/// (`--json` prints it): `{"branch": NAME, "created": true, "commit": ID}`,
/// `{"tag": NAME, "deleted": true, "commit": ID}`, `{"branch": NAME,
/// "tip": ID}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RefChange {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub created: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    /// The commit the ref points (or pointed) at; `switch` names it `tip`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tip: Option<String>,
    #[serde(skip)]
    pub id: ObjectId,
}

impl RefChange {
    fn new(kind: RefKind, name: &str, id: ObjectId) -> RefChange {
        RefChange {
            branch: (kind == RefKind::Branch).then(|| name.to_string()),
            tag: (kind == RefKind::Tag).then(|| name.to_string()),
            created: false,
            deleted: false,
            commit: Some(id.to_hex()),
            tip: None,
            id,
        }
    }

    fn created(kind: RefKind, name: &str, id: ObjectId) -> RefChange {
        RefChange {
            created: true,
            ..RefChange::new(kind, name, id)
        }
    }

    fn deleted(kind: RefKind, name: &str, id: ObjectId) -> RefChange {
        RefChange {
            deleted: true,
            ..RefChange::new(kind, name, id)
        }
    }
}

/// Checks a branch or tag name (`kind` names which in the message).
pub fn validate_ref_name(kind: &str, name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('-')
        && !name.starts_with('/')
        && !name.ends_with('/')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        && !name.contains("..")
        && !name.contains("//");
    if !ok {
        bail!(
            "invalid {kind} name `{name}`: use letters, digits, `-`, `_`, `.` and `/` (no `..`, no leading `-`)"
        );
    }
    if name.bytes().all(|b| b.is_ascii_digit()) {
        bail!("invalid {kind} name `{name}`: all digits would read as a step number");
    }
    Ok(())
}

pub fn branches(store: &Repo) -> anyhow::Result<Vec<BranchInfo>> {
    let head = store.head_branch()?;
    let mut out = Vec::new();
    for (name, tip) in store.branches()? {
        let record = store
            .get_commit(&tip)?
            .with_context(|| format!("tip {tip} of branch `{name}` is missing"))?;
        out.push(BranchInfo {
            current: name == head,
            commits: store.branch_steps(&name)?.len(),
            name,
            tip: tip.to_hex(),
            tip_step: record.step,
        });
    }
    Ok(out)
}

/// Creates branch `name` with tip `rev`. Returns the tip.
pub fn create_branch(
    repo: &Repo,
    name: &str,
    rev: &str,
    wait: Duration,
) -> anyhow::Result<RefChange> {
    validate_ref_name("branch", name)?;
    let (store, edit) = repo.write(wait, |view| {
        if let Some(tip) = view.branch_tip(name)? {
            bail!("branch `{name}` already exists (tip {})", tip.short());
        }
        let tip = resolve(view.backend(), rev)?;
        let set_steps = ancestry_steps(view.backend(), tip)?
            .into_iter()
            .map(|(step, id)| (name.to_string(), step, id))
            .collect();
        Ok(RefEdit {
            set_branches: vec![(name.to_string(), tip)],
            set_steps,
            ..RefEdit::default()
        })
    })?;
    store.apply(&edit)?;
    Ok(RefChange::created(
        RefKind::Branch,
        name,
        edit.set_branches[0].1,
    ))
}

/// Deletes branch `name` (its ref and step index; commits stay until `gc`).
/// Returns the tip it had.
pub fn delete_branch(repo: &Repo, name: &str, wait: Duration) -> anyhow::Result<RefChange> {
    let (store, tip) = repo.write(wait, |view| {
        let tip = view
            .branch_tip(name)?
            .with_context(|| format!("no branch named `{name}`"))?;
        if view.head_branch()? == name {
            bail!("`{name}` is the current branch; switch to another branch first");
        }
        Ok(tip)
    })?;
    store.apply(&RefEdit {
        delete_branches: vec![name.to_string()],
        clear_steps: vec![name.to_string()],
        ..RefEdit::default()
    })?;
    super::tipcache::prune_to_branch_tips(&store);
    Ok(RefChange::deleted(RefKind::Branch, name, tip))
}

/// Makes `name` the current branch.
pub fn switch(repo: &Repo, name: &str, wait: Duration) -> anyhow::Result<RefChange> {
    let (store, tip) = repo.write(wait, |view| {
        view.branch_tip(name)?
            .with_context(|| format!("no branch named `{name}`"))
    })?;
    store.apply(&RefEdit {
        head: Some(name.to_string()),
        ..RefEdit::default()
    })?;
    Ok(RefChange {
        commit: None,
        tip: Some(tip.to_hex()),
        ..RefChange::new(RefKind::Branch, name, tip)
    })
}

pub fn tags(store: &Repo) -> anyhow::Result<Vec<TagInfo>> {
    let mut out = Vec::new();
    for (name, id) in store.tags()? {
        let record = store
            .get_commit(&id)?
            .with_context(|| format!("commit {id} of tag `{name}` is missing"))?;
        out.push(TagInfo {
            name,
            commit: id.to_hex(),
            step: record.step,
            branch: record.branch,
        });
    }
    Ok(out)
}

pub fn create_tag(repo: &Repo, name: &str, rev: &str, wait: Duration) -> anyhow::Result<RefChange> {
    validate_ref_name("tag", name)?;
    let (store, id) = repo.write(wait, |view| {
        if let Some(id) = view.tag_target(name)? {
            bail!("tag `{name}` already exists (commit {})", id.short());
        }
        resolve(view.backend(), rev)
    })?;
    store.apply(&RefEdit {
        set_tags: vec![(name.to_string(), id)],
        ..RefEdit::default()
    })?;
    Ok(RefChange::created(RefKind::Tag, name, id))
}

pub fn delete_tag(repo: &Repo, name: &str, wait: Duration) -> anyhow::Result<RefChange> {
    let (store, id) = repo.write(wait, |view| {
        view.tag_target(name)?
            .with_context(|| format!("no tag named `{name}`"))
    })?;
    store.apply(&RefEdit {
        delete_tags: vec![name.to_string()],
        ..RefEdit::default()
    })?;
    Ok(RefChange::deleted(RefKind::Tag, name, id))
}
