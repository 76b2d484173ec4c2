//! Output for shells and manuals: completion scripts and the man page.

use assert_cmd::Command;

fn ckptvc(args: &[&str]) -> String {
    let out = Command::cargo_bin("ckptvc")
        .unwrap()
        .args(args)
        .assert()
        .success();
    String::from_utf8(out.get_output().stdout.clone()).unwrap()
}

#[test]
fn completions_cover_every_command() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = ckptvc(&["completions", shell]);
        for command in ["checkout", "commit", "log", "gc", "fsck", "prune"] {
            assert!(
                script.contains(command),
                "{shell} completion lacks {command}"
            );
        }
    }
    // The bash script parses.
    let script = ckptvc(&["completions", "bash"]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckptvc.bash");
    std::fs::write(&path, script).unwrap();
    let status = std::process::Command::new("bash")
        .arg("-n")
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success(), "bash -n rejects the completion script");
}

#[test]
fn man_page_is_roff_naming_the_commands() {
    let page = ckptvc(&["man"]);
    assert!(page.contains(".TH ckptvc 1"), "{page}");
    for command in [
        "init", "commit", "checkout", "log", "branch", "tag", "gc", "fsck",
    ] {
        assert!(page.contains(command), "man page lacks {command}");
    }
}

#[test]
fn unknown_shell_is_refused() {
    Command::cargo_bin("ckptvc")
        .unwrap()
        .args(["completions", "tcsh"])
        .assert()
        .failure()
        .stderr(predicates::str::contains("invalid value 'tcsh'"));
}
