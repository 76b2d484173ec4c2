//! A store on a small filesystem, committed to until it is full: the failing
//! commit says so clearly, the store stays intact, earlier commits check
//! out. Needs permission to mount a tmpfs; skipped with a message otherwise.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Env, STEPS, assert_same_files, fixture};

/// A mounted tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .ok()?
            .status
            .success();
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_the_commit_cleanly() {
    let outside = Env::new();
    let mount_point = outside.path("small-fs");
    let Some(_fs) = Tmpfs::mount(&mount_point, "12m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)");
        return;
    };
    let repo = mount_point.join("store");
    let ckptvc = |args: &[&str]| {
        let mut cmd = assert_cmd::Command::cargo_bin("ckptvc").unwrap();
        cmd.arg("--repo")
            .arg(&repo)
            .env_remove("CKPTVC_REPO")
            .args(args);
        cmd
    };
    ckptvc(&["init", "--policy", "lossless"]).assert().success();
    let mut committed = Vec::new();
    let mut failure = None;
    for i in 0..40u64 {
        let source = STEPS[i as usize % STEPS.len()];
        let step = (i + 1) * 10;
        // Keyframes of six distinct checkpoints, ~2 MB each: the 12 MiB fill up.
        let out = ckptvc(&["commit", "--keyframe", "--step", &step.to_string()])
            .arg(fixture(source))
            .output()
            .unwrap();
        if out.status.success() {
            committed.push((step, source));
        } else {
            failure = Some(String::from_utf8_lossy(&out.stderr).into_owned());
            break;
        }
    }
    let message = failure.expect("the 12 MiB filesystem never filled");
    assert!(
        message.contains("No space left on device") || message.contains("space"),
        "{message}"
    );
    assert!(!message.contains("panicked"), "{message}");
    assert!(!committed.is_empty(), "{message}");
    // Intact, and every earlier commit still checks out exactly (into a
    // directory outside the full filesystem).
    ckptvc(&["fsck"]).assert().success();
    for (step, source) in &committed {
        let out = outside.path(&format!("out-{step}"));
        ckptvc(&["checkout", &step.to_string(), "-o"])
            .arg(&out)
            .assert()
            .success();
        assert_same_files(&fixture(*source), &out);
    }
    eprintln!(
        "{} commits fit; the next failed with: {}",
        committed.len(),
        message.trim()
    );
}
