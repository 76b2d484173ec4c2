//! Concurrent writers and readers on one store: every commit lands, none is
//! lost or interleaved, readers never fail or see half a commit.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use common::{Env, STEPS, fixture};

const WRITERS: usize = 4;
const COMMITS_EACH: u64 = 10;

#[test]
fn four_writers_on_four_branches_and_readers_alongside() {
    let env = Env::init_with(&["--policy", "balanced"]);
    env.commit(&fixture(20), 0);
    let done = AtomicBool::new(false);
    thread::scope(|scope| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let env = &env;
                scope.spawn(move || {
                    let branch = format!("run-{w}");
                    for i in 1..=COMMITS_EACH {
                        let dir = fixture(STEPS[(w + i as usize) % STEPS.len()]);
                        let mut cmd = env.cmd();
                        // Wait for the lock as long as it takes here.
                        cmd.args(["--wait", "600", "--quiet", "commit", "--branch", &branch]);
                        cmd.args(["--step", &(i * 10).to_string()]);
                        if i == 1 {
                            cmd.args(["--parent", "main@0"]);
                        }
                        cmd.arg(dir).assert().success();
                    }
                })
            })
            .collect();
        let reader = scope.spawn(|| {
            let mut runs = 0;
            while !done.load(Ordering::Relaxed) {
                for args in [&["log", "--all"][..], &["fsck"], &["branch"]] {
                    env.cmd().args(args).assert().success();
                }
                runs += 1;
            }
            runs
        });
        for writer in writers {
            writer.join().unwrap();
        }
        done.store(true, Ordering::Relaxed);
        let runs = reader.join().unwrap();
        assert!(runs > 0);
    });
    let log = env.json(&["log", "--all"]);
    assert_eq!(
        log.as_array().unwrap().len(),
        1 + WRITERS * COMMITS_EACH as usize
    );
    for w in 0..WRITERS {
        let branch = format!("run-{w}");
        let history = env.json(&["log", "--branch", &branch]);
        let steps: Vec<u64> = history
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["step"].as_u64().unwrap())
            .collect();
        let expected: Vec<u64> = (0..=COMMITS_EACH).rev().map(|i| i * 10).collect();
        assert_eq!(steps, expected, "{branch}");
    }
    env.cmd().arg("fsck").assert().success();
}

#[test]
fn lock_of_a_killed_writer_is_released() {
    let env = Env::init();
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("ckptvc"))
        .arg("--repo")
        .arg(env.repo())
        .args(["--quiet", "commit", "--step", "20"])
        .arg(fixture(20))
        .spawn()
        .unwrap();
    // Kill it while it most likely holds the lock.
    std::thread::sleep(std::time::Duration::from_millis(30));
    child.kill().unwrap();
    child.wait().unwrap();
    // No --wait: a lock left by a dead process must not block.
    env.cmd()
        .args(["commit", "--step", "40"])
        .arg(fixture(40))
        .assert()
        .success();
    env.cmd().arg("fsck").assert().success();
}
