//! Output for shells, scripts and people: completion scripts, the man page,
//! the `--json` schemas of docs/cli.md, and colour.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use assert_cmd::Command;
use common::*;
use serde_json::Value;

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

/// `ckptvc log | head`: a reader that went away ends the command quietly
/// with 141 (what a shell reports for SIGPIPE), for the table, JSON and the
/// generated scripts alike; no panic, no error line.
#[test]
fn a_closed_stdout_ends_quietly() {
    let env = Env::init();
    env.commit(&fixture(STEPS[0]), STEPS[0]);
    for args in [
        &["log"][..],
        &["--json", "log"],
        &["show", "main"],
        &["completions", "bash"],
        &["man"],
    ] {
        // The read end is closed before the command starts, so its first
        // write to stdout fails with EPIPE whatever the timing.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("ckptvc"))
            .arg("--repo")
            .arg(env.repo())
            .args(args)
            .stdout(writer)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(141), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
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

/// The schema tables of docs/cli.md: name → documented field paths.
fn documented_schemas() -> BTreeMap<String, BTreeSet<String>> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/cli.md")).unwrap();
    let mut schemas = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        if let Some(name) = line
            .strip_prefix("<!-- schema: ")
            .and_then(|rest| rest.strip_suffix(" -->"))
        {
            current = Some(name.to_string());
            schemas.insert(name.to_string(), BTreeSet::new());
        } else if let Some(name) = &current {
            match line.strip_prefix("| `") {
                Some(row) => {
                    let field = row.split('`').next().unwrap().to_string();
                    schemas.get_mut(name).unwrap().insert(field);
                }
                None if line.starts_with('|') || line.is_empty() => {}
                None => current = None,
            }
        }
    }
    schemas
}

/// Every field path of a JSON value, in the notation of docs/cli.md.
fn field_paths(value: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                out.insert(path.clone());
                field_paths(v, &path, out);
            }
        }
        Value::Array(items) => {
            for item in items.iter().filter(|i| i.is_object()) {
                let path = format!("{prefix}[]");
                let mut inner = BTreeSet::new();
                field_paths(item, "", &mut inner);
                out.extend(inner.into_iter().map(|p| format!("{path}.{p}")));
            }
        }
        _ => {}
    }
}

/// Every field printed is documented, and every documented field is
/// printed wherever its parent object is.
fn assert_matches_schema(name: &str, output: &Value, schemas: &BTreeMap<String, BTreeSet<String>>) {
    let documented = schemas
        .get(name)
        .unwrap_or_else(|| panic!("docs/cli.md has no schema `{name}`"));
    let mut printed = BTreeSet::new();
    field_paths(output, "", &mut printed);
    let undocumented: Vec<_> = printed.difference(documented).collect();
    assert!(
        undocumented.is_empty(),
        "`{name}` prints undocumented fields {undocumented:?}"
    );
    for field in documented {
        let parent = field.rsplit_once('.').map(|(p, _)| p);
        let parent_printed = match parent {
            None => true,
            Some(p) => printed.iter().any(|f| f.starts_with(&format!("{p}."))),
        };
        assert!(
            !parent_printed || printed.contains(field),
            "`{name}` documents `{field}`, which it does not print: {output:#}"
        );
    }
}

#[test]
fn json_output_matches_the_documented_schemas() {
    let schemas = documented_schemas();
    let env = Env::init_with(&["--policy", "balanced"]);
    let json = |args: &[&str]| env.json(args);
    let commit = |step: u64| env.commit_json(&fixture(step), step);
    let mut checked = BTreeSet::new();
    let mut check = |name: &str, output: Value| {
        assert_matches_schema(name, &output, &schemas);
        checked.insert(name.to_string());
    };
    check("commit", commit(20));
    check("commit", commit(40));
    commit(60);
    let shard = |k: u32| {
        json(&[
            "commit",
            "--step",
            "80",
            "--shard",
            &format!("{k}/2"),
            fixture(80).to_str().unwrap(),
        ])
    };
    check("commit-shard", shard(0));
    check("status", json(&["status"]));
    check("commit-shard", shard(1));
    let out = env.path("out");
    check(
        "checkout",
        json(&["checkout", "40", "--output", out.to_str().unwrap()]),
    );
    check("log", json(&["log"]));
    check("log-graph", json(&["log", "--graph"]));
    check("show", json(&["show", "40"]));
    check("branch-create", json(&["branch", "exp", "20"]));
    check("branch-list", json(&["branch"]));
    check("switch", json(&["switch", "exp"]));
    check("switch", json(&["switch", "main"]));
    check("tag-create", json(&["tag", "v1", "40"]));
    check("tag-list", json(&["tag"]));
    check("diff", json(&["diff", "20", "60"]));
    check("fsck", json(&["fsck"]));
    check("stats", json(&["stats"]));
    check("tag-delete", json(&["tag", "-d", "v1"]));
    check("branch-delete", json(&["branch", "-d", "exp"]));
    check("gc", json(&["gc", "--dry-run"]));
    check("prune", json(&["prune", "--keep-last", "1", "--dry-run"]));
    check("prune", json(&["prune", "--keep-last", "1"]));
    check("gc", json(&["gc"]));
    let bucket = format!("file://{}", env.path("bucket").display());
    check("remote-add", json(&["remote", "add", "o", &bucket]));
    check("remote-list", json(&["remote", "list"]));
    check("push", json(&["push", "o"]));
    check("fetch", json(&["fetch", "o"]));
    let clone = env.path("clone");
    let out = assert_cmd::Command::cargo_bin("ckptvc")
        .unwrap()
        .args(["--json", "clone", &bucket])
        .arg(&clone)
        .arg("--lazy")
        .assert()
        .success();
    check(
        "clone",
        serde_json::from_slice(&out.get_output().stdout).unwrap(),
    );
    trainer_run_outputs(&mut check);
    let unchecked: Vec<_> = schemas.keys().filter(|k| !checked.contains(*k)).collect();
    assert!(
        unchecked.is_empty(),
        "schemas no test output was checked against: {unchecked:?}"
    );
}

/// `import`, `watch` and `show` of a Trainer checkpoint (optimizer pairing).
fn trainer_run_outputs(check: &mut impl FnMut(&str, Value)) {
    let env = Env::init_with(&["--policy", "balanced"]);
    let run = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/trainer-run");
    let copy = env.path("run");
    for step in [10, 20] {
        let name = format!("checkpoint-{step}");
        common::copy_dir(&run.join(&name), &copy.join(&name));
    }
    check("import", env.json(&["import", copy.to_str().unwrap()]));
    check("show", env.json(&["show", "20"]));
    common::copy_dir(&run.join("checkpoint-30"), &copy.join("checkpoint-30"));
    let out = env
        .cmd()
        .args(["--json", "watch", "--interval", "0.1", "--idle-exit", "0.5"])
        .arg("--delete-imported")
        .arg(&copy)
        .assert()
        .success();
    let stdout = String::from_utf8(out.get_output().stdout.clone()).unwrap();
    let events: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{stdout}");
    for event in events {
        let kind = format!("watch-{}", event["event"].as_str().unwrap());
        check(&kind, event);
    }
}

#[test]
fn colour_only_when_asked_or_on_a_terminal() {
    let env = Env::init();
    env.commit(&fixture(20), 20);
    let log = |args: &[&str], no_color: Option<&str>| {
        let mut cmd = env.cmd();
        if let Some(v) = no_color {
            cmd.env("NO_COLOR", v);
        } else {
            cmd.env_remove("NO_COLOR");
        }
        let out = cmd.args(args).assert().success();
        String::from_utf8(out.get_output().stdout.clone()).unwrap()
    };
    // Piped (as here): no escapes unless forced.
    assert!(!log(&["log"], None).contains('\x1b'));
    assert!(log(&["--color", "always", "log"], None).contains("\x1b[33m"));
    assert!(log(&["--color", "always", "branch"], Some("1")).contains("\x1b[32m"));
    assert!(!log(&["--color", "never", "log"], None).contains('\x1b'));
    assert!(!log(&["--json", "--color", "always", "log"], None).contains('\x1b'));
    // The columns line up with and without colour.
    let plain = log(&["log"], None);
    let coloured = log(&["--color", "always", "log"], None);
    let stripped: String = {
        let mut out = String::new();
        let mut rest = coloured.as_str();
        while let Some(at) = rest.find('\x1b') {
            out.push_str(&rest[..at]);
            rest = &rest[at + rest[at..].find('m').unwrap() + 1..];
        }
        out + rest
    };
    assert_eq!(stripped, plain);
}

#[test]
fn stats_plots_a_branch_history_as_png_or_svg() {
    let env = Env::init_with(&["--policy", "balanced"]);
    for step in [20, 40, 60] {
        env.commit(&fixture(step), step);
    }
    let png = env.path("history.png");
    env.cmd()
        .args(["stats", "--plot"])
        .arg(&png)
        .assert()
        .success()
        .stderr(predicates::str::contains("plotted 3 commits of `main`"));
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    // IHDR: width and height, big-endian, right after the signature and chunk header.
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((width, height), (1200, 1050));
    assert!(
        bytes.len() > 20_000,
        "a blank picture compresses to almost nothing"
    );

    let svg = env.path("history.svg");
    env.cmd()
        .args(["-q", "stats", "--plot"])
        .arg(&svg)
        .assert()
        .success();
    let text = std::fs::read_to_string(&svg).unwrap();
    for label in [
        "branch `main`",
        "stored bytes per commit",
        "compression ratio",
        "exp_avg_sq v",
    ] {
        assert!(text.contains(label), "svg lacks {label:?}");
    }
    env.cmd()
        .args(["stats", "--branch", "nope", "--plot"])
        .arg(env.path("none.png"))
        .assert()
        .failure()
        .stderr(predicates::str::contains("nope"));
}
