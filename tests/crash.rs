//! Crash consistency: `commit`, `gc` and `prune` are killed with SIGKILL at
//! random moments; after every kill the store must be intact (fsck), keep
//! every commit it had, and hold the interrupted commit fully or not at all.
//!
//! `CKPTVC_CRASH_KILLS` sets the number of kills (default 12; the figure in
//! docs/reliability.md is from 200), `CKPTVC_CRASH_SEED` the random seed.

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Env, STEPS, fixture, large_checkpoint};
use serde_json::Value;

/// A small deterministic generator (xorshift64*), so a failing seed replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (id, branch, step) of every commit a branch or tag reaches.
fn history(env: &Env) -> BTreeSet<(String, String, u64)> {
    env.json(&["log", "--all"])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["id"].as_str().unwrap().to_string(),
                e["branch"].as_str().unwrap().to_string(),
                e["step"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn steps_of(history: &BTreeSet<(String, String, u64)>, branch: &str) -> BTreeSet<u64> {
    history
        .iter()
        .filter(|(_, b, _)| b == branch)
        .map(|(_, _, s)| *s)
        .collect()
}

/// Runs `args` and SIGKILLs it after `delay` unless it ended first.
/// Returns whether it finished by itself with status 0.
fn run_and_kill(env: &Env, args: &[String], delay: Duration) -> bool {
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("ckptvc"))
        .arg("--repo")
        .arg(env.repo())
        .arg("--quiet")
        .args(args)
        .env_remove("CKPTVC_REPO")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    if let Some(status) = child.try_wait().unwrap() {
        return status.success();
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    false
}

#[test]
fn killed_writers_lose_nothing() {
    let kills = env_u64("CKPTVC_CRASH_KILLS", 12);
    let mut rng = Rng(env_u64("CKPTVC_CRASH_SEED", 0x5eed) | 1);
    let env = Env::init_with(&["--policy", "balanced"]);
    env.commit(&fixture(20), 20);
    // Tagged, so prune keeps it: the final byte-for-byte check.
    env.cmd().args(["tag", "t20", "main@20"]).assert().success();
    let mut next_step = 40;
    let (mut killed, mut finished) = (0, 0);
    let mut ops = [0u32; 3];
    while killed < kills {
        let before = history(&env);
        let op = rng.below(6);
        let args: Vec<String> = match op {
            // Commits are the common case: a branch gets a new step.
            0..=3 => {
                let branch = if rng.below(3) == 0 { "side" } else { "main" };
                let dir = fixture(STEPS[rng.below(STEPS.len() as u64) as usize]);
                let mut a = vec![
                    "commit".to_string(),
                    "--branch".into(),
                    branch.into(),
                    "--step".into(),
                    next_step.to_string(),
                ];
                if branch == "side" && steps_of(&before, "side").is_empty() {
                    a.extend(["--parent".into(), "main@20".into()]);
                }
                a.push(dir.to_string_lossy().into_owned());
                a
            }
            4 => vec!["gc".into()],
            _ => vec![
                "prune".into(),
                "--branch".into(),
                "main".into(),
                "--keep-last".into(),
                "3".into(),
                "--keep-every".into(),
                "100".into(),
            ],
        };
        ops[match op {
            0..=3 => 0,
            4 => 1,
            _ => 2,
        }] += 1;
        let expected_prune = (op == 5).then(|| {
            env.json(&[
                "prune",
                "--dry-run",
                "--branch",
                "main",
                "--keep-last",
                "3",
                "--keep-every",
                "100",
            ])
        });
        let delay = Duration::from_millis(rng.below(400));
        if run_and_kill(&env, &args, delay) {
            finished += 1;
        } else {
            killed += 1;
        }

        // The store is intact and a stale lock does not block the next writer.
        let fsck = env.cmd().arg("fsck").output().unwrap();
        assert!(
            fsck.status.success(),
            "fsck after {args:?} killed at {delay:?}:\n{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        let after = history(&env);
        match op {
            0..=3 => {
                // Nothing lost; the new step is there entirely or not at all
                // (fsck decoded all of it if it is).
                assert!(before.is_subset(&after), "{args:?}: commits lost");
                assert!(after.len() <= before.len() + 1, "{args:?}");
                if after.len() == before.len() + 1 {
                    next_step += 20;
                }
            }
            4 => assert_eq!(before, after, "gc changed the history"),
            _ => {
                // Either the old history or the pruned one.
                let kept: BTreeSet<u64> = expected_prune.unwrap()["kept"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v: &Value| v.as_u64().unwrap())
                    .collect();
                let main_after = steps_of(&after, "main");
                assert!(
                    after == before || main_after == kept,
                    "prune half-applied: before {:?}, after {main_after:?}, kept {kept:?}",
                    steps_of(&before, "main")
                );
            }
        }
    }
    // fsck decoded every commit; the step 20 keyframe checks out byte for byte.
    let out = env.checkout("t20", "final");
    common::assert_same_files(&fixture(20), &out);
    eprintln!(
        "{killed} kills, {finished} runs finished first; commits/gc/prune started: {ops:?}; {} commits",
        history(&env).len()
    );
}

/// Commits of 64 MiB or more write their blobs to a pack of their own
/// (`packs/tmp-…` renamed when synced, then indexed). Killed anywhere, they
/// leave the store intact with the commit whole or absent; `gc` removes
/// what killed writers left in `packs/`, and every pack left is read back.
#[test]
fn killed_large_commits_leave_nothing_gc_keeps() {
    let kills = env_u64("CKPTVC_CRASH_KILLS", 12).div_ceil(3);
    let mut rng = Rng(env_u64("CKPTVC_CRASH_SEED", 0x5eed) | 1);
    let env = Env::init();
    let dir = env.path("large");
    let mut step = 1;
    let mut killed = 0;
    while killed < kills {
        large_checkpoint(&dir, 72, step);
        let before = history(&env);
        let args: Vec<String> = vec![
            "commit".into(),
            "--step".into(),
            step.to_string(),
            "--keyframe".into(),
            dir.to_string_lossy().into_owned(),
        ];
        let delay = Duration::from_millis(rng.below(1500));
        if !run_and_kill(&env, &args, delay) {
            killed += 1;
        }
        env.cmd().arg("fsck").assert().success();
        let after = history(&env);
        assert!(before.is_subset(&after) && after.len() <= before.len() + 1);
        if after.len() > before.len() {
            step += 1;
        }
    }
    large_checkpoint(&dir, 72, step);
    env.commit(&dir, step);
    let packs = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(env.repo().join("packs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert!(
        packs().iter().any(|n| !n.starts_with("tmp-")),
        "{:?}",
        packs()
    );
    env.cmd().args(["gc", "--grace", "0"]).assert().success();
    let left = packs();
    assert!(left.iter().all(|n| !n.starts_with("tmp-")), "{left:?}");
    assert_eq!(
        left.len(),
        history(&env).len(),
        "a pack per commit: {left:?}"
    );
    let out = env.checkout(&format!("main@{step}"), "out");
    common::assert_same_files(&dir, &out);
    env.cmd().arg("fsck").assert().success();
}
