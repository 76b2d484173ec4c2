//! Hugging Face Trainer runs: `import`, `watch`, torch `optimizer.pt` in and
//! out, and the pairing of optimizer state with parameters, on the real
//! Trainer output in fixtures/trainer-run (made by make_trainer_run.py).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ckptvc::format::safetensors::parse_header;
use ckptvc::format::torch;
use common::{Env, assert_same_files, copy_dir};
use serde_json::Value;

const STEPS: [u64; 3] = [10, 20, 30];

fn run_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/trainer-run")
}

fn checkpoint(step: u64) -> PathBuf {
    run_dir().join(format!("checkpoint-{step}"))
}

/// Every f32 tensor of a safetensors or torch file, by name.
fn tensors(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let (infos, base) = if path.extension().is_some_and(|e| e == "safetensors") {
        let header = parse_header(path, &bytes).unwrap();
        (header.tensors.clone(), header.data_start())
    } else {
        (torch::parse(&bytes).unwrap().tensors, 0)
    };
    infos
        .iter()
        .filter(|t| t.dtype == safetensors::Dtype::F32)
        .map(|t| {
            let data = &bytes[(base + t.begin) as usize..(base + t.end) as usize];
            let values = data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (t.name.clone(), values)
        })
        .collect()
}

/// Whether `python3` can import `modules` (comma-separated); says "skipped"
/// when it cannot, so a test that needs torch passes visibly without it.
fn python_has(modules: &str) -> bool {
    let probe = std::process::Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output();
    let ok = probe.is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipped: python3 cannot import {modules}");
    }
    ok
}

/// Runs a Python `script` with `args`, fails the test with its output if it
/// fails, and returns its stdout.
fn python(script: &str, args: &[&std::ffi::OsStr]) -> String {
    let run = std::process::Command::new("python3")
        .args(["-c", script])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    stdout
}

fn rel_error(a: &[f32], b: &[f32]) -> f64 {
    let (mut err, mut norm) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        err += (f64::from(x) - f64::from(y)).powi(2);
        norm += f64::from(y).powi(2);
    }
    if norm == 0.0 {
        err.sqrt()
    } else {
        (err / norm).sqrt()
    }
}

/// Every zip record's CRC-32 matches its data, as torch checks on load.
fn assert_crcs_valid(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    for r in torch::zip::records(&bytes).unwrap() {
        let data = &bytes[r.data_start as usize..r.data_end() as usize];
        assert_eq!(
            crc32fast::hash(data),
            r.crc,
            "{}: {}",
            path.display(),
            r.name
        );
    }
}

#[test]
fn a_lossless_import_checks_out_byte_for_byte() {
    let env = Env::init();
    let report = env.json(&["import", run_dir().to_str().unwrap()]);
    let steps: Vec<u64> = report["imported"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, STEPS);
    assert!(report["stored_bytes"].as_u64().unwrap() < report["input_bytes"].as_u64().unwrap());
    for step in STEPS {
        let out = env.checkout(&step.to_string(), &format!("out-{step}"));
        assert_same_files(&checkpoint(step), &out);
    }
    // The optimizer is read as tensors, not kept as one opaque blob.
    let show = env.json(&["show", "30"]);
    let optimizer_tensors = show["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["file"] == "optimizer.pt" && e["tensor"].is_string())
        .count();
    assert_eq!(
        optimizer_tensors,
        28 * 3,
        "step, exp_avg, exp_avg_sq per parameter"
    );
    // Importing again adds nothing.
    let again = env.json(&["import", run_dir().to_str().unwrap()]);
    assert_eq!(again["imported"].as_array().unwrap().len(), 0);
    assert_eq!(again["skipped"], serde_json::json!(STEPS));
}

#[test]
fn a_lossy_import_resumes_within_the_reported_error() {
    let env = Env::init_with(&["--policy", "balanced"]);
    env.cmd().args(["import"]).arg(run_dir()).assert().success();
    let out = env.checkout("30", "out");
    let show = env.json(&["show", "30"]);
    let reported: BTreeMap<(String, String), f64> = show["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["tensor"].is_string())
        .map(|e| {
            let key = (
                e["file"].as_str().unwrap().to_string(),
                e["tensor"].as_str().unwrap().to_string(),
            );
            (key, e["rel_error"].as_f64().unwrap())
        })
        .collect();
    let mut lossy = 0;
    for file in ["model.safetensors", "optimizer.pt"] {
        let original = tensors(&checkpoint(30).join(file));
        let restored = tensors(&out.join(file));
        assert_eq!(
            original.keys().collect::<Vec<_>>(),
            restored.keys().collect::<Vec<_>>()
        );
        for (name, values) in &original {
            let err = rel_error(&restored[name], values);
            let said = reported[&(file.to_string(), name.clone())];
            assert!(
                err <= said * 1.001 + 1e-7,
                "{file} {name}: error {err} but show says {said}"
            );
            lossy += usize::from(said > 0.0);
        }
    }
    assert!(lossy >= 10, "only {lossy} tensors were coded lossily");
    assert_crcs_valid(&out.join("optimizer.pt"));
    // Every other file is as the Trainer wrote it.
    for name in [
        "trainer_state.json",
        "scheduler.pt",
        "rng_state.pth",
        "training_args.bin",
    ] {
        assert_eq!(
            std::fs::read(out.join(name)).unwrap(),
            std::fs::read(checkpoint(30).join(name)).unwrap(),
            "{name}"
        );
    }
}

fn pairing(env: &Env, rev: &str) -> Value {
    env.json(&["show", rev])["pairings"][0].clone()
}

#[test]
fn optimizer_state_is_paired_only_where_it_is_certain() {
    let env = Env::init_with(&["--policy", "balanced"]);
    // With the names file the Python callback writes: every parameter.
    env.commit(&checkpoint(10), 10);
    env.commit(&checkpoint(20), 20);
    let named = pairing(&env, "20");
    assert_eq!(named["rule"], "names file");
    assert_eq!(named["paired"].as_array().unwrap().len(), 28);
    assert_eq!(
        named["paired"][4]["name"],
        "transformer.h.0.mlp.c_fc.weight"
    );

    // As the Trainer alone writes it: only shapes no other parameter has.
    let bare = env.path("bare-30");
    copy_dir(&checkpoint(30), &bare);
    std::fs::remove_file(bare.join("ckptvc-params.json")).unwrap();
    env.commit(&bare, 30);
    let shapes = pairing(&env, "30");
    assert_eq!(shapes["rule"], "unique shapes (Trainer folder)");
    let mut paired: Vec<&str> = shapes["paired"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    paired.sort();
    assert_eq!(paired, ["transformer.wpe.weight", "transformer.wte.weight"]);
    assert_eq!(shapes["unpaired"].as_array().unwrap().len(), 26);

    // Outside a Trainer folder shapes prove nothing.
    let plain = env.path("plain-40");
    copy_dir(&bare, &plain);
    std::fs::remove_file(plain.join("trainer_state.json")).unwrap();
    env.commit(&plain, 40);
    let none = pairing(&env, "40");
    assert_eq!(none["paired"].as_array().unwrap().len(), 0);

    // A names file that disagrees with the shapes is not trusted at all.
    let lying = env.path("lying-50");
    copy_dir(&checkpoint(30), &lying);
    let names = std::fs::read_to_string(lying.join("ckptvc-params.json")).unwrap();
    let swapped = names
        .replacen("transformer.wte.weight", "SWAP", 1)
        .replacen(
            "transformer.h.0.attn.c_attn.weight",
            "transformer.wte.weight",
            1,
        )
        .replacen("SWAP", "transformer.h.0.attn.c_attn.weight", 1);
    std::fs::write(lying.join("ckptvc-params.json"), swapped).unwrap();
    let out = env.json(&["commit", "--step", "50", lying.to_str().unwrap()]);
    let notes = out["notes"].to_string();
    assert!(notes.contains("ckptvc-params.json not used"), "{notes}");
    assert_eq!(
        pairing(&env, "50")["rule"],
        "unique shapes (Trainer folder)"
    );
}

#[test]
fn a_torch_file_that_cannot_be_read_is_kept_as_bytes_with_a_note() {
    let env = Env::init();
    let dir = env.path("ckpt");
    copy_dir(&checkpoint(10), &dir);
    // A zip whose pickle is cut short: valid bytes, not a loadable file.
    let mut bytes = std::fs::read(dir.join("optimizer.pt")).unwrap();
    let pkl = torch::zip::records(&bytes).unwrap()[0].clone();
    bytes[pkl.data_start as usize + 2] = b'i';
    std::fs::write(dir.join("optimizer.pt"), &bytes).unwrap();
    let out = env.json(&["commit", "--step", "10", dir.to_str().unwrap()]);
    let notes = out["notes"].to_string();
    assert!(
        notes.contains("optimizer.pt: kept as opaque bytes") && notes.contains("not supported"),
        "{notes}"
    );
    let back = env.checkout("10", "out");
    assert_same_files(&dir, &back);
}

#[test]
fn watch_imports_complete_folders_and_deletes_verified_ones() {
    let env = Env::init();
    let run = env.path("run");
    std::fs::create_dir(&run).unwrap();
    let watch = std::process::Command::new(assert_cmd::cargo::cargo_bin("ckptvc"))
        .arg("--repo")
        .arg(env.repo())
        .args([
            "--json",
            "watch",
            "--interval",
            "0.2",
            "--idle-exit",
            "4",
            "--delete-imported",
        ])
        .arg(&run)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for step in STEPS {
        // The Trainer writes trainer_state.json last; until then the folder
        // must be left alone.
        let dir = run.join(format!("checkpoint-{step}"));
        copy_dir(&checkpoint(step), &dir);
        std::fs::remove_file(dir.join("trainer_state.json")).unwrap();
        std::thread::sleep(Duration::from_millis(700));
        assert!(dir.exists(), "step {step} was taken before it was complete");
        std::fs::copy(
            checkpoint(step).join("trainer_state.json"),
            dir.join("trainer_state.json"),
        )
        .unwrap();
    }
    let out = watch.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let committed: Vec<u64> = events
        .iter()
        .filter(|e| e["event"] == "committed")
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(committed, STEPS);
    assert_eq!(events.iter().filter(|e| e["event"] == "deleted").count(), 3);
    assert_eq!(
        std::fs::read_dir(&run).unwrap().count(),
        0,
        "originals deleted"
    );
    for step in STEPS {
        let out = env.checkout(&step.to_string(), &format!("out-{step}"));
        assert_same_files(&checkpoint(step), &out);
    }
}

/// torch itself loads the checked-out optimizer.pt (weights_only=True, as
/// the Trainer does on resume) and finds the moments within the error
/// `show` reports. Runs only where torch is installed.
#[test]
fn torch_loads_the_checked_out_optimizer() {
    if !python_has("torch") {
        return;
    }
    let env = Env::init_with(&["--policy", "balanced"]);
    env.cmd().arg("import").arg(run_dir()).assert().success();
    let out = env.checkout("30", "out");
    let show = env.json(&["show", "30"]);
    let errors: BTreeMap<String, f64> = show["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["file"] == "optimizer.pt" && e["tensor"].is_string())
        .map(|e| {
            (
                e["tensor"].as_str().unwrap().into(),
                e["rel_error"].as_f64().unwrap(),
            )
        })
        .collect();
    std::fs::write(
        env.path("errors.json"),
        serde_json::to_string(&errors).unwrap(),
    )
    .unwrap();
    let script = r#"
import json, sys, torch
restored = torch.load(sys.argv[1], weights_only=True)
original = torch.load(sys.argv[2], weights_only=True)
errors = json.load(open(sys.argv[3]))
assert restored["param_groups"] == original["param_groups"]
assert restored["state"].keys() == original["state"].keys()
lossy = 0
for i, entries in original["state"].items():
    for key, want in entries.items():
        got = restored["state"][i][key]
        assert got.shape == want.shape and got.dtype == want.dtype, (i, key)
        err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
        said = errors[f"state.{i}.{key}"]
        assert err <= said * 1.001 + 1e-7, (i, key, err, said)
        lossy += said > 0
assert lossy >= 4, lossy
print("ok", lossy)
"#;
    python(
        script,
        &[
            out.join("optimizer.pt").as_ref(),
            checkpoint(30).join("optimizer.pt").as_ref(),
            env.path("errors.json").as_ref(),
        ],
    );
}

/// `python/ckptvc_torch.py`: save → commit → checkout → load gives back the
/// model and optimizer exactly (lossless store), and a training step after
/// the load matches one after the original. Runs only where torch is installed.
#[test]
fn the_python_helper_saves_commits_and_loads_back() {
    if !python_has("torch, safetensors") {
        return;
    }
    let env = Env::init();
    let script = r#"
import sys, subprocess, torch
sys.path.insert(0, sys.argv[1])
import ckptvc_torch as ck
binary, repo, tmp = sys.argv[2], sys.argv[3], sys.argv[4]

def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    opt = torch.optim.AdamW([{"params": rest, "weight_decay": 0.0}, {"params": decay}], lr=1e-2)
    return model, opt

def train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=g)
        loss = model(x).pow(2).mean()
        loss.backward(); opt.step(); opt.zero_grad()
    return loss.item()

model, opt = make()
train(model, opt, 5, 1)
ck.save(f"{tmp}/ckpt", model, opt, 5, extra={"note": "five"})
cid = ck.commit(f"{tmp}/ckpt", 5, repo=repo, ckptvc=binary)
assert len(cid) == 64, cid
subprocess.run([binary, "--repo", repo, "checkout", "5", "--output", f"{tmp}/back"], check=True)
model2, opt2 = make()
meta = ck.load(f"{tmp}/back", model2, opt2)
assert meta == {"step": 5, "note": "five"}, meta
for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
    assert torch.equal(a, b), n
s1, s2 = opt.state_dict(), opt2.state_dict()
assert s1["param_groups"] == s2["param_groups"]
for i in s1["state"]:
    for k in s1["state"][i]:
        assert torch.equal(s1["state"][i][k], s2["state"][i][k]), (i, k)
assert train(model, opt, 3, 2) == train(model2, opt2, 3, 2)
print("ok")
"#;
    let python_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("python");
    python(
        script,
        &[
            python_dir.as_ref(),
            assert_cmd::cargo::cargo_bin("ckptvc").as_ref(),
            env.repo().as_ref(),
            env.tmp.path().as_ref(),
        ],
    );
}

/// The whole loop with the real `transformers.Trainer`: `CkptvcCallback`
/// commits each save (with the parameter names), and training resumes with
/// `resume_from_checkpoint` from a lossy checkout, reaching a loss close to
/// the uninterrupted run's. Runs only where torch and transformers are
/// installed.
#[test]
fn the_trainer_commits_through_the_callback_and_resumes_from_a_checkout() {
    if !python_has("torch, transformers, safetensors") {
        return;
    }
    let env = Env::init_with(&["--policy", "balanced"]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = r#"
import json, os, subprocess, sys
root, binary, repo, tmp = sys.argv[1:5]
sys.path[:0] = [os.path.join(root, "python"), os.path.join(root, "fixtures")]
import ckptvc_torch, make_trainer_run as fixture
from transformers import TrainerCallback

class Losses(TrainerCallback):
    def __init__(self): self.losses = {}
    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs: self.losses[state.global_step] = logs["loss"]

def run(out, resume=None, callback=None):
    losses = Losses()
    trainer = fixture.make_trainer(out, 40, 10, [losses] + ([callback] if callback else []))
    trainer.train(resume_from_checkpoint=resume)
    return losses.losses

full = run(f"{tmp}/run", callback=ckptvc_torch.CkptvcCallback(repo=repo, ckptvc=binary))
show = json.loads(subprocess.run([binary, "--repo", repo, "--json", "show", "40"], check=True, capture_output=True).stdout)
assert show["pairings"][0]["rule"] == "names file", show["pairings"]
assert not show["pairings"][0]["unpaired"], show["pairings"]
step20 = json.loads(subprocess.run([binary, "--repo", repo, "--json", "show", "20"], check=True, capture_output=True).stdout)
assert not step20["keyframe"] and step20["error_w"] > 0, "step 20 should be a lossy residual"
subprocess.run([binary, "--repo", repo, "checkout", "20", "--output", f"{tmp}/resume-20"], check=True)
resumed = run(f"{tmp}/rerun", resume=f"{tmp}/resume-20")
gap = abs(resumed[40] - full[40]) / full[40]
print(json.dumps({"full": full, "resumed": resumed, "gap": gap}))
assert gap < 0.02, (full, resumed)
"#;
    let stdout = python(
        script,
        &[
            root.as_ref(),
            assert_cmd::cargo::cargo_bin("ckptvc").as_ref(),
            env.repo().as_ref(),
            env.tmp.path().as_ref(),
        ],
    );
    eprintln!("{stdout}");
}

/// A plain script's `torch.save({"model": ..., "optimizer": ..., "step": n})`:
/// one file holding both state dicts, including a view and a shared storage.
/// Its tensors are found by their place in the dict and the file checks out
/// byte for byte. Runs only where torch is installed.
#[test]
fn a_plain_torch_save_dict_is_read_by_its_keys() {
    if !python_has("torch") {
        return;
    }
    let env = Env::init();
    let dir = env.path("ckpt");
    std::fs::create_dir(&dir).unwrap();
    let script = r#"
import sys, torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 8))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
model(torch.randn(4, 64)).sum().backward(); opt.step()
base = torch.arange(12.0)
torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1,
            "view": base[2:5], "shared": [base, base],
            "big": torch.randn(2_500_000)}, sys.argv[1])
"#;
    python(script, &[dir.join("ckpt.pt").as_ref()]);
    env.commit(&dir, 1);
    let show = env.json(&["show", "1"]);
    let names: Vec<&str> = show["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["tensor"].as_str())
        .collect();
    for expected in [
        "model.0.weight",
        "model.1.bias",
        "optimizer.state.0.exp_avg",
        "optimizer.state.3.exp_avg_sq",
    ] {
        assert!(names.contains(&expected), "{expected} not in {names:?}");
    }
    // 10 MB: three chunks, whose CRC-32s are combined into the record's.
    let big = show["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["tensor"] == "big")
        .unwrap();
    assert_eq!(big["chunks"], 3);
    // The view and the list share one storage: stored once, by its key.
    assert_eq!(
        names.iter().filter(|n| n.starts_with("storage.")).count(),
        1,
        "{names:?}"
    );
    // Not a Trainer folder and no names file: nothing is paired.
    assert_eq!(show["pairings"][0]["paired"].as_array().unwrap().len(), 0);
    let out = env.checkout("1", "out");
    assert_same_files(&dir, &out);
}

/// `import --branch NEW --parent REV`: the new branch forks at REV, steps up
/// to REV are inherited (skipped), and only the first commit takes --parent.
#[test]
fn an_import_onto_a_new_branch_forks_at_its_parent() {
    let env = Env::init();
    env.commit(&checkpoint(10), 10);
    env.commit(&checkpoint(20), 20);
    let report = env.json(&[
        "import",
        run_dir().to_str().unwrap(),
        "--branch",
        "retry",
        "--parent",
        "main@10",
    ]);
    assert_eq!(report["skipped"], serde_json::json!([10]));
    let imported: Vec<u64> = report["imported"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_u64().unwrap())
        .collect();
    assert_eq!(imported, [20, 30]);
    let log = env.json(&["log", "--branch", "retry"]);
    let steps: Vec<u64> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [30, 20, 10]);
    let main_10 = env.json(&["show", "main@10"])["id"].clone();
    assert_eq!(log[1]["parents"][0], main_10, "retry@20 forks from main@10");
    assert_same_files(&checkpoint(30), &env.checkout("retry@30", "out"));
}
