//! Distributed checkpoints through the real binary: PyTorch DCP and DeepSpeed
//! ZeRO folders in and out (fixtures made by `fixtures/make_dcp.py` and
//! `fixtures/make_zero.py`), and many ranks committing one step
//! (`--shard K/N`), with a rank killed mid-commit. Where torch or DeepSpeed
//! is installed, the lossy checkouts are loaded by them and resumed;
//! elsewhere those parts print "skipped".

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use common::{Env, assert_same_files, file_digests};
use serde_json::Value;

fn fixtures(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

const DCP_STEPS: [u64; 3] = [2, 4, 6];

fn dcp(step: u64) -> PathBuf {
    fixtures(&format!("dcp/step-{step:06}"))
}

fn zero(stage: u32, step: u64) -> PathBuf {
    fixtures(&format!("zero{stage}/global_step{step}"))
}

/// Whether `python3` can import `module`; prints "skipped" when not.
fn python_has(module: &str, test: &str) -> bool {
    let ok = Process::new("python3")
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!("skipped: {test} needs python3 with {module}");
    }
    ok
}

/// Runs a fixture script (with `torchrun` for `ranks` > 1) and returns
/// the JSON line it prints last.
fn run_script(ranks: u32, script: &str, args: &[&str]) -> Value {
    let script = fixtures(script);
    let mut cmd = if ranks > 1 {
        let mut c = Process::new("torchrun");
        c.arg(format!("--nproc-per-node={ranks}"))
            .arg("--master-port")
            .arg(free_port().to_string());
        c.arg(&script);
        c
    } else {
        let mut c = Process::new("python3");
        c.arg(&script);
        c
    };
    let out = cmd.args(args).output().expect("run the fixture script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| {
            panic!(
                "{} printed no JSON: {stdout}\n{}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let value: Value = serde_json::from_str(line).unwrap();
    assert!(
        out.status.success() && value["ok"] == true,
        "{} {args:?} failed: {line}\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    value
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn entries(env: &Env, rev: &str) -> Vec<Value> {
    env.json(&["show", rev])["entries"]
        .as_array()
        .unwrap()
        .clone()
}

fn entry<'a>(entries: &'a [Value], tensor: &str) -> &'a Value {
    entries
        .iter()
        .find(|e| e["tensor"] == tensor)
        .unwrap_or_else(|| panic!("no tensor `{tensor}` in show"))
}

#[test]
fn dcp_steps_round_trip_byte_for_byte() {
    let env = Env::init();
    for step in DCP_STEPS {
        let out = env.commit_json(&dcp(step), step);
        let notes = out["notes"].to_string();
        assert!(
            notes.contains("24 of 24 Adam moment chunks paired"),
            "{notes}"
        );
    }
    for step in DCP_STEPS {
        let out = env.checkout(&step.to_string(), &format!("out{step}"));
        assert_same_files(&dcp(step), &out);
    }
    let shown = entries(&env, "6");
    // Each rank's chunk is a tensor named by its place in the parameter.
    let chunk = entry(&shown, "model.fc1.weight[128:255,0:64]");
    assert_eq!(chunk["file"], "__1_0.distcp");
    assert_eq!(chunk["shape"], serde_json::json!([127, 64]));
    entry(&shown, "optim.state.fc1.weight.exp_avg[0:128,0:64]");
}

#[test]
fn dcp_lossy_checkouts_load_into_other_world_sizes() {
    let env = Env::init_with(&["--policy", "balanced"]);
    for step in DCP_STEPS {
        env.commit(&dcp(step), step);
    }
    let shown = entries(&env, "6");
    for name in [
        "model.fc1.weight[0:128,0:64]",
        "optim.state.fc1.weight.exp_avg[0:128,0:64]",
        "optim.state.fc1.weight.exp_avg_sq[128:255,0:64]",
    ] {
        let e = entry(&shown, name);
        assert!(
            e["codecs"].to_string().contains("quant"),
            "{name} is coded losslessly: {e}"
        );
        assert!(e["rel_error"].as_f64().unwrap() > 0.0, "{e}");
    }
    let w_error = env.json(&["show", "6"])["error_w"].as_f64().unwrap();
    assert!(w_error > 0.0 && w_error < 0.02, "W error {w_error}");
    let out = env.checkout("6", "lossy6");
    // The layout is DCP's: same files, same sizes, metadata untouched.
    let original = file_digests(&dcp(6));
    let written = file_digests(&out);
    assert_eq!(
        original.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        written.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    assert_eq!(
        std::fs::read(out.join(".metadata")).unwrap(),
        std::fs::read(dcp(6).join(".metadata")).unwrap()
    );
    for file in ["__0_0.distcp", "__1_0.distcp"] {
        assert_eq!(
            std::fs::metadata(out.join(file)).unwrap().len(),
            std::fs::metadata(dcp(6).join(file)).unwrap().len()
        );
    }
    if !python_has("torch", "dcp_lossy_checkouts_load_into_other_world_sizes") {
        return;
    }
    let ckpt = out.to_str().unwrap();
    let original = dcp(6);
    let compare = original.to_str().unwrap();
    // DCP reshards on load: the 2-rank checkpoint into 1, 2 and 4 ranks.
    for world in [1, 2, 4] {
        let loaded = run_script(
            world,
            "dcp_load.py",
            &["--ckpt", ckpt, "--compare", compare, "--tol", "1"],
        );
        assert_eq!(loaded["world"], world);
        let drift = loaded["max_rel_l2_model"].as_f64().unwrap();
        assert!(drift > 0.0 && drift < 0.05, "world {world}: {loaded}");
    }
}

#[test]
fn zero_checkpoints_round_trip_with_partitions_cut_into_parameters() {
    for stage in [1, 2, 3] {
        let env = Env::init();
        for step in [2, 4, 6] {
            env.commit(&zero(stage, step), step);
        }
        for step in [2, 4, 6] {
            let out = env.checkout(&step.to_string(), &format!("z{stage}-{step}"));
            assert_same_files(&zero(stage, step), &out);
        }
        let shown = entries(&env, "6");
        let names: Vec<&str> = shown.iter().filter_map(|e| e["tensor"].as_str()).collect();
        // Each piece of master weight comes with its two moments.
        let weights: Vec<&str> = names
            .iter()
            .copied()
            .filter(|t| t.contains("weight[") && t.ends_with(']'))
            .collect();
        assert!(weights.len() >= 3, "stage {stage}: {names:?}");
        for w in weights {
            for moment in ["exp_avg", "exp_avg_sq"] {
                assert!(names.contains(&format!("{w}.{moment}").as_str()), "{w}");
            }
        }
    }
}

#[test]
fn zero_lossy_checkouts_resume_in_deepspeed() {
    for stage in [1u32, 2, 3] {
        let env = Env::init_with(&["--policy", "balanced"]);
        for step in [2, 4, 6] {
            env.commit(&zero(stage, step), step);
        }
        let shown = entries(&env, "4");
        let lossy = shown
            .iter()
            .filter(|e| e["tensor"].as_str().is_some_and(|t| t.contains("weight[")))
            .filter(|e| e["codecs"].to_string().contains("quant"))
            .count();
        assert!(
            lossy >= 3,
            "stage {stage}: master weights and moments are lossy"
        );
        let run = env.path(&format!("run{stage}"));
        env.cmd()
            .args(["checkout", "4", "--output"])
            .arg(run.join("global_step4"))
            .assert()
            .success();
        if !python_has("deepspeed", "zero_lossy_checkouts_resume_in_deepspeed") {
            return;
        }
        let resumed = run_script(
            2,
            "zero_resume.py",
            &[
                "--stage",
                &stage.to_string(),
                "--ckpt",
                run.to_str().unwrap(),
                "--tag",
                "global_step4",
                "--compare",
                fixtures(&format!("zero{stage}")).to_str().unwrap(),
                "--compare-tag",
                "global_step4",
            ],
        );
        println!("stage {stage}: {resumed}");
    }
}

/// A synthetic step of `ranks` ranks: `rank<K>.safetensors` of `floats`
/// f32 values each (a different walk per step), plus `meta.json`.
fn synthetic_step(dir: &Path, ranks: u32, step: u64, floats: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for rank in 0..ranks {
        let header = format!(
            r#"{{"w":{{"dtype":"F32","shape":[{floats}],"data_offsets":[0,{}]}}}}"#,
            floats * 4
        );
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (u64::from(rank) << 32);
        for i in 0..floats {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let noise = ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
            let value = noise + (i % 97) as f32 * 1e-3 + step as f32 * 1e-4;
            bytes.extend_from_slice(&value.to_le_bytes());
        }
        std::fs::write(dir.join(format!("rank{rank}.safetensors")), bytes).unwrap();
    }
    std::fs::write(dir.join("meta.json"), format!("{{\"step\": {step}}}")).unwrap();
}

fn shard_command(env: &Env, dir: &Path, step: u64, rank: u32, ranks: u32) -> Process {
    let mut cmd = Process::new(env!("CARGO_BIN_EXE_ckptvc"));
    cmd.arg("--repo")
        .arg(env.repo())
        .args(["--quiet", "--wait", "60", "commit", "--step"])
        .arg(step.to_string())
        .arg("--shard")
        .arg(format!("{rank}/{ranks}"))
        .arg(dir)
        .env_remove("CKPTVC_REPO")
        .env_remove("TORCHELASTIC_RUN_ID")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Runs a shard's commit to its end; it must succeed.
fn run_shard(command: &mut Process) {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until rank `rank` has begun staging blobs, then kills it.
fn kill_mid_commit(env: &Env, child: &mut std::process::Child, rank: u32) -> bool {
    let pending = env.repo().join("pending");
    let prefix = format!("tmp-{rank}-{}-", child.id());
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let staging = std::fs::read_dir(&pending)
            .into_iter()
            .flatten()
            .flatten()
            .any(|d| {
                std::fs::read_dir(d.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            });
        if staging {
            child.kill().unwrap();
            child.wait().unwrap();
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("rank {rank} never started staging");
}

fn visible_steps(env: &Env) -> Vec<u64> {
    env.json(&["log"])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["step"].as_u64().unwrap())
        .collect()
}

#[test]
fn four_ranks_commit_each_step_with_one_killed_in_some_rounds() {
    const RANKS: u32 = 4;
    let env = Env::init();
    for (round, step) in [10u64, 20, 30, 40, 50].into_iter().enumerate() {
        let dir = env.path(&format!("step{step}"));
        synthetic_step(&dir, RANKS, step, 1 << 20);
        let mut children: Vec<_> = (0..RANKS)
            .map(|rank| {
                shard_command(&env, &dir, step, rank, RANKS)
                    .spawn()
                    .unwrap()
            })
            .collect();
        let victim = (round % 2 == 1).then_some(round as u32 % RANKS);
        let mut killed = false;
        if let Some(rank) = victim {
            killed = kill_mid_commit(&env, &mut children[rank as usize], rank);
        }
        for (rank, child) in children.into_iter().enumerate() {
            let out = child.wait_with_output().unwrap();
            if Some(rank as u32) != victim {
                assert!(
                    out.status.success(),
                    "rank {rank}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        if killed {
            // Three shards are in, one never arrived: the step is invisible.
            assert!(!visible_steps(&env).contains(&step), "round {round}");
            let pending = env.json(&["status"]);
            assert_eq!(pending[0]["step"], step);
            assert_eq!(pending[0]["arrived"].as_array().unwrap().len(), 3);
            // The rank is restarted and seals the step.
            let rank = victim.unwrap();
            run_shard(&mut shard_command(&env, &dir, step, rank, RANKS));
        }
        assert!(visible_steps(&env).contains(&step), "round {round}");
        assert_eq!(env.json(&["status"]), serde_json::json!([]));
        let out = env.checkout(&step.to_string(), &format!("out{step}"));
        assert_same_files(&dir, &out);
        env.cmd().arg("fsck").assert().success();
    }
    // One rank's files only.
    let only = env.path("rank2");
    env.cmd()
        .args(["checkout", "50", "--shard", "2/4", "--output"])
        .arg(&only)
        .assert()
        .success();
    let names: Vec<String> = file_digests(&only).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["rank2.safetensors"]);
}

#[test]
fn an_abandoned_step_stays_invisible_until_gc_removes_it() {
    let env = Env::init();
    let dir = env.path("step");
    synthetic_step(&dir, 3, 7, 4096);
    for rank in 0..2 {
        run_shard(&mut shard_command(&env, &dir, 7, rank, 3));
    }
    assert_eq!(visible_steps(&env), Vec::<u64>::new());
    assert_eq!(
        env.json(&["status"])[0]["arrived"],
        serde_json::json!([0, 1])
    );
    let dry = env.json(&["gc", "--dry-run"]);
    assert_eq!(dry["leftovers_removed"], 0, "inside the grace period");
    let gc = env.json(&["gc", "--grace", "0"]);
    assert_eq!(gc["leftovers_removed"], 1);
    assert_eq!(env.json(&["status"]), serde_json::json!([]));
    assert!(!env.repo().join("pending").read_dir().unwrap().any(|_| true));
}

/// (file, tensor, update error) of every tensor of `show` that has one.
fn update_errors(show: &Value) -> Vec<(String, String, f64)> {
    show["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            let error = e["update_error"].as_f64()?;
            Some((e["file"].to_string(), e["tensor"].to_string(), error))
        })
        .collect()
}

#[test]
fn sealed_lossy_steps_record_the_update_errors_one_process_records() {
    let one = Env::init_with(&["--policy", "balanced"]);
    let sharded = Env::init_with(&["--policy", "balanced"]);
    for step in DCP_STEPS {
        one.commit(&dcp(step), step);
        for rank in 0..2 {
            run_shard(&mut shard_command(&sharded, &dcp(step), step, rank, 2));
        }
    }
    let (a, b) = (one.json(&["show", "6"]), sharded.json(&["show", "6"]));
    let per_tensor = update_errors(&a);
    // W, m and v of fc1, fc2 and the head on both ranks, at least.
    assert!(per_tensor.len() >= 12, "{per_tensor:?}");
    assert_eq!(per_tensor, update_errors(&b));
    for key in ["m", "v", "both"] {
        let (x, y) = (
            a["update_error"][key].as_f64().unwrap(),
            b["update_error"][key].as_f64().unwrap(),
        );
        assert!(x > 0.0 && (x - y).abs() <= 1e-6 * x, "{key}: {x} vs {y}");
    }
    assert_eq!(one.json(&["show", "2"])["update_error"], Value::Null);
}

#[test]
fn dcp_ranks_seal_one_step_in_a_bucket() {
    let tmp = tempfile::tempdir().unwrap();
    let mut urls = vec![format!("file://{}/bucket", tmp.path().display())];
    urls.extend(common::s3_url("dcp-shards"));
    for url in urls {
        let at = |args: &[&str]| {
            let out = Process::new(env!("CARGO_BIN_EXE_ckptvc"))
                .arg("--repo")
                .arg(&url)
                .args(args)
                .env_remove("CKPTVC_REPO")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{url} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        };
        at(&["init", "--policy", "lossless"]);
        for step in DCP_STEPS {
            // Both ranks at once, as on two machines.
            let children: Vec<_> = (0..2)
                .map(|rank| {
                    Process::new(env!("CARGO_BIN_EXE_ckptvc"))
                        .arg("--repo")
                        .arg(&url)
                        .args(["--quiet", "commit", "--step", &step.to_string()])
                        .args(["--shard", &format!("{rank}/2")])
                        .arg(dcp(step))
                        .env_remove("CKPTVC_REPO")
                        .stderr(Stdio::piped())
                        .spawn()
                        .unwrap()
                })
                .collect();
            for child in children {
                let out = child.wait_with_output().unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let log: Value = serde_json::from_slice(&at(&["--json", "log"])).unwrap();
        assert_eq!(log.as_array().unwrap().len(), 3, "{url}");
        let out = tmp.path().join(format!("out-{}", url.len()));
        at(&["checkout", "6", "--output", out.to_str().unwrap()]);
        assert_same_files(&dcp(6), &out);
        let pending: Value = serde_json::from_slice(&at(&["--json", "status"])).unwrap();
        assert_eq!(pending, serde_json::json!([]), "{url}");
        at(&["fsck"]);
    }
}

#[test]
fn shards_that_do_not_fit_are_refused_and_the_store_is_unchanged() {
    let env = Env::init();
    let before = env.snapshot();
    env.cmd()
        .args(["commit", "--step", "1", "--shard", "4/4"])
        .arg(dcp(2))
        .assert()
        .failure()
        .stderr(predicates::str::contains("not a shard"));
    env.cmd()
        .args(["commit", "--step", "1", "--shard", "0/1"])
        .arg(dcp(2))
        .assert()
        .failure()
        .stderr(predicates::str::contains(
            "__1_0.distcp: belongs to rank 1, but the step has 1 shards",
        ));
    assert_eq!(before, env.snapshot());
    assert!(!env.repo().join("pending").exists());
}

#[test]
fn gc_gives_back_the_space_of_dead_packs() {
    let env = Env::init();
    let step = env.path("step");
    synthetic_step(&step, 2, 1, 1 << 18);
    let single = env.path("single");
    std::fs::create_dir_all(&single).unwrap();
    std::fs::write(single.join("notes.txt"), "main only").unwrap();
    env.commit(&single, 1);
    // tmp: both ranks' shards of a step (a new branch, so a root commit).
    for rank in 0..2 {
        run_shard(shard_command(&env, &step, 5, rank, 2).args(["--branch", "tmp"]));
    }
    let packs = || std::fs::read_dir(env.repo().join("packs")).unwrap().count();
    assert_eq!(packs(), 2, "each rank staged a pack");
    // main takes rank 0's file: its blobs are found in rank 0's pack.
    std::fs::copy(
        step.join("rank0.safetensors"),
        single.join("rank0.safetensors"),
    )
    .unwrap();
    env.commit_on("main", &single, 2);
    env.cmd().args(["switch", "main"]).assert().success();
    env.cmd().args(["branch", "-d", "tmp"]).assert().success();
    let before = env.json(&["stats"])["physical_bytes"].as_u64().unwrap();
    let gc = env.json(&["gc", "--grace", "0"]);
    assert!(gc["blobs_removed"].as_u64().unwrap() > 0, "{gc}");
    // Rank 1's pack was all dead and is deleted; rank 0's still held
    // main's blobs beside a dead one (meta.json), so those moved into the
    // database before it was deleted.
    assert_eq!(packs(), 0);
    let after = env.json(&["stats"])["physical_bytes"].as_u64().unwrap();
    assert!(after < before, "{before} -> {after}");
    let out = env.checkout("main@2", "main2");
    assert_same_files(&single, &out);
    env.cmd().arg("fsck").assert().success();
}

/// Accelerate's FSDP layout: the model and the optimizer in two DCP
/// folders of one checkpoint; moments pair with weights across them.
#[test]
fn accelerate_checkpoints_pair_across_their_two_dcp_folders() {
    let checkpoint = |step: u64| fixtures(&format!("dcp-accelerate/checkpoint-{step}"));
    let lossless = Env::init();
    let lossy = Env::init_with(&["--policy", "balanced"]);
    for step in [2, 4] {
        let out = lossless.commit_json(&checkpoint(step), step);
        assert!(
            out["notes"]
                .to_string()
                .contains("24 of 24 Adam moment chunks paired"),
            "{}",
            out["notes"]
        );
        lossy.commit(&checkpoint(step), step);
    }
    let out = lossless.checkout("4", "out4");
    assert_same_files(&checkpoint(4), &out);
    let shown = entries(&lossy, "4");
    for name in [
        "model.fc1.weight[0:128,0:64]",
        "optimizer.state.fc1.weight.exp_avg[0:128,0:64]",
        "optimizer.state.fc1.weight.exp_avg_sq[128:255,0:64]",
    ] {
        let e = entry(&shown, name);
        assert!(e["codecs"].to_string().contains("quant"), "{name}: {e}");
    }
}

/// Files in memory: (file name, [(tensor name, f32 bytes of 64 × 64)]).
type RankFiles = Vec<(String, Vec<(String, Vec<u8>)>)>;

/// Rank `rank`'s part of a step in memory, as the Python package gives it:
/// `rankK/model.safetensors` and `rankK/optimizer.safetensors`.
fn rank_state(rank: u32, step: u64) -> RankFiles {
    let floats = |salt: u64, scale: f32| -> Vec<u8> {
        (0..4096u64)
            .flat_map(|i| {
                let x = ((i * 2654435761 + salt * 97 + u64::from(rank) * 7919) % 1000) as f32;
                (x * scale).to_le_bytes()
            })
            .collect()
    };
    vec![
        (
            format!("rank{rank}/model.safetensors"),
            vec![("w".into(), floats(step, 1e-3))],
        ),
        (
            format!("rank{rank}/optimizer.safetensors"),
            vec![
                ("w.exp_avg".into(), floats(step + 1, 1e-6)),
                ("w.exp_avg_sq".into(), floats(step + 2, 1e-9)),
            ],
        ),
    ]
}

fn commit_rank_from_memory(
    env: &Env,
    files: &RankFiles,
    step: u64,
    shard: &str,
) -> anyhow::Result<ckptvc::repo::commit::ShardOutcome> {
    use ckptvc::format::{MemoryCheckpoint, MemoryFile, MemoryTensor};
    use ckptvc::repo::{CommitOptions, NoProgress, Repo};
    let memory = files
        .iter()
        .map(|(name, tensors)| MemoryFile::Tensors {
            name: name.clone(),
            tensors: tensors
                .iter()
                .map(|(n, bytes)| MemoryTensor {
                    name: n.clone(),
                    dtype: "F32".into(),
                    shape: vec![64, 64],
                    data: bytes,
                })
                .collect(),
        })
        .collect();
    let checkpoint = MemoryCheckpoint::new(memory)?;
    let options = CommitOptions {
        step,
        ..CommitOptions::default()
    };
    let repo = Repo::open(env.repo())?;
    ckptvc::repo::commit::commit_shard(
        &repo,
        &checkpoint,
        &options,
        shard.parse().map_err(anyhow::Error::msg)?,
        "",
        &NoProgress,
    )
}

/// Ranks commit their parts of a step from memory (the library call the
/// Python package makes); a rank given another rank's files is refused and
/// the store is left as it was.
#[test]
fn ranks_commit_their_parts_from_memory_and_no_other_ranks() {
    let env = Env::init_with(&["--policy", "balanced"]);
    for step in [10, 20, 30] {
        let first = commit_rank_from_memory(&env, &rank_state(1, step), step, "1/2").unwrap();
        assert!(first.sealed.is_none());
        let last = commit_rank_from_memory(&env, &rank_state(0, step), step, "0/2").unwrap();
        for shard in [&first, &last] {
            assert_eq!(shard.keyframe, step == 10);
            // Each rank's bases come from its own cache, which the next
            // step overwrites in place (and reads first).
            if step > 10 {
                assert!(shard.bases_from_cache > 0, "step {step}");
                assert_eq!(shard.bases_decoded, 0, "step {step}");
            }
        }
        assert_eq!(last.sealed.expect("sealed").entry.step, step);
    }
    assert_eq!(visible_steps(&env), vec![30, 20, 10]);
    // Overwritten in place, not a new file beside a spare.
    for shard in ["0-of-2", "1-of-2"] {
        let tips = env.repo().join("cache/shards").join(shard).join("tips");
        let names: Vec<_> = std::fs::read_dir(&tips)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{shard}: {names:?}");
    }
    env.cmd().arg("fsck").assert().success();
    let show = env.json(&["show", "30"]);
    let lossy: Vec<&Value> = show["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["codecs"][0].as_str().unwrap().starts_with("quant"))
        .collect();
    assert_eq!(
        lossy.len(),
        6,
        "W, m and v of both ranks coded lossily: {show}"
    );

    let before = env.snapshot();
    let err = commit_rank_from_memory(&env, &rank_state(1, 30), 30, "0/2").unwrap_err();
    assert!(
        err.to_string()
            .contains("rank1/model.safetensors: belongs to rank 1, not to shard 0/2"),
        "{err:#}"
    );
    assert_eq!(before, env.snapshot());
}
