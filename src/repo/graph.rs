//! `log --all --graph`: the commit DAG drawn in text lanes, the way
//! `git log --graph` does, newest first.

use std::collections::HashMap;

use serde::Serialize;

use super::inspect::LogEntry;
use crate::store::{CommitRecord, ObjectId, Store};

/// One printed line: lane glyphs, and the commit when the line shows one
/// (lines that only join lanes have none).
#[derive(Debug, Clone, Serialize)]
pub struct GraphLine {
    pub graph: String,
    pub commit: Option<LogEntry>,
    /// Branches and tags (`tag: NAME`) pointing at the commit.
    pub refs: Vec<String>,
}

/// Every commit reachable from a branch or tag, children before parents.
pub fn reachable_commits(store: &Store) -> anyhow::Result<Vec<(ObjectId, CommitRecord)>> {
    let mut records: HashMap<ObjectId, CommitRecord> = HashMap::new();
    let mut stack = store.root_commits()?;
    while let Some(id) = stack.pop() {
        if records.contains_key(&id) {
            continue;
        }
        let record = store
            .get_commit(&id)?
            .ok_or_else(|| anyhow::anyhow!("commit {id} is missing; run `ckptvc fsck`"))?;
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

/// The line under a commit where the lanes from `first` on fold one column
/// to the left: `| |/ /` for 4 lanes folding from lane 2.
fn join_line(lanes: usize, first: usize) -> String {
    let mut line = String::new();
    for i in 0..lanes {
        if i < first {
            line.push_str(if i == 0 { "|" } else { " |" });
        } else {
            line.push_str(if i == 0 { "/" } else { "/ " });
        }
    }
    line.trim_end().to_string()
}

pub fn graph(store: &Store) -> anyhow::Result<Vec<GraphLine>> {
    let mut labels: HashMap<ObjectId, Vec<String>> = HashMap::new();
    for (name, id) in store.branches()? {
        labels.entry(id).or_default().push(name);
    }
    for (name, id) in store.tags()? {
        labels.entry(id).or_default().push(format!("tag: {name}"));
    }
    let mut lanes: Vec<ObjectId> = Vec::new();
    let mut lines = Vec::new();
    for (id, record) in reachable_commits(store)? {
        let hits: Vec<usize> = (0..lanes.len()).filter(|&i| lanes[i] == id).collect();
        let col = match hits.first() {
            Some(&c) => c,
            None => {
                lanes.push(id);
                lanes.len() - 1
            }
        };
        let glyphs: Vec<&str> = (0..lanes.len())
            .map(|i| if i == col { "*" } else { "|" })
            .collect();
        lines.push(GraphLine {
            graph: glyphs.join(" "),
            commit: Some(LogEntry::new(&id, &(&record).into())),
            refs: labels.remove(&id).unwrap_or_default(),
        });
        // Lanes of other children of this commit end here: join them.
        let joined = &hits[hits.len().min(1)..];
        if let Some(&first) = joined.first() {
            lines.push(GraphLine {
                graph: join_line(lanes.len(), first),
                commit: None,
                refs: Vec::new(),
            });
            for &i in joined.iter().rev() {
                lanes.remove(i);
            }
        }
        match record.first_parent() {
            Some(parent) => lanes[col] = parent,
            None => {
                lanes.remove(col);
            }
        }
    }
    Ok(lines)
}
