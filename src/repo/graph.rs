//! `log --all --graph`: the commit DAG drawn in text lanes, the way
//! `git log --graph` does, newest first.

use crate::repo::Repo;
use std::collections::HashMap;

use serde::Serialize;

use super::inspect::LogEntry;
use super::walk::reachable_commits;
use crate::store::ObjectId;

/// One printed line: lane glyphs, and the commit when the line shows one
/// (lines that only join lanes have none).
#[derive(Debug, Clone, Serialize)]
pub struct GraphLine {
    pub graph: String,
    pub commit: Option<LogEntry>,
    /// Branches and tags (`tag: NAME`) pointing at the commit.
    pub refs: Vec<String>,
}

/// A commit of the graph with its labels, as `log --graph --json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct GraphNode {
    pub commit: LogEntry,
    pub refs: Vec<String>,
}

impl GraphLine {
    /// The commit this line shows, if any.
    pub fn node(self) -> Option<GraphNode> {
        Some(GraphNode {
            commit: self.commit?,
            refs: self.refs,
        })
    }
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

pub fn graph(store: &Repo) -> anyhow::Result<Vec<GraphLine>> {
    let mut labels: HashMap<ObjectId, Vec<String>> = HashMap::new();
    for (name, id) in store.branches()? {
        labels.entry(id).or_default().push(name);
    }
    for (name, id) in store.tags()? {
        labels.entry(id).or_default().push(format!("tag: {name}"));
    }
    let mut lanes: Vec<ObjectId> = Vec::new();
    let mut lines = Vec::new();
    for (id, record) in reachable_commits(store.backend())? {
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
