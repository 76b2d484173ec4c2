//! Revision syntax: how a user names a commit.
//!
//! - `BRANCH@STEP` — the commit at that step on that branch;
//! - `STEP` (digits) — that step on the current branch;
//! - `BRANCH` — the branch's tip; `TAG` — the tagged commit;
//! - a hex prefix of at least 6 digits of a commit id, if unique.
//!
//! A string of digits is tried as a step first, then as an id prefix.

use super::error::RepoError;

use crate::store::{Backend, ObjectId};

const MIN_PREFIX: usize = 6;

/// The commit `rev` names; [`RepoError::UnknownRevision`] when it names
/// none or several.
pub fn resolve(store: &dyn Backend, rev: &str) -> anyhow::Result<ObjectId> {
    let unknown = |why: String| -> anyhow::Error {
        RepoError::UnknownRevision {
            rev: rev.to_string(),
            why,
        }
        .into()
    };
    if let Some((branch, step)) = rev.rsplit_once('@') {
        let step: u64 = step
            .parse()
            .map_err(|_| unknown(format!("`{step}` after `@` is not a step number")))?;
        if store.branch_tip(branch)?.is_none() {
            return Err(unknown(format!("no branch named `{branch}`")));
        }
        return store
            .commit_at_step(branch, step)?
            .ok_or_else(|| unknown(format!("branch `{branch}` has no commit at step {step}")));
    }
    if !rev.is_empty() && rev.bytes().all(|b| b.is_ascii_digit()) {
        let head = store.head_branch()?;
        if let Ok(step) = rev.parse::<u64>()
            && let Some(id) = store.commit_at_step(&head, step)?
        {
            return Ok(id);
        }
        if rev.len() < MIN_PREFIX {
            return Err(unknown(format!(
                "the current branch `{head}` has no commit at step {rev}"
            )));
        }
    }
    if let Some(id) = store.branch_tip(rev)? {
        return Ok(id);
    }
    if let Some(id) = store.tag_target(rev)? {
        return Ok(id);
    }
    let lower = rev.to_ascii_lowercase();
    if lower.len() >= MIN_PREFIX && lower.bytes().all(|b| b.is_ascii_hexdigit()) {
        let matches: Vec<ObjectId> = store
            .commit_ids()?
            .into_iter()
            .filter(|id| id.to_hex().starts_with(&lower))
            .collect();
        return match matches.as_slice() {
            [one] => Ok(*one),
            [] => Err(unknown(
                "no commit, step, branch or tag by that name".into(),
            )),
            many => Err(unknown(format!(
                "ambiguous, {} commits start with it; give more digits",
                many.len()
            ))),
        };
    }
    Err(unknown(format!(
        "no commit, step, branch or tag by that name (ids need at least {MIN_PREFIX} hex digits)"
    )))
}
