//! Helpers shared by the integration tests: they drive the real binary on the
//! fixture checkpoints in fixtures/series.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use serde_json::Value;

pub const STEPS: [u64; 6] = [20, 40, 60, 80, 100, 120];

pub fn fixture(step: u64) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/series")
        .join(format!("step-{step:06}"))
}

/// A temporary directory holding a store at `<tmp>/store`.
pub struct Env {
    pub tmp: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env {
            tmp: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A fresh lossless store, initialized: checkouts are byte-identical.
    pub fn init() -> Env {
        Env::init_with(&["--policy", "lossless"])
    }

    /// A fresh store, initialized with `init ARGS`.
    pub fn init_with(args: &[&str]) -> Env {
        let env = Env::new();
        env.cmd().arg("init").args(args).assert().success();
        env
    }

    pub fn repo(&self) -> PathBuf {
        self.tmp.path().join("store")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    pub fn cmd(&self) -> Command {
        let mut cmd = Command::cargo_bin("ckptvc").expect("binary");
        cmd.arg("--repo").arg(self.repo()).env_remove("CKPTVC_REPO");
        cmd
    }

    pub fn commit(&self, dir: &Path, step: u64) -> String {
        self.commit_args(&["--step", &step.to_string()], dir)
    }

    /// Commits `dir` to `branch` at `step`; returns the commit id.
    pub fn commit_on(&self, branch: &str, dir: &Path, step: u64) -> String {
        self.commit_args(&["--branch", branch, "--step", &step.to_string()], dir)
    }

    pub fn commit_args(&self, args: &[&str], dir: &Path) -> String {
        let out = self
            .cmd()
            .arg("commit")
            .args(args)
            .arg(dir)
            .assert()
            .success();
        String::from_utf8(out.get_output().stdout.clone())
            .unwrap()
            .trim()
            .to_string()
    }

    /// Commits `dir` at `step` with `--json`; returns what it printed.
    pub fn commit_json(&self, dir: &Path, step: u64) -> Value {
        let out = self
            .cmd()
            .args(["--json", "commit", "--step", &step.to_string()])
            .arg(dir)
            .assert()
            .success();
        serde_json::from_slice(&out.get_output().stdout).expect("commit --json")
    }

    /// Checks `rev` out into `<tmp>/<name>` and returns that path.
    pub fn checkout(&self, rev: &str, name: &str) -> PathBuf {
        let out = self.path(name);
        self.cmd()
            .args(["checkout", rev, "--output"])
            .arg(&out)
            .assert()
            .success();
        out
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let out = self.cmd().arg("--json").args(args).assert().success();
        let stdout = &out.get_output().stdout;
        serde_json::from_slice(stdout).unwrap_or_else(|e| {
            panic!(
                "`{}` printed invalid JSON ({e}): {}",
                args.join(" "),
                String::from_utf8_lossy(stdout)
            )
        })
    }

    /// Everything a user can see about the store, plus a digest of every
    /// store file: equal snapshots mean the store was not touched.
    pub fn snapshot(&self) -> (Value, Value, Vec<(String, String)>) {
        let stats = self.json(&["stats"]);
        let log = self.json(&["log", "--all"]);
        (stats, log, file_digests(&self.repo().join("db")))
    }
}

/// (relative path, blake3) of every file under `dir`, sorted.
pub fn file_digests(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            walk(root, &path, out);
        } else {
            let bytes = std::fs::read(&path).unwrap();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.push((rel, blake3::hash(&bytes).to_hex().to_string()));
        }
    }
}

/// Copies a directory (flat) to `dest`.
pub fn copy_dir(src: &Path, dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dest.join(entry.file_name())).unwrap();
    }
}

/// Asserts that two directories hold the same files with the same bytes.
pub fn assert_same_files(expected: &Path, actual: &Path) {
    let a = file_digests(expected);
    let b = file_digests(actual);
    assert!(!a.is_empty());
    assert_eq!(a, b, "{} vs {}", expected.display(), actual.display());
}

/// A safetensors file from a raw JSON header and `data_len` data bytes.
pub fn safetensors_bytes(header: &str, data_len: usize) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend((0..data_len).map(|i| i as u8));
    v
}

/// Writes `dir/model.safetensors`: `mib` MiB of f32 weights that differ
/// with `seed` and compress a little, as weights do. At 64 MiB or more a
/// commit puts its blobs in a pack of its own.
pub fn large_checkpoint(dir: &Path, mib: usize, seed: u64) {
    let elements = mib << 18;
    let header = format!(
        r#"{{"w":{{"dtype":"F32","shape":[{elements}],"data_offsets":[0,{}]}}}}"#,
        elements * 4
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    // Odd and distinct for every seed: `seed | 1` gave seeds 2 and 3 the
    // same bytes, so two steps of a test could share all their blobs.
    let mut state = (seed << 1) | 1;
    for _ in 0..elements {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let random = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let value = (random >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        bytes.extend_from_slice(&(value * 0.02).to_le_bytes());
    }
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
}

/// A fresh `s3://` URL (its own prefix) on the test S3 server that
/// `scripts/s3-server.sh` started, or `None` after printing "skipped" when
/// there is none. With `CKPTVC_REQUIRE_S3` set (CI), no server is a failure.
pub fn s3_url(test: &str) -> Option<String> {
    match std::env::var("CKPTVC_TEST_S3_BUCKET") {
        Ok(bucket) if std::env::var_os("AWS_ENDPOINT_URL").is_some() => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            Some(format!(
                "s3://{bucket}/{test}-{}-{nanos}",
                std::process::id()
            ))
        }
        _ if std::env::var_os("CKPTVC_REQUIRE_S3").is_some() => {
            panic!("{test}: no S3 test server (CKPTVC_TEST_S3_BUCKET / AWS_ENDPOINT_URL unset)")
        }
        _ => {
            println!("skipped: {test} needs an S3 server (scripts/s3-server.sh start)");
            None
        }
    }
}
