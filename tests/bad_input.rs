//! Every bad input gets a clear error naming the file and the problem, a
//! non-zero exit, and leaves the store exactly as it was.

mod common;

use std::path::Path;

use common::*;
use predicates::prelude::*;
use predicates::str::contains;

/// A store with two commits, to be refused things.
fn seeded() -> Env {
    let env = Env::init();
    env.commit(&fixture(20), 20);
    env.commit(&fixture(40), 40);
    env
}

/// Runs `commit DIR --step STEP` and asserts it fails with every `needle` in
/// stderr and that the store is unchanged.
fn refuses(env: &Env, dir: &Path, step: u64, needles: &[&str]) {
    let before = env.snapshot();
    let assert = env
        .cmd()
        .args(["commit", "--step", &step.to_string()])
        .arg(dir)
        .assert()
        .failure();
    let stderr = String::from_utf8_lossy(&assert.get_output().stderr).into_owned();
    for needle in needles {
        assert!(stderr.contains(needle), "stderr lacks `{needle}`: {stderr}");
    }
    assert_eq!(before, env.snapshot(), "store changed after: {stderr}");
}

/// A copy of fixture step 60 with `model.safetensors` replaced by `bytes`.
fn with_model(env: &Env, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = env.path(name);
    copy_dir(&fixture(60), &dir);
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    dir
}

#[test]
fn missing_and_empty_directories() {
    let env = seeded();
    refuses(
        &env,
        &env.path("nope"),
        60,
        &["nope", "cannot read checkpoint directory"],
    );
    let file = env.path("file");
    std::fs::write(&file, "x").unwrap();
    refuses(&env, &file, 60, &["file", "not a directory"]);
    let empty = env.path("empty");
    std::fs::create_dir(&empty).unwrap();
    refuses(&env, &empty, 60, &["empty", "no files"]);
}

#[test]
fn damaged_safetensors_files() {
    let env = seeded();
    let good = std::fs::read(fixture(60).join("model.safetensors")).unwrap();
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "truncated",
            good[..good.len() - 100].to_vec(),
            vec!["run past the end"],
        ),
        ("stub", good[..5].to_vec(), vec!["truncated"]),
        (
            "short-header",
            good[..50].to_vec(),
            vec!["truncated", "header says"],
        ),
        (
            "json",
            safetensors_bytes("{\"a\": [1, 2", 0),
            vec!["not a valid JSON"],
        ),
        (
            "past",
            safetensors_bytes(
                r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                8,
            ),
            vec!["`w`", "run past the end"],
        ),
        (
            "overlap",
            safetensors_bytes(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                12,
            ),
            vec!["`b`", "overlap"],
        ),
        (
            "dtype",
            safetensors_bytes(
                r#"{"w":{"dtype":"F24","shape":[2],"data_offsets":[0,6]}}"#,
                6,
            ),
            vec!["`w`", "unknown dtype `F24`"],
        ),
        (
            "shape",
            safetensors_bytes(
                r#"{"w":{"dtype":"F32","shape":[3,3],"data_offsets":[0,32]}}"#,
                32,
            ),
            vec!["`w`", "9 elements", "32 bytes"],
        ),
    ];
    for (name, bytes, needles) in cases {
        let dir = with_model(&env, name, &bytes);
        let mut all = needles.clone();
        all.push("model.safetensors");
        refuses(&env, &dir, 60, &all);
    }
}

#[test]
fn step_rules() {
    let env = seeded();
    refuses(&env, &fixture(40), 40, &["step 40 already exists", "main"]);
    refuses(
        &env,
        &fixture(20),
        30,
        &["step 30 is lower than", "step 40"],
    );
}

#[test]
fn missing_store() {
    let env = Env::new();
    env.cmd()
        .args(["commit", "--step", "1"])
        .arg(fixture(20))
        .assert()
        .failure()
        .stderr(contains("no ckptvc store").and(contains("ckptvc init")));
    assert!(
        !env.repo().exists(),
        "a failed commit must not create a store"
    );
    env.cmd()
        .args(["log"])
        .assert()
        .failure()
        .stderr(contains("no ckptvc store"));
}

#[test]
fn init_refuses_an_existing_store() {
    let env = seeded();
    let before = env.snapshot();
    env.cmd()
        .arg("init")
        .assert()
        .failure()
        .stderr(contains("already exists"));
    assert_eq!(before, env.snapshot());
}

#[test]
fn locked_store_is_refused_then_waited_for() {
    let env = seeded();
    let before = env.snapshot();
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(env.repo().join("lock"))
        .unwrap();
    lock.lock().unwrap();
    env.cmd()
        .args(["commit", "--step", "60"])
        .arg(fixture(60))
        .assert()
        .failure()
        .stderr(contains("store is locked"));
    assert_eq!(before, env.snapshot());
    // Readers are not blocked by a writer.
    env.cmd().args(["log"]).assert().success();

    // With --wait, the commit goes through once the holder lets go.
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(500));
        lock.unlock().unwrap();
    });
    env.cmd()
        .args(["--wait", "30", "commit", "--step", "60"])
        .arg(fixture(60))
        .assert()
        .success();
    releaser.join().unwrap();
}

#[test]
fn concurrent_commits_never_corrupt() {
    let env = seeded();
    let spawn = |step: u64| {
        std::process::Command::new(assert_cmd::cargo::cargo_bin("ckptvc"))
            .arg("--repo")
            .arg(env.repo())
            .args([
                "commit",
                "--step",
                &step.to_string(),
                "--branch",
                &format!("b{step}"),
            ])
            .arg(fixture(step))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let children = [spawn(60), spawn(80), spawn(100)];
    let mut committed = Vec::new();
    for (step, child) in [60, 80, 100].into_iter().zip(children) {
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            committed.push(step);
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("store is locked"), "{stderr}");
        }
    }
    assert!(!committed.is_empty());
    for step in committed {
        let out = env.checkout(&format!("b{step}@{step}"), &format!("out{step}"));
        assert_same_files(&fixture(step), &out);
    }
}
