//! Damage every kind of file in a store (flip a byte in the middle, or
//! truncate to half) and check that it is detected by `fsck` or by
//! `checkout`, and that no checkout ever exits 0 with wrong data. With
//! `--nocapture` it prints the table in docs/reliability.md.

mod common;

use std::path::{Path, PathBuf};

use common::{Env, assert_same_files, file_digests, fixture};

const STEPS: [u64; 3] = [20, 40, 60];

#[derive(Clone, Copy, Debug)]
enum Damage {
    Flip,
    Truncate,
}

fn damage(path: &Path, kind: Damage) {
    let mut bytes = std::fs::read(path).unwrap();
    match kind {
        Damage::Flip if !bytes.is_empty() => {
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x55;
        }
        Damage::Flip => bytes.push(0x55),
        Damage::Truncate => bytes.truncate(bytes.len() / 2),
    }
    std::fs::write(path, bytes).unwrap();
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The kind of a store file, for the table: its name without numbers.
fn kind(rel: &str) -> String {
    let name = rel.rsplit('/').next().unwrap();
    if rel.starts_with("cache/") {
        return "cache/tips/<id> (reconstruction cache)".into();
    }
    let stem: String = name
        .chars()
        .map(|c| if c.is_ascii_digit() { '#' } else { c })
        .collect();
    stem.replace("######", "#").replace("#.", "N.")
}

#[test]
fn every_damage_is_detected_or_harmless() {
    // Lossy, so checkouts go through residual chains and the cache.
    let env = Env::init_with(&["--policy", "balanced"]);
    for step in STEPS {
        env.commit(&fixture(step), step);
    }
    let originals: Vec<PathBuf> = STEPS
        .iter()
        .map(|s| env.checkout(&s.to_string(), &format!("orig-{s}")))
        .collect();
    let store = env.repo();
    let mut rows = Vec::new();
    for path in files(&store) {
        let rel = path
            .strip_prefix(&store)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if rel.starts_with("db/LOG") || rel == "lock" || rel == "view.lock" {
            continue; // informational logs and lock files carry no data
        }
        for kind_of_damage in [Damage::Flip, Damage::Truncate] {
            let copy = Env::new();
            copy_tree(&store, &copy.repo());
            damage(&copy.repo().join(&rel), kind_of_damage);
            let fsck_failed = !copy.cmd().arg("fsck").output().unwrap().status.success();
            let mut checkouts_failed = 0;
            for (step, original) in STEPS.iter().zip(&originals) {
                let out = copy.path(&format!("out-{step}"));
                let status = copy
                    .cmd()
                    .args(["checkout", &step.to_string(), "-o"])
                    .arg(&out)
                    .output()
                    .unwrap()
                    .status;
                if status.success() {
                    // Never: exit 0 with wrong data.
                    assert_eq!(
                        file_digests(original),
                        file_digests(&out),
                        "{rel} {kind_of_damage:?}: checkout {step} exited 0 with wrong data"
                    );
                } else {
                    checkouts_failed += 1;
                }
            }
            let verdict = match (fsck_failed, checkouts_failed) {
                (true, 0) => "fsck".to_string(),
                (true, n) => format!("fsck + checkout ({n}/3 refused)"),
                (false, 0) => "harmless (all checkouts exact)".to_string(),
                (false, n) => format!("checkout ({n}/3 refused)"),
            };
            rows.push((kind(&rel), format!("{kind_of_damage:?}"), verdict));
        }
    }
    rows.sort();
    rows.dedup();
    eprintln!("| file | damage | detected by |\n|---|---|---|");
    for (file, damage, verdict) in &rows {
        eprintln!("| `{file}` | {damage} | {verdict} |");
    }
    assert!(rows.len() >= 10, "{rows:?}");
    // The undamaged store is untouched by all this.
    assert_same_files(&originals[0], &env.checkout("20", "again"));
}

fn copy_tree(src: &Path, dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let target = dest.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
