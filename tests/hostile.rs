//! The hostile and unusual input corpus (tests/data/corpus, made by
//! tests/data/make_corpus.py), plus directory oddities made at run time:
//! every bad input is refused with a message naming the file, a non-zero
//! exit and an untouched store; every legal one round-trips byte for byte.

mod common;

use std::path::{Path, PathBuf};

use common::{Env, assert_same_files};
use predicates::str::contains;

fn corpus() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/corpus");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

/// A checkpoint directory holding `file` as `model.safetensors`.
fn checkpoint_with(env: &Env, file: &Path, name: &str) -> PathBuf {
    let dir = env.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(file, dir.join("model.safetensors")).unwrap();
    dir
}

#[test]
fn corpus_is_refused_or_round_trips() {
    let files = corpus();
    assert!(files.len() >= 30, "corpus has {} files", files.len());
    let env = Env::init_with(&["--policy", "balanced"]);
    env.commit(&common::fixture(20), 1);
    let mut step = 2;
    for file in files {
        let name = file.file_stem().unwrap().to_string_lossy().into_owned();
        let dir = checkpoint_with(&env, &file, &name);
        if name.starts_with("bad-") {
            let before = env.snapshot();
            let out = env
                .cmd()
                .args(["commit", "--step", &step.to_string()])
                .arg(&dir)
                .assert()
                .failure()
                .code(1)
                .stderr(contains("model.safetensors"));
            let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
            assert!(!stderr.contains("panicked"), "{name}: {stderr}");
            assert_eq!(before, env.snapshot(), "{name}: store changed");
        } else {
            env.cmd()
                .args(["commit", "--step", &step.to_string()])
                .arg(&dir)
                .assert()
                .success();
            let out = env.checkout(&step.to_string(), &format!("out-{name}"));
            assert_same_files(&dir, &out);
            step += 1;
        }
    }
    env.cmd().arg("fsck").assert().success();
}

#[test]
fn hundred_thousand_tiny_tensors_round_trip() {
    let env = Env::init();
    let count = 100_000;
    let entries: Vec<String> = (0..count)
        .map(|i| {
            format!(
                r#""t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{}]}}"#,
                i + 1
            )
        })
        .collect();
    let header = format!("{{{}}}", entries.join(","));
    let dir = env.path("many");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("model.safetensors"),
        common::safetensors_bytes(&header, count),
    )
    .unwrap();
    env.commit(&dir, 1);
    assert_same_files(&dir, &env.checkout("1", "out"));
    // With a parent: every per-tensor lookup must be by index (these took
    // minutes when they scanned the tensor list).
    env.commit(&dir, 2);
    assert_same_files(&dir, &env.checkout("2", "out2"));
    assert_eq!(
        env.json(&["diff", "1", "2"])["tensors"]
            .as_array()
            .unwrap()
            .len(),
        count
    );
    env.cmd().arg("fsck").assert().success();
}

#[test]
fn odd_files_in_the_checkpoint_directory() {
    let env = Env::init();
    let fixture = common::fixture(20);
    // Names with spaces and non-ASCII, and a symlink (followed): legal.
    let dir = env.path("odd names");
    common::copy_dir(&fixture, &dir);
    std::fs::write(dir.join("notes — ünïcødé.txt"), "hello").unwrap();
    std::os::unix::fs::symlink(fixture.join("meta.json"), dir.join("linked meta.json")).unwrap();
    env.commit(&dir, 1);
    let out = env.checkout("1", "out");
    assert_eq!(
        std::fs::read(out.join("linked meta.json")).unwrap(),
        std::fs::read(fixture.join("meta.json")).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(out.join("notes — ünïcødé.txt")).unwrap(),
        "hello"
    );

    let refused = |dir: &Path, what: &str| {
        let before = env.snapshot();
        env.cmd()
            .args(["commit", "--step", "2"])
            .arg(dir)
            .assert()
            .failure()
            .stderr(contains(what));
        assert_eq!(before, env.snapshot());
    };
    // A dangling symlink.
    let dangling = env.path("dangling");
    common::copy_dir(&fixture, &dangling);
    std::os::unix::fs::symlink(dangling.join("nowhere"), dangling.join("gone.bin")).unwrap();
    refused(&dangling, "gone.bin");
    // A FIFO: refused, not read (it would block) and not skipped.
    let fifo = env.path("fifo");
    common::copy_dir(&fixture, &fifo);
    let status = std::process::Command::new("mkfifo")
        .arg(fifo.join("pipe"))
        .status()
        .unwrap();
    assert!(status.success());
    refused(&fifo, "not a regular file");
    // An unreadable file (skipped when running as root, who reads anyway).
    let unreadable = env.path("unreadable");
    common::copy_dir(&fixture, &unreadable);
    let secret = unreadable.join("secret.bin");
    std::fs::write(&secret, "x").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o000)).unwrap();
    if std::fs::read(&secret).is_err() {
        refused(&unreadable, "secret.bin");
    }
}
