//! Human-readable tables and JSON.

use super::style::{self, Palette};
use crate::repo::diff::{Change, DiffReport};
use crate::repo::fsck::FsckReport;
use crate::repo::gc::GcReport;
use crate::repo::graph::GraphLine;
use crate::repo::history::{BranchInfo, TagInfo};
use crate::repo::inspect::ShowReport;
use crate::repo::prune::PruneReport;
use crate::repo::{LogEntry, Stats};
use std::io::Write;

pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    write_stdout(format_args!("{text}\n"));
    Ok(())
}

/// Writes the command's output to stdout.
///
/// A reader that went away (`ckptvc log | head`) ends the process quietly
/// with status 141, what a shell reports for a tool killed by SIGPIPE, as
/// Unix tools end. SIGPIPE itself stays ignored (Rust's default): with its
/// default action restored, a remote server that closed a connection killed
/// a push silently in the middle of a socket write, with no error message.
/// Any other failure (a full disk behind a redirect) is an error and exit 1.
pub fn write_stdout(text: std::fmt::Arguments) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(text).and_then(|()| out.flush()) {
        stdout_failed(e);
    }
}

fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(141);
    }
    eprintln!("error: writing to stdout: {e}");
    std::process::exit(1);
}

/// Bytes with a binary unit, e.g. `1.5 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A size ratio, e.g. `23.4x`; a commit that added no bytes (every chunk
/// already stored) is `dedup`.
pub fn ratio(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.1}x")
    } else {
        "dedup".to_string()
    }
}

fn date(time_ms: u64) -> String {
    let secs = time_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The log as a table. Written through one buffer: a line-buffered stdout
/// costs a write call per commit (10,000 of them for a long run).
pub fn print_log(entries: &[LogEntry], palette: Palette) {
    if let Err(e) = write_log(entries, palette) {
        stdout_failed(e);
    }
}

fn write_log(entries: &[LogEntry], palette: Palette) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    writeln!(
        out,
        "{:<12}  {:>8}  {:<12}  {:<19}  {:>10}  {:>10}  {:>7}  {:<9}  {:>8}  {:>8}  {:>8}  message",
        "commit",
        "step",
        "branch",
        "date (UTC)",
        "input",
        "stored",
        "ratio",
        "policy",
        "err W",
        "err m",
        "err v"
    )?;
    for e in entries {
        writeln!(
            out,
            "{}  {:>8}  {}  {:<19}  {:>10}  {:>10}  {:>7}  {:<9}  {:>8.2e}  {:>8.2e}  {:>8.2e}  {}{}",
            palette.paint(&e.id[..12], style::COMMIT),
            e.step,
            palette.paint(&format!("{:<12}", e.branch), style::BRANCH),
            date(e.time_ms),
            bytes(e.input_bytes),
            bytes(e.stored_bytes),
            ratio(e.ratio),
            e.policy.split('(').next().unwrap_or_default(),
            e.error_w,
            e.error_m,
            e.error_v,
            palette.paint(if e.keyframe { "[keyframe] " } else { "" }, style::KEYFRAME),
            e.message
        )?;
    }
    out.flush()
}

pub fn print_show(report: &ShowReport) {
    let c = &report.commit;
    outln!("commit   {}", c.id);
    outln!("step     {} on {}", c.step, c.branch);
    for p in &c.parents {
        outln!("parent   {p}");
    }
    outln!("date     {} UTC", date(c.time_ms));
    outln!(
        "size     {} in, {} stored ({}){}",
        bytes(c.input_bytes),
        bytes(c.stored_bytes),
        ratio(c.ratio),
        if c.keyframe { ", keyframe" } else { "" }
    );
    outln!("policy   {}", c.policy);
    outln!(
        "error    W {:.3e}, m {:.3e}, v {:.3e} (relative L2, lossy-coded tensors)",
        c.error_w,
        c.error_m,
        c.error_v
    );
    if let Some(u) = &report.update_error {
        outln!(
            "update   {:.3e} from m and v together: m {:.3e}, v {:.3e} (relative L2 of Adam's m/(√v+ε), what resumed training feels)",
            u.both,
            u.m,
            u.v
        );
    }
    if !c.message.is_empty() {
        outln!("message  {}", c.message);
    }
    for p in &report.pairings {
        outln!(
            "pairing  {}: {} of {} parameters paired with model tensors (rule: {}){}",
            p.file,
            p.paired.len(),
            p.paired.len() + p.unpaired.len(),
            p.rule,
            if p.unpaired.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} kept under their index names and coded without their weight",
                    p.unpaired.len()
                )
            }
        );
    }
    outln!();
    outln!(
        "{:<24} {:<40} {:<6} {:<16} {:<20} {:>10} {:>10} {:>9} {:>10}",
        "file",
        "tensor",
        "dtype",
        "shape",
        "codec",
        "in",
        "out",
        "rel err",
        "update err"
    );
    for e in &report.entries {
        let shape = e
            .shape
            .as_ref()
            .map(|s| format!("{s:?}"))
            .unwrap_or_default();
        let update = e
            .update_error
            .map_or("-".to_string(), |u| format!("{u:.2e}"));
        outln!(
            "{:<24} {:<40} {:<6} {:<16} {:<20} {:>10} {:>10} {:>9.2e} {:>10}",
            e.file,
            e.tensor.as_deref().unwrap_or("-"),
            e.dtype.as_deref().unwrap_or("-"),
            shape,
            e.codecs.join("+"),
            bytes(e.bytes_in),
            bytes(e.bytes_out),
            e.rel_error,
            update
        );
        if let Some(note) = &e.note {
            outln!("{:<24} note: {note}", "");
        }
    }
}

pub fn print_stats(s: &Stats) {
    outln!("commits         {}", s.commits);
    outln!("branches        {}", s.branches);
    outln!("blobs           {}", s.blobs);
    outln!(
        "logical bytes   {} ({})",
        s.logical_bytes,
        bytes(s.logical_bytes)
    );
    outln!("blob bytes      {} ({})", s.blob_bytes, bytes(s.blob_bytes));
    outln!(
        "physical bytes  {} ({})",
        s.physical_bytes,
        bytes(s.physical_bytes)
    );
    outln!(
        "cache bytes     {} ({}, deletable)",
        s.cache_bytes,
        bytes(s.cache_bytes)
    );
    outln!("ratio           {:.2}x", s.ratio);
}

pub fn print_graph(lines: &[GraphLine]) {
    for line in lines {
        match &line.commit {
            None => outln!("{}", line.graph),
            Some(c) => {
                let refs = if line.refs.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", line.refs.join(", "))
                };
                let kind = if c.keyframe { " [keyframe]" } else { "" };
                outln!(
                    "{} {} step {}{refs} {} {}{kind} {}",
                    line.graph,
                    &c.id[..12],
                    c.step,
                    ratio(c.ratio),
                    c.policy,
                    c.message
                );
            }
        }
    }
}

pub fn print_branches(branches: &[BranchInfo], palette: Palette) {
    for b in branches {
        let name = format!("{:<20}", b.name);
        outln!(
            "{} {} step {:>8}  {}  {} commits",
            if b.current { "*" } else { " " },
            if b.current {
                palette.paint(&name, style::BRANCH)
            } else {
                name.as_str().into()
            },
            b.tip_step,
            palette.paint(&b.tip[..12], style::COMMIT),
            b.commits
        );
    }
}

pub fn print_tags(tags: &[TagInfo]) {
    for t in tags {
        outln!(
            "{:<20} {}  step {} on {}",
            t.name,
            &t.commit[..12],
            t.step,
            t.branch
        );
    }
}

pub fn print_diff(report: &DiffReport) {
    outln!("diff {} .. {}", &report.a[..12], &report.b[..12]);
    outln!(
        "{:<10}  {:>10}  {:>10}  {:>9}  tensor",
        "change",
        "rel L2",
        "max |d|",
        "changed"
    );
    let num = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.3e}"));
    for t in &report.tensors {
        let change = match t.change {
            Change::Same => "same",
            Change::Changed => "changed",
            Change::Added => "added",
            Change::Removed => "removed",
            Change::Reshaped => "reshaped",
        };
        let fraction = t
            .changed_fraction
            .map_or("-".to_string(), |f| format!("{:.1}%", f * 100.0));
        let mut name = format!("{}:{}", t.file, t.tensor);
        if t.change == Change::Reshaped {
            name += &format!(
                " ({} {:?} -> {} {:?})",
                t.dtype_a.as_deref().unwrap_or("?"),
                t.shape_a.clone().unwrap_or_default(),
                t.dtype_b.as_deref().unwrap_or("?"),
                t.shape_b.clone().unwrap_or_default()
            );
        }
        outln!(
            "{change:<10}  {:>10}  {:>10}  {fraction:>9}  {name}",
            num(t.rel_l2),
            num(t.max_abs)
        );
    }
}

pub fn print_shard(r: &crate::repo::commit::ShardOutcome, quiet: bool) {
    if let Some(sealed) = &r.sealed {
        outln!("{}", sealed.entry.id);
    }
    if quiet {
        return;
    }
    eprintln!(
        "shard {} of step {} on {}: {} files, {} in, {} stored ({} new blobs){}",
        r.shard,
        r.step,
        r.branch,
        r.files,
        bytes(r.input_bytes),
        bytes(r.stored_bytes),
        r.new_blobs,
        if r.keyframe { ", keyframe" } else { "" }
    );
    for note in &r.notes {
        eprintln!("note: {note}");
    }
    match &r.sealed {
        Some(s) if s.by_this_process => eprintln!(
            "all {} shards are in: sealed step {} as {}",
            r.shard.count,
            r.step,
            &s.entry.id[..12]
        ),
        Some(s) => eprintln!("step {} was sealed as {}", r.step, &s.entry.id[..12]),
        None => eprintln!(
            "step {} stays pending until all {} shards are in",
            r.step, r.shard.count
        ),
    }
}

pub fn print_pending(pending: &[crate::repo::seal::PendingReport]) {
    if pending.is_empty() {
        outln!("no pending steps");
        return;
    }
    for p in pending {
        let of = p.count.map_or("?".to_string(), |n| n.to_string());
        let group = if p.group.is_empty() {
            String::new()
        } else {
            format!(" (group {})", p.group)
        };
        outln!(
            "pending: step {} on {}{group}: {} of {of} shards in {:?}, last written {}s ago",
            p.step,
            p.branch,
            p.arrived.len(),
            p.arrived,
            p.age_secs
        );
    }
}

pub fn print_gc(r: &GcReport) {
    let verb = if r.dry_run { "would remove" } else { "removed" };
    outln!(
        "{verb} {} commits and {} blobs ({}); {} commits and {} blobs stay",
        r.commits_removed,
        r.blobs_removed,
        bytes(r.blob_bytes_removed),
        r.live_commits,
        r.live_blobs
    );
    if r.leftovers_removed > 0 {
        outln!(
            "{verb} {} objects interrupted writers left (orphan packs, old ref entries, unsealed steps)",
            r.leftovers_removed
        );
    }
    if !r.dry_run {
        outln!(
            "store on disk: {} -> {}",
            bytes(r.disk_bytes_before),
            bytes(r.disk_bytes_after)
        );
    }
}

pub fn print_push(r: &crate::repo::remote::PushReport, quiet: bool) {
    if quiet {
        return;
    }
    for pushed in &r.refs {
        let from = pushed.from.as_deref().map_or("(new)", |h| &h[..12]);
        eprintln!(
            "{} {} {}: {from} -> {} ({})",
            r.remote,
            pushed.kind,
            pushed.name,
            &pushed.to[..12],
            pushed.status
        );
    }
    eprintln!(
        "sent {} commits and {} blobs ({}) in {} PUTs",
        r.commits_sent,
        r.blobs_sent,
        bytes(r.blob_bytes_sent),
        r.traffic.puts
    );
}

pub fn print_fetch(r: &crate::repo::remote::FetchReport, quiet: bool) {
    if quiet {
        return;
    }
    for fetched in &r.refs {
        let from = fetched.from.as_deref().map_or("(new)", |h| &h[..12]);
        eprintln!("{}: {from} -> {}", fetched.tracking, &fetched.to[..12]);
    }
    for gone in &r.pruned {
        eprintln!("{gone}: deleted on the remote, removed here");
    }
    for tag in &r.tags {
        eprintln!("tag {tag}: new");
    }
    for tag in &r.tags_differing {
        eprintln!("tag {tag}: the remote's points elsewhere; the local one is kept");
    }
    eprintln!(
        "fetched {} commits and {} blobs ({}){}",
        r.commits_fetched,
        r.blobs_fetched,
        bytes(r.blob_bytes_fetched),
        if r.lazy {
            "; lazy store: blobs come at checkout"
        } else {
            ""
        }
    );
}

pub fn print_prune(r: &PruneReport) {
    let steps = |s: &[u64]| s.iter().map(u64::to_string).collect::<Vec<_>>().join(" ");
    let verb = if r.dry_run { "would drop" } else { "dropped" };
    outln!("branch {}: keeps steps {}", r.branch, steps(&r.kept));
    outln!("{verb} steps {}", steps(&r.dropped));
    if !r.dry_run {
        outln!(
            "rewrote {} commits, re-encoded {} chunks whose base was dropped",
            r.rewritten,
            r.rebased_chunks
        );
    }
    if let Some(gc) = &r.gc {
        print_gc(gc);
    }
}

pub fn print_fsck(r: &FsckReport, palette: Palette) {
    outln!(
        "checked {} blobs, {} commits, {} chunks decoded",
        r.blobs,
        r.commits,
        r.chunks_decoded
    );
    if r.unreachable_commits > 0 {
        outln!(
            "{} commits no branch or tag reaches await `ckptvc gc` (not checked)",
            r.unreachable_commits
        );
    }
    for p in &r.problems {
        outln!(
            "{} {}: {}",
            palette.paint("BROKEN", style::BROKEN),
            p.object,
            p.detail
        );
        if !p.affects.is_empty() {
            outln!("  affects: {}", p.affects.join(", "));
        }
    }
    if r.ok() {
        outln!("{}", palette.paint("store is intact", style::OK));
    }
}

/// The summary of `import` (and of `watch` when it exits).
pub fn print_import(report: &crate::repo::import::ImportReport, quiet: bool) {
    for step in &report.imported {
        outln!("{}  step {}", step.id, step.step);
    }
    if quiet {
        return;
    }
    for step in &report.imported {
        for note in &step.notes {
            eprintln!("note: step {}: {note}", step.step);
        }
    }
    if !report.incomplete.is_empty() {
        eprintln!(
            "not imported, still being written or cut short (no trainer_state.json): steps {}",
            list(&report.incomplete)
        );
    }
    eprintln!(
        "{} steps imported onto `{}`{}: {} in, {} stored ({})",
        report.imported.len(),
        report.branch,
        if report.skipped.is_empty() {
            String::new()
        } else {
            format!(", {} already there", report.skipped.len())
        },
        bytes(report.input_bytes),
        bytes(report.stored_bytes),
        ratio(report.ratio)
    );
}

fn list(steps: &[u64]) -> String {
    steps
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Prints each step `watch` commits as it happens: a line of JSON per event
/// with `--json` (so a pipeline can follow along), else a line of text.
pub struct WatchPrinter {
    pub json: bool,
    pub quiet: bool,
}

impl crate::repo::import::WatchEvents for WatchPrinter {
    fn committed(&self, step: &crate::repo::import::ImportedStep) {
        if self.json {
            let mut line = serde_json::to_value(step).expect("serializable");
            line["event"] = "committed".into();
            outln!("{line}");
        } else if !self.quiet {
            eprintln!(
                "step {}: committed {} ({} in, {} stored)",
                step.step,
                &step.id[..12],
                bytes(step.input_bytes),
                bytes(step.stored_bytes)
            );
            for note in &step.notes {
                eprintln!("note: step {}: {note}", step.step);
            }
        }
    }

    fn deleted(&self, dir: &std::path::Path) {
        if self.json {
            outln!("{}", serde_json::json!({"event": "deleted", "dir": dir}));
        } else if !self.quiet {
            eprintln!("deleted {} (its commit verified)", dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_sizes() {
        assert_eq!(date(0), "1970-01-01 00:00:00");
        assert_eq!(date(1_764_000_000_000), "2025-11-24 16:00:00");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
    }
}
