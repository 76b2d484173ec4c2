//! Commit the fixture series, check every step out, compare byte for byte.

mod common;

use common::*;
use predicates::str::contains;

#[test]
fn every_step_checks_out_byte_identical() {
    let env = Env::init();
    let mut ids = Vec::new();
    for step in STEPS {
        let id = env.commit(&fixture(step), step);
        assert_eq!(id.len(), 64, "commit prints the full id: {id}");
        ids.push(id);
    }
    for (step, id) in STEPS.iter().zip(&ids) {
        for rev in [
            step.to_string(),
            format!("main@{step}"),
            id[..8].to_string(),
        ] {
            let out = env.checkout(&rev, &format!("out-{rev}"));
            assert_same_files(&fixture(*step), &out);
        }
    }
    // The branch name checks out its tip.
    let out = env.checkout("main", "tip");
    assert_same_files(&fixture(120), &out);
}

#[test]
fn checkout_without_sync_writes_the_same_files() {
    let env = Env::init();
    for step in [20, 40] {
        env.commit(&fixture(step), step);
    }
    for step in [20, 40] {
        let out = env.path(&format!("nosync{step}"));
        env.cmd()
            .args(["checkout", &step.to_string(), "--no-sync", "-o"])
            .arg(&out)
            .assert()
            .success();
        assert_same_files(&fixture(step), &out);
    }
}

#[test]
fn checkout_without_the_cache_decodes_from_blobs() {
    let env = Env::init();
    for step in STEPS {
        env.commit(&fixture(step), step);
    }
    std::fs::remove_dir_all(env.repo().join("cache")).unwrap();
    for step in [120, 60] {
        let out = env.checkout(&step.to_string(), &format!("out{step}"));
        assert_same_files(&fixture(step), &out);
    }
    // Committing on top of a tip whose cache is gone still works (decodes the base).
    let id = env.commit(&fixture(120), 140);
    let out = env.path("out140");
    env.cmd()
        .args(["checkout", &id[..10], "-o"])
        .arg(&out)
        .assert()
        .success();
    assert_same_files(&fixture(120), &out);
}

#[test]
fn log_and_show_report_the_history() {
    let env = Env::init();
    for step in [20, 40, 60] {
        env.commit(&fixture(step), step);
    }
    let log = env.json(&["log"]);
    let log = log.as_array().unwrap();
    assert_eq!(log.len(), 3);
    let steps: Vec<u64> = log.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [60, 40, 20], "newest first");
    for key in [
        "id",
        "step",
        "branch",
        "parents",
        "input_bytes",
        "stored_bytes",
    ] {
        assert!(log[0].get(key).is_some(), "log entry lacks {key}");
    }
    assert_eq!(log[0]["parents"][0], log[1]["id"]);
    assert_eq!(log[2]["parents"].as_array().unwrap().len(), 0);
    assert!(log[2]["keyframe"].as_bool().unwrap());

    let show = env.json(&["show", "40"]);
    let entries = show["entries"].as_array().unwrap();
    let tensor = entries
        .iter()
        .find(|e| e["tensor"] == "blocks.0.mlp.0.weight.exp_avg")
        .expect("optimizer tensor listed");
    assert_eq!(tensor["dtype"], "F32");
    assert_eq!(tensor["shape"], serde_json::json!([320, 80]));
    assert_eq!(tensor["bytes_in"], 320 * 80 * 4);
    assert!(
        entries
            .iter()
            .any(|e| e["file"] == "meta.json" && e["tensor"].is_null())
    );

    env.cmd()
        .args(["log"])
        .assert()
        .success()
        .stdout(contains("main").and(contains("[keyframe]")));
    env.cmd()
        .args(["show", "main@40"])
        .assert()
        .success()
        .stdout(contains("blocks.0.attn.in_proj_weight").and(contains("xor-delta")));
    let stats = env.json(&["stats"]);
    assert_eq!(stats["commits"], 3);
    assert!(stats["ratio"].as_f64().unwrap() > 1.0);
}

#[test]
fn identical_commit_adds_no_blobs() {
    let env = Env::init();
    // On top of a keyframe commit, then on top of a delta commit.
    for (dir_step, step, commits) in [(20, 20, 1), (20, 21, 2), (40, 40, 3), (40, 41, 4)] {
        let before = env.json(&["stats"]);
        env.commit(&fixture(dir_step), step);
        let after = env.json(&["stats"]);
        assert_eq!(after["commits"], commits);
        if step == dir_step {
            continue;
        }
        assert_eq!(before["blobs"], after["blobs"], "step {step}");
        assert_eq!(before["blob_bytes"], after["blob_bytes"]);
        assert_eq!(env.json(&["log"])[0]["stored_bytes"], 0);
    }
    let out = env.checkout("41", "out");
    assert_same_files(&fixture(40), &out);
}

#[test]
fn unchanged_tensors_add_no_blobs() {
    // Only meta.json changes: exactly one new blob, no tensor bytes stored.
    let env = Env::init();
    env.commit(&fixture(20), 20);
    env.commit(&fixture(40), 40);
    let dir = env.path("edited");
    copy_dir(&fixture(40), &dir);
    std::fs::write(dir.join("meta.json"), "{\"step\": 41}\n").unwrap();
    let before = env.json(&["stats"]);
    env.commit(&dir, 41);
    let after = env.json(&["stats"]);
    assert_eq!(
        after["blobs"].as_u64().unwrap(),
        before["blobs"].as_u64().unwrap() + 1
    );
    let log = env.json(&["log"]);
    assert!(log[0]["stored_bytes"].as_u64().unwrap() < 200, "{}", log[0]);
    let out = env.checkout("41", "out");
    assert_same_files(&dir, &out);
}

#[test]
fn keyframe_interval_bounds_chains() {
    let env = Env::init_with(&["--policy", "lossless", "--keyframe-interval", "2"]);
    for step in STEPS {
        env.commit(&fixture(step), step);
    }
    let log = env.json(&["log"]);
    let keyframes: Vec<bool> = log
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|e| e["keyframe"].as_bool().unwrap())
        .collect();
    assert_eq!(keyframes, [true, false, true, false, true, false]);
    // --keyframe forces one.
    let env = Env::init();
    env.commit(&fixture(20), 20);
    env.cmd()
        .args(["commit", "--keyframe", "--step", "40"])
        .arg(fixture(40))
        .assert()
        .success();
    assert_eq!(env.json(&["log"])[0]["keyframe"], true);
}

#[test]
fn checkout_refuses_non_empty_output_without_force() {
    let env = Env::init();
    env.commit(&fixture(20), 20);
    let out = env.path("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("other"), "x").unwrap();
    env.cmd()
        .args(["checkout", "20", "-o"])
        .arg(&out)
        .assert()
        .failure()
        .stderr(contains("not empty").and(contains("--force")));
    env.cmd()
        .args(["checkout", "20", "--force", "-o"])
        .arg(&out)
        .assert()
        .success();
    std::fs::remove_file(out.join("other")).unwrap();
    assert_same_files(&fixture(20), &out);
}

#[test]
fn branches_and_revisions() {
    let env = Env::init();
    env.commit(&fixture(20), 20);
    env.cmd()
        .args(["commit", "--branch", "restart", "--step", "40"])
        .arg(fixture(40))
        .assert()
        .success();
    // The current branch is now `restart`: a bare step resolves there, and
    // the new branch forked from main's tip, so it holds step 20 too.
    let out = env.checkout("40", "a");
    assert_same_files(&fixture(40), &out);
    let out = env.checkout("20", "b");
    assert_same_files(&fixture(20), &out);
    env.cmd()
        .args(["checkout", "main@40", "-o"])
        .arg(env.path("b2"))
        .assert()
        .failure()
        .stderr(contains("no commit at step 40"));
    let out = env.checkout("main@20", "c");
    assert_same_files(&fixture(20), &out);
    env.cmd()
        .args(["checkout", "nosuch@20", "-o"])
        .arg(env.path("d"))
        .assert()
        .failure()
        .stderr(contains("no branch named `nosuch`"));
    assert_eq!(
        env.json(&["log", "--branch", "main"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(env.json(&["log", "--all"]).as_array().unwrap().len(), 2);
}

use predicates::prelude::*;
