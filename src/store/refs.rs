//! Edits of several refs at once ([`RefEdit`]), which history operations
//! (branch, tag, prune, gc) apply atomically, so a crash leaves either the
//! old history or the new one.

use super::object::ObjectId;

/// Several ref, step-index and commit-record changes, applied atomically by
/// [`super::MetaStore::apply`]. Deletions are applied before insertions, so an edit may
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
