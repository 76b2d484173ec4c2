//! History operations on the fixture series: forks and step resolution,
//! branch deletion and gc (with the space coming back), prune (every kept
//! commit checks out bit-identically), tags, and fsck on a damaged store.

mod common;

use std::path::Path;

use common::{Env, STEPS, assert_same_files, file_digests, fixture, large_checkpoint};
use predicates::str::contains;
use serde_json::Value;

fn id_of(env: &Env, rev: &str) -> String {
    env.json(&["show", rev])["id"].as_str().unwrap().to_string()
}

/// `du -sb` of the store's database.
fn disk_bytes(env: &Env) -> u64 {
    fn walk(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let meta = e.metadata().unwrap();
                if meta.is_dir() {
                    walk(&e.path())
                } else {
                    meta.len()
                }
            })
            .sum()
    }
    walk(&env.repo().join("db"))
}

/// main: 20, 40, 60; `retry` forked at main@40 with its own 60 and 80
/// (other checkpoints than main's, as after a restart).
fn forked(env: &Env) {
    for step in [20, 40, 60] {
        env.commit(&fixture(step), step);
    }
    env.cmd()
        .args(["branch", "retry", "main@40"])
        .assert()
        .success();
    env.commit_on("retry", &fixture(100), 60);
    env.commit_on("retry", &fixture(120), 80);
    env.cmd().args(["switch", "main"]).assert().success();
}

#[test]
fn fork_resolves_steps_along_each_branch() {
    let env = Env::init();
    forked(&env);
    // The fork point and what precedes it are shared; later steps are not.
    assert_eq!(id_of(&env, "retry@40"), id_of(&env, "main@40"));
    assert_eq!(id_of(&env, "retry@20"), id_of(&env, "main@20"));
    assert_ne!(id_of(&env, "retry@60"), id_of(&env, "main@60"));
    assert_same_files(&fixture(60), &env.checkout("main@60", "a"));
    assert_same_files(&fixture(100), &env.checkout("retry@60", "b"));
    assert_same_files(&fixture(120), &env.checkout("retry@80", "c"));
    // A bare step resolves on the current branch (main, after `switch`).
    assert_same_files(&fixture(60), &env.checkout("60", "d"));
    env.cmd()
        .args(["checkout", "main@80", "-o"])
        .arg(env.path("e"))
        .assert()
        .failure()
        .stderr(contains("no commit at step 80"));

    let branches = env.json(&["branch"]);
    let retry = branches
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "retry")
        .unwrap();
    assert_eq!(retry["commits"], 4);
    assert_eq!(retry["tip_step"], 80);

    // The graph shows both tips; its JSON gives each node with its parents.
    let graph = env.cmd().args(["log", "--graph"]).assert().success();
    let text = String::from_utf8(graph.get_output().stdout.clone()).unwrap();
    assert!(
        text.contains("(retry)") && text.contains("(main)"),
        "{text}"
    );
    assert!(text.contains("|/"), "{text}");
    let nodes = env.json(&["log", "--graph"]);
    assert_eq!(nodes.as_array().unwrap().len(), 5);
    let fork_children = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["commit"]["parents"][0] == id_of(&env, "main@40").as_str())
        .count();
    assert_eq!(fork_children, 2);
}

#[test]
fn commit_forks_from_current_tip_or_parent() {
    let env = Env::init();
    for step in [20, 40] {
        env.commit(&fixture(step), step);
    }
    // --parent says where a new branch starts.
    env.cmd()
        .args([
            "commit", "--branch", "r20", "--parent", "main@20", "--step", "30",
        ])
        .arg(fixture(60))
        .assert()
        .success();
    let show = env.json(&["show", "r20@30"]);
    assert_eq!(show["parents"][0], id_of(&env, "main@20").as_str());
    // --parent on an existing branch is refused, and so is a step below
    // the fork point.
    env.cmd()
        .args([
            "commit", "--branch", "r20", "--parent", "main@40", "--step", "50",
        ])
        .arg(fixture(80))
        .assert()
        .failure()
        .stderr(contains("branch `r20` exists"));
    env.cmd()
        .args([
            "commit", "--branch", "r40", "--parent", "main@40", "--step", "10",
        ])
        .arg(fixture(80))
        .assert()
        .failure()
        .stderr(contains("lower than step 40"));
    env.cmd()
        .args(["branch", "r20", "main"])
        .assert()
        .failure()
        .stderr(contains("already exists"));
    env.cmd()
        .args(["switch", "nosuch"])
        .assert()
        .failure()
        .stderr(contains("no branch named `nosuch`"));
}

/// A large commit's pack whose blobs are partly dead after its commit is
/// pruned: `gc` moves the live ones (more than one write batch of them)
/// into the database and deletes the pack, and the surviving commit still
/// checks out byte for byte.
#[test]
fn gc_keeps_the_live_blobs_of_a_large_commits_pack() {
    let env = Env::init();
    let shared = env.path("shared");
    large_checkpoint(&shared, 96, 1);
    let both = env.path("both");
    large_checkpoint(&both, 96, 1);
    large_checkpoint(&both.join("extra"), 8, 2);
    let packs = || std::fs::read_dir(env.repo().join("packs")).map_or(0, |d| d.count());
    env.commit(&both, 1);
    assert_eq!(packs(), 1, "the commit of 104 MiB wrote a pack");
    // The next commit reuses the unchanged file's blobs: it writes none.
    let next = env.json(&["commit", "--step", "2", shared.to_str().unwrap()]);
    assert_eq!(next["new_blobs"], 0, "{next}");
    assert_eq!(packs(), 1);
    // Pruning step 1 collects its garbage (prune runs gc).
    let physical = || env.json(&["stats"])["physical_bytes"].as_u64().unwrap();
    let before = physical();
    let prune = env.json(&["prune", "--branch", "main", "--keep-last", "1"]);
    assert!(prune.to_string().contains("blobs_removed"), "{prune}");
    assert_eq!(packs(), 0, "the pack was deleted once its live blobs moved");
    let after = physical();
    assert!(after + (6 << 20) < before, "{before} -> {after}");
    assert_eq!(env.json(&["gc"])["blobs_removed"], 0);
    let out = env.checkout("main@2", "out");
    assert_same_files(&shared, &out);
    env.cmd().arg("fsck").assert().success();
}

#[test]
fn deleted_branch_space_comes_back_after_gc() {
    let env = Env::init();
    forked(&env);
    env.cmd()
        .args(["branch", "--delete", "main"])
        .assert()
        .failure()
        .stderr(contains("current branch"));
    env.cmd()
        .args(["branch", "--delete", "retry"])
        .assert()
        .success();

    // A dry run reports and changes nothing.
    let before_files = file_digests(&env.repo().join("db"));
    let plan = env.json(&["gc", "--dry-run"]);
    assert_eq!(file_digests(&env.repo().join("db")), before_files);
    assert_eq!(plan["commits_removed"], 2);
    let unique_bytes = plan["blob_bytes_removed"].as_u64().unwrap();
    assert!(unique_bytes > 1_000_000, "{plan}");

    let du_before = disk_bytes(&env);
    let report = env.json(&["gc"]);
    assert_eq!(report["blobs_removed"], plan["blobs_removed"]);
    let du_after = disk_bytes(&env);
    assert!(
        du_before - du_after >= unique_bytes * 9 / 10,
        "du fell by {} bytes, the branch held {unique_bytes} unique blob bytes",
        du_before.saturating_sub(du_after)
    );
    for step in [20, 40, 60] {
        let out = env.checkout(&format!("main@{step}"), &format!("after-{step}"));
        assert_same_files(&fixture(step), &out);
    }
    env.cmd().arg("fsck").assert().success();
    // Nothing left to collect.
    assert_eq!(env.json(&["gc"])["blobs_removed"], 0);
}

#[test]
fn gc_keeps_lossy_history_bit_identical() {
    let env = Env::init_with(&["--policy", "balanced"]);
    forked(&env);
    for step in [20, 40, 60] {
        env.checkout(&format!("main@{step}"), &format!("before-{step}"));
    }
    env.cmd()
        .args(["branch", "--delete", "retry"])
        .assert()
        .success();
    env.cmd().arg("gc").assert().success();
    for step in [20, 40, 60] {
        let after = env.checkout(&format!("main@{step}"), &format!("after-{step}"));
        assert_same_files(&env.path(&format!("before-{step}")), &after);
    }
    env.cmd().arg("fsck").assert().success();
}

/// Commits the whole series with `policy`, tags step 60, prunes with
/// `prune_args`, and checks every kept commit bit for bit.
fn prune_case(policy: &str, prune_args: &[&str], expect_kept: &[u64]) {
    let env = Env::init_with(&["--policy", policy]);
    for step in STEPS {
        env.commit(&fixture(step), step);
    }
    env.cmd().args(["tag", "t60", "60"]).assert().success();
    for step in STEPS {
        env.checkout(&step.to_string(), &format!("before-{step}"));
    }
    let blob_bytes_before = env.json(&["stats"])["blob_bytes"].as_u64().unwrap();
    let dry: Value = env.json(&[&["prune", "--dry-run"], prune_args].concat());
    let report: Value = env.json(&[&["prune"], prune_args].concat());
    assert_eq!(dry["kept"], report["kept"]);
    let kept: Vec<u64> = report["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    assert_eq!(kept, expect_kept, "{prune_args:?}");
    for step in STEPS {
        if kept.contains(&step) {
            let after = env.checkout(&step.to_string(), &format!("after-{step}"));
            assert_same_files(&env.path(&format!("before-{step}")), &after);
        } else {
            env.cmd()
                .args(["checkout", &step.to_string(), "-o"])
                .arg(env.path(&format!("gone-{step}")))
                .assert()
                .failure();
        }
    }
    // Rebasing happens only where it is cheaper than keeping the bases.
    let blob_bytes_after = env.json(&["stats"])["blob_bytes"].as_u64().unwrap();
    assert!(
        blob_bytes_after <= blob_bytes_before,
        "{prune_args:?}: {blob_bytes_before} -> {blob_bytes_after}"
    );
    // The tag follows its rewritten commit.
    let tag = env.checkout("t60", "tag");
    assert_same_files(&env.path("before-60"), &tag);
    assert_eq!(
        env.json(&["log"]).as_array().unwrap().len(),
        kept.len(),
        "{prune_args:?}"
    );
    env.cmd().arg("fsck").assert().success();
}

#[test]
fn prune_keeps_checkouts_bit_identical() {
    prune_case(
        "balanced",
        &["--keep-last", "1", "--keep-every", "40"],
        &[40, 60, 80, 120],
    );
    prune_case("balanced", &["--keep-last", "2"], &[60, 100, 120]);
    prune_case(
        "lossless",
        &["--keep-last", "1", "--keep-every", "100"],
        &[60, 100, 120],
    );
    prune_case(
        "compact",
        &["--keep-last", "3", "--keep-every", "1000"],
        &[60, 80, 100, 120],
    );
}

#[test]
fn prune_keeps_what_other_branches_reach() {
    let env = Env::init_with(&["--policy", "balanced"]);
    forked(&env);
    let fork_point = id_of(&env, "main@40");
    let retry_80 = env.checkout("retry@80", "retry-before");
    env.cmd()
        .args(["prune", "--branch", "main", "--keep-last", "1"])
        .assert()
        .success();
    // main@20 and main@40 are retry's history: kept, not rewritten.
    assert_eq!(id_of(&env, "main@40"), fork_point);
    assert_eq!(id_of(&env, "retry@40"), fork_point);
    let after = env.checkout("retry@80", "retry-after");
    assert_same_files(&retry_80, &after);
    env.cmd().arg("fsck").assert().success();
}

#[test]
fn tags_list_resolve_and_delete() {
    let env = Env::init();
    env.commit(&fixture(20), 20);
    env.commit(&fixture(40), 40);
    env.cmd().args(["tag", "best", "20"]).assert().success();
    env.cmd()
        .args(["tag", "best", "40"])
        .assert()
        .failure()
        .stderr(contains("already exists"));
    assert_eq!(env.json(&["tag"])[0]["step"], 20);
    assert_same_files(&fixture(20), &env.checkout("best", "a"));
    env.cmd()
        .args(["tag", "--delete", "best"])
        .assert()
        .success();
    assert_eq!(env.json(&["tag"]).as_array().unwrap().len(), 0);
}

#[test]
fn diff_reports_per_tensor_changes() {
    let env = Env::init();
    env.commit(&fixture(20), 20);
    env.commit(&fixture(40), 40);
    let report = env.json(&["diff", "20", "40"]);
    let tensors = report["tensors"].as_array().unwrap();
    let weight = tensors
        .iter()
        .find(|t| t["tensor"] == "tok.weight")
        .expect("tok.weight");
    assert_eq!(weight["change"], "changed");
    assert!(weight["rel_l2"].as_f64().unwrap() > 0.0);
    assert!(weight["max_abs"].as_f64().unwrap() > 0.0);
    let same = env.json(&["diff", "40", "40"]);
    assert!(
        same["tensors"]
            .as_array()
            .unwrap()
            .iter()
            // rel_l2 is null for integer tensors.
            .all(|t| t["change"] == "same" && (t["rel_l2"] == 0.0 || t["rel_l2"].is_null()))
    );
}

#[test]
fn fsck_and_checkout_report_a_damaged_blob() {
    let env = Env::init();
    env.commit(&fixture(20), 20);
    env.commit(&fixture(40), 40);
    env.cmd().arg("fsck").assert().success();
    // Flip one byte in the middle of the largest RocksDB blob file.
    let db = env.repo().join("db");
    let blob_file = std::fs::read_dir(&db)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "blob"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .expect("a blob file");
    let mut bytes = std::fs::read(&blob_file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&blob_file, &bytes).unwrap();

    let out = env.cmd().args(["--json", "fsck"]).assert().failure();
    let report: Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    let problems = report["problems"].as_array().unwrap();
    let broken_blob = problems
        .iter()
        .find(|p| p["object"].as_str().unwrap().starts_with("blob "))
        .unwrap_or_else(|| panic!("no broken blob named: {report}"));
    let affected = broken_blob["affects"][0]
        .as_str()
        .expect("an affected commit");
    // "<short id> (main@<step>)": checking that commit out must fail.
    let rev = affected.split(['(', ')']).nth(1).unwrap().to_string();
    env.cmd()
        .args(["fsck"])
        .assert()
        .failure()
        .stdout(contains("BROKEN blob"))
        .stdout(contains("affects"));
    env.cmd()
        .args(["checkout", &rev, "-o"])
        .arg(env.path("out"))
        .assert()
        .failure()
        .stderr(contains("blob"));
    // The file with the failed blob is not written, not even partially.
    let left: Vec<_> = std::fs::read_dir(env.path("out"))
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(
        !left.iter().any(|n| n.to_string_lossy().contains("partial")),
        "{left:?}"
    );
}

#[test]
fn history_writers_take_the_lock_and_readers_do_not() {
    let env = Env::init();
    forked(&env);
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(env.repo().join("lock"))
        .unwrap();
    lock.lock().unwrap();
    for args in [
        &["gc"][..],
        &["prune", "--keep-last", "1"],
        &["branch", "x", "main"],
        &["branch", "--delete", "retry"],
        &["tag", "t", "main"],
        &["switch", "retry"],
    ] {
        env.cmd()
            .args(args)
            .assert()
            .failure()
            .stderr(contains("store is locked"));
    }
    // Readers work alongside a writer.
    for args in [
        &["log", "--graph"][..],
        &["branch"],
        &["diff", "main@60", "retry@60"],
        &["fsck"],
        &["gc", "--dry-run"],
        &["prune", "--keep-last", "1", "--dry-run"],
    ] {
        env.cmd().args(args).assert().success();
    }
    assert_same_files(&fixture(60), &env.checkout("main@60", "out"));
    lock.unlock().unwrap();
    env.cmd().arg("gc").assert().success();
}

#[test]
fn diff_names_added_removed_and_reshaped_tensors() {
    let env = Env::init();
    let write = |name: &str, header: &str, len: usize| {
        let dir = env.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("model.safetensors"),
            common::safetensors_bytes(header, len),
        )
        .unwrap();
        dir
    };
    let a = write(
        "a",
        r#"{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"y":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}}"#,
        24,
    );
    let b = write(
        "b",
        r#"{"x":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"z":{"dtype":"F32","shape":[3],"data_offsets":[16,28]}}"#,
        28,
    );
    env.commit(&a, 1);
    env.commit(&b, 2);
    let report = env.json(&["diff", "1", "2"]);
    let change = |name: &str| {
        report["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["tensor"] == name)
            .unwrap()["change"]
            .clone()
    };
    assert_eq!(change("x"), "reshaped");
    assert_eq!(change("y"), "removed");
    assert_eq!(change("z"), "added");
    assert_same_files(&b, &env.checkout("2", "out"));
}

/// Every writer's close flushes each column family into a table file; a long
/// history must not leave one file per commit behind (found with a store of
/// 441 commits holding 885 table files, each opened by every command).
#[test]
fn long_histories_keep_table_files_few() {
    let env = Env::init_with(&["--policy", "lossless"]);
    let dir = env.path("tiny");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("meta.json"), b"{}").unwrap();
    for step in 1..=60 {
        env.commit(&dir, step);
    }
    let tables = std::fs::read_dir(env.repo().join("db"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "sst")
        })
        .count();
    // At most 8 small files per column family (6 of them) before a close
    // compacts it, where one per commit and family would be hundreds.
    assert!(tables <= 6 * 9, "{tables} table files after 60 commits");
    let log = env.json(&["log"]);
    assert_eq!(log.as_array().unwrap().len(), 60);
}

/// A store written by the previous release (layout version 1, records of
/// version 2, in tests/data/store-v1) keeps reading, and its first writer
/// upgrades it to version 2 (pack index, compressed records).
#[test]
fn a_version_1_store_reads_and_is_upgraded_by_its_first_writer() {
    let env = Env::new();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/store-v1");
    copy_tree(&source, &env.repo());
    let format = || std::fs::read_to_string(env.repo().join("FORMAT")).unwrap();
    assert_eq!(format().trim(), "ckptvc-store 1");
    let log = env.json(&["log", "--all"]);
    assert_eq!(log.as_array().unwrap().len(), 3);
    let keyframe = env.checkout("main@20", "k20");
    assert_same_files(&fixture(20), &keyframe);
    let trainer = env.checkout("trainer@50", "t50");
    assert_same_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/trainer-run/checkpoint-10"),
        &trainer,
    );
    env.checkout("main@40", "l40");
    env.cmd().arg("fsck").assert().success();
    assert_eq!(format().trim(), "ckptvc-store 1", "reading changes nothing");
    env.commit_on("main", &fixture(60), 60);
    assert_eq!(format().trim(), "ckptvc-store 2");
    assert_eq!(env.json(&["log"]).as_array().unwrap().len(), 3);
    let again = env.checkout("main@20", "k20-again");
    assert_same_files(&fixture(20), &again);
    env.cmd().arg("fsck").assert().success();
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}
