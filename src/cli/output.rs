//! Human-readable tables and JSON.

use crate::repo::inspect::ShowReport;
use crate::repo::{LogEntry, Stats};

pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
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

pub fn print_log(entries: &[LogEntry]) {
    println!(
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
    );
    for e in entries {
        println!(
            "{:<12}  {:>8}  {:<12}  {:<19}  {:>10}  {:>10}  {:>6.1}x  {:<9}  {:>8.2e}  {:>8.2e}  {:>8.2e}  {}{}",
            &e.id[..12],
            e.step,
            e.branch,
            date(e.time_ms),
            bytes(e.input_bytes),
            bytes(e.stored_bytes),
            e.ratio,
            e.policy.split('(').next().unwrap_or_default(),
            e.error_w,
            e.error_m,
            e.error_v,
            if e.keyframe { "[keyframe] " } else { "" },
            e.message
        );
    }
}

pub fn print_show(report: &ShowReport) {
    let c = &report.commit;
    println!("commit   {}", c.id);
    println!("step     {} on {}", c.step, c.branch);
    for p in &c.parents {
        println!("parent   {p}");
    }
    println!("date     {} UTC", date(c.time_ms));
    println!(
        "size     {} in, {} stored ({:.1}x){}",
        bytes(c.input_bytes),
        bytes(c.stored_bytes),
        c.ratio,
        if c.keyframe { ", keyframe" } else { "" }
    );
    println!("policy   {}", c.policy);
    println!(
        "error    W {:.3e}, m {:.3e}, v {:.3e} (relative L2, lossy-coded tensors)",
        c.error_w, c.error_m, c.error_v
    );
    if !c.message.is_empty() {
        println!("message  {}", c.message);
    }
    println!();
    println!(
        "{:<24} {:<40} {:<6} {:<16} {:<20} {:>10} {:>10} {:>9}",
        "file", "tensor", "dtype", "shape", "codec", "in", "out", "rel err"
    );
    for e in &report.entries {
        let shape = e
            .shape
            .as_ref()
            .map(|s| format!("{s:?}"))
            .unwrap_or_default();
        println!(
            "{:<24} {:<40} {:<6} {:<16} {:<20} {:>10} {:>10} {:>9.2e}",
            e.file,
            e.tensor.as_deref().unwrap_or("-"),
            e.dtype.as_deref().unwrap_or("-"),
            shape,
            e.codecs.join("+"),
            bytes(e.bytes_in),
            bytes(e.bytes_out),
            e.rel_error
        );
    }
}

pub fn print_stats(s: &Stats) {
    println!("commits         {}", s.commits);
    println!("branches        {}", s.branches);
    println!("blobs           {}", s.blobs);
    println!(
        "logical bytes   {} ({})",
        s.logical_bytes,
        bytes(s.logical_bytes)
    );
    println!("blob bytes      {} ({})", s.blob_bytes, bytes(s.blob_bytes));
    println!(
        "physical bytes  {} ({})",
        s.physical_bytes,
        bytes(s.physical_bytes)
    );
    println!(
        "cache bytes     {} ({}, deletable)",
        s.cache_bytes,
        bytes(s.cache_bytes)
    );
    println!("ratio           {:.2}x", s.ratio);
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
