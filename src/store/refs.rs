//! Refs and the step index beyond a single commit: branches, tags, HEAD, and
//! edits of several of them at once ([`RefEdit`]), which history operations
//! (branch, tag, prune, gc) apply as one synced batch, so a crash leaves
//! either the old history or the new one.

use rocksdb::{Direction, IteratorMode, WriteBatch};

use super::StoreError;
use super::db::{
    BRANCH_PREFIX, CF_BLOB_SIZES, CF_BLOBS, CF_COMMITS, CF_REFS, CF_STEPS, REF_HEAD, Store,
    TAG_PREFIX,
};
use super::object::ObjectId;

/// Several ref, step-index and commit-record changes, applied atomically by
/// [`Store::apply`]. Deletions are applied before insertions, so an edit may
/// clear a branch's step index and write it anew.
#[derive(Debug, Default)]
pub struct RefEdit {
    pub set_branches: Vec<(String, ObjectId)>,
    pub delete_branches: Vec<String>,
    pub set_tags: Vec<(String, ObjectId)>,
    pub delete_tags: Vec<String>,
    /// Branches whose whole step index is removed.
    pub clear_steps: Vec<String>,
    pub set_steps: Vec<(String, u64, ObjectId)>,
    pub head: Option<String>,
    /// New commit records (already encoded), keyed by their id.
    pub put_commits: Vec<(ObjectId, Vec<u8>)>,
    pub delete_commits: Vec<ObjectId>,
}

impl RefEdit {
    pub fn is_empty(&self) -> bool {
        self.set_branches.is_empty()
            && self.delete_branches.is_empty()
            && self.set_tags.is_empty()
            && self.delete_tags.is_empty()
            && self.clear_steps.is_empty()
            && self.set_steps.is_empty()
            && self.head.is_none()
            && self.put_commits.is_empty()
            && self.delete_commits.is_empty()
    }
}

impl Store {
    /// Applies `edit` in one synced write batch.
    pub fn apply(&self, edit: &RefEdit) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        let refs = self.cf(CF_REFS);
        let steps = self.cf(CF_STEPS);
        for name in &edit.delete_branches {
            batch.delete_cf(refs, format!("{BRANCH_PREFIX}{name}").as_bytes());
        }
        for name in &edit.delete_tags {
            batch.delete_cf(refs, format!("{TAG_PREFIX}{name}").as_bytes());
        }
        for branch in &edit.clear_steps {
            let (start, end) = step_range(branch);
            batch.delete_range_cf(steps, start, end);
        }
        for id in &edit.delete_commits {
            batch.delete_cf(self.cf(CF_COMMITS), id.0);
        }
        for (name, id) in &edit.set_branches {
            batch.put_cf(refs, format!("{BRANCH_PREFIX}{name}").as_bytes(), id.0);
        }
        for (name, id) in &edit.set_tags {
            batch.put_cf(refs, format!("{TAG_PREFIX}{name}").as_bytes(), id.0);
        }
        for (branch, step, id) in &edit.set_steps {
            batch.put_cf(steps, Self::step_key(branch, *step), id.0);
        }
        if let Some(head) = &edit.head {
            batch.put_cf(refs, REF_HEAD, head.as_bytes());
        }
        for (id, bytes) in &edit.put_commits {
            batch.put_cf(self.cf(CF_COMMITS), id.0, bytes);
        }
        self.write_synced(batch)
    }

    pub fn tag_target(&self, name: &str) -> Result<Option<ObjectId>, StoreError> {
        let key = format!("{TAG_PREFIX}{name}");
        let value = self.db().get_pinned_cf(self.cf(CF_REFS), key.as_bytes())?;
        Ok(value.and_then(|v| ObjectId::from_slice(&v)))
    }

    /// Every commit a branch or tag points at: the roots of the history.
    pub fn root_commits(&self) -> Result<Vec<ObjectId>, StoreError> {
        Ok(self
            .branches()?
            .into_iter()
            .chain(self.tags()?)
            .map(|(_, id)| id)
            .collect())
    }

    /// All tags with their commits, sorted by name.
    pub fn tags(&self) -> Result<Vec<(String, ObjectId)>, StoreError> {
        self.refs_with_prefix(TAG_PREFIX)
    }

    pub(super) fn refs_with_prefix(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, ObjectId)>, StoreError> {
        let mut out = Vec::new();
        let mode = IteratorMode::From(prefix.as_bytes(), Direction::Forward);
        for item in self.db().iterator_cf(self.cf(CF_REFS), mode) {
            let (key, value) = item?;
            let Some(name) = key.strip_prefix(prefix.as_bytes()) else {
                break;
            };
            if let Some(id) = ObjectId::from_slice(&value) {
                out.push((String::from_utf8_lossy(name).into_owned(), id));
            }
        }
        Ok(out)
    }

    /// The step index of `branch`: (step, commit), by step.
    pub fn branch_steps(&self, branch: &str) -> Result<Vec<(u64, ObjectId)>, StoreError> {
        let (start, end) = step_range(branch);
        let mode = IteratorMode::From(&start, Direction::Forward);
        let mut out = Vec::new();
        for item in self.db().iterator_cf(self.cf(CF_STEPS), mode) {
            let (key, value) = item?;
            if key.as_ref() >= end.as_slice() {
                break;
            }
            let step_bytes: [u8; 8] =
                key[start.len()..]
                    .try_into()
                    .map_err(|_| StoreError::Corrupt {
                        what: format!("step index of branch `{branch}`"),
                        detail: "key is not branch, 0, 8-byte step".into(),
                    })?;
            if let Some(id) = ObjectId::from_slice(&value) {
                out.push((u64::from_be_bytes(step_bytes), id));
            }
        }
        Ok(out)
    }

    /// Names of every branch that has a step index (normally: every branch).
    pub fn step_index_branches(&self) -> Result<Vec<String>, StoreError> {
        let mut names: Vec<String> = Vec::new();
        for item in self
            .db()
            .iterator_cf(self.cf(CF_STEPS), IteratorMode::Start)
        {
            let (key, _) = item?;
            let name = key.split(|b| *b == 0).next().unwrap_or_default();
            let name = String::from_utf8_lossy(name).into_owned();
            if names.last() != Some(&name) {
                names.push(name);
            }
        }
        Ok(names)
    }

    /// Every blob id in the store with its encoded size, from the size index.
    pub fn blob_sizes(&self) -> Result<Vec<(ObjectId, u64)>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db()
            .iterator_cf(self.cf(CF_BLOB_SIZES), IteratorMode::Start)
        {
            let (key, value) = item?;
            let size = value.as_ref().try_into().map(u64::from_le_bytes);
            if let (Some(id), Ok(size)) = (ObjectId::from_slice(&key), size) {
                out.push((id, size));
            }
        }
        Ok(out)
    }

    /// Deletes blobs (payload and size entry) in one synced batch.
    pub fn delete_blobs(&self, ids: &[ObjectId]) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for id in ids {
            batch.delete_cf(self.cf(CF_BLOBS), id.0);
            batch.delete_cf(self.cf(CF_BLOB_SIZES), id.0);
        }
        self.write_synced(batch)
    }
}

/// Keys `[branch 0, branch 1)`: exactly the step index of `branch`, since
/// branch names contain no NUL byte.
fn step_range(branch: &str) -> (Vec<u8>, Vec<u8>) {
    let mut start = branch.as_bytes().to_vec();
    start.push(0);
    let mut end = branch.as_bytes().to_vec();
    end.push(1);
    (start, end)
}
