//! The errors a caller branches on, as types. Operations return
//! `anyhow::Error` (context chains make the messages); the root cause is one
//! of these or a [`StoreError`] whenever the caller could do something
//! about it, and [`kind`] tells which without matching on text.

use serde::Serialize;

use crate::store::StoreError;

/// A failure a caller may handle rather than report.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// The branch already has a commit at this step.
    #[error("step {step} already exists on branch `{branch}` (commit {commit})")]
    StepExists {
        branch: String,
        step: u64,
        commit: String,
    },
    /// A revision names no commit (or more than one).
    #[error("`{rev}`: {why}")]
    UnknownRevision { rev: String, why: String },
    /// A checkout's output directory holds files already.
    #[error("{}: output directory is not empty", .path.display())]
    OutputNotEmpty { path: std::path::PathBuf },
    /// A remote's branch has commits this store does not have.
    #[error("remote {remote} {branch} has commits you do not have (fetch first)")]
    NotFastForward { remote: String, branch: String },
}

/// What a failure was, for callers that branch on it (and for `--json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Another writer holds the store: wait and retry.
    Locked,
    StepExists,
    UnknownRevision,
    /// A ref moved under a compare-and-swap: fetch and retry.
    RefMoved,
    NotFastForward,
    /// Checkout into a directory that is not empty (force to overwrite).
    OutputNotEmpty,
    /// An object failed its check: run fsck.
    Corrupt,
    /// A record written by a newer ckptvc: upgrade.
    TooNew,
    /// No store where one was expected.
    NotAStore,
    /// A remote failed (network, credentials, server).
    Remote,
    Other,
}

/// The kind of the first typed error in `error`'s chain.
pub fn kind(error: &anyhow::Error) -> ErrorKind {
    for cause in error.chain() {
        if let Some(e) = cause.downcast_ref::<RepoError>() {
            return match e {
                RepoError::StepExists { .. } => ErrorKind::StepExists,
                RepoError::UnknownRevision { .. } => ErrorKind::UnknownRevision,
                RepoError::NotFastForward { .. } => ErrorKind::NotFastForward,
                RepoError::OutputNotEmpty { .. } => ErrorKind::OutputNotEmpty,
            };
        }
        if let Some(e) = cause.downcast_ref::<StoreError>() {
            return match e {
                StoreError::Locked { .. } => ErrorKind::Locked,
                StoreError::RefMoved { .. } => ErrorKind::RefMoved,
                StoreError::Corrupt { .. } => ErrorKind::Corrupt,
                StoreError::TooNew { .. } => ErrorKind::TooNew,
                StoreError::Missing(_) | StoreError::NotAStore { .. } => ErrorKind::NotAStore,
                StoreError::Remote { .. } => ErrorKind::Remote,
                _ => ErrorKind::Other,
            };
        }
    }
    ErrorKind::Other
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn kind_is_found_under_context() {
        let e: anyhow::Result<()> = Err(StoreError::Locked {
            holder: "pid 1".into(),
        }
        .into());
        let e = e.context("committing").unwrap_err();
        assert_eq!(kind(&e), ErrorKind::Locked);
        let e = anyhow::Error::from(RepoError::UnknownRevision {
            rev: "x".into(),
            why: "no".into(),
        });
        assert_eq!(kind(&e), ErrorKind::UnknownRevision);
        assert_eq!(kind(&anyhow::anyhow!("plain")), ErrorKind::Other);
    }
}
