//! Remotes through the real binary: push, clone (full and lazy), fetch,
//! pull, fast-forward refusal, racing pushes, damaged and dangling remote
//! objects, `fsck`/`gc --remote`, and a server killed mid-push. Each
//! scenario runs on a `file://` remote and, where a test S3 server is up
//! (always in CI), on `s3://`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command as Process;

use common::{Env, STEPS, assert_same_files, fixture};
use serde_json::Value;

/// The remotes each scenario runs against.
fn remotes(test: &str, tmp: &Path) -> Vec<String> {
    let mut urls = vec![format!("file://{}/{test}-bucket", tmp.display())];
    urls.extend(common::s3_url(test));
    urls
}

/// A lossless store with the first `n` fixture steps on main.
fn store_with_steps(n: usize) -> Env {
    let env = Env::init();
    for step in &STEPS[..n] {
        env.commit(&fixture(*step), *step);
    }
    env
}

/// `ckptvc --repo DIR ...` for a store that is not an `Env`'s.
fn at(repo: &Path) -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::cargo_bin("ckptvc").unwrap();
    cmd.arg("--repo").arg(repo).env_remove("CKPTVC_REPO");
    cmd
}

fn json_at(repo: &Path, args: &[&str]) -> Value {
    let out = at(repo).arg("--json").args(args).assert().success();
    serde_json::from_slice(&out.get_output().stdout).unwrap()
}

/// `remote add NAME URL`, then `push NAME`.
fn add_and_push(env: &Env, name: &str, url: &str) {
    env.cmd()
        .args(["remote", "add", name, url])
        .assert()
        .success();
    env.cmd().args(["push", name]).assert().success();
}

fn stderr_of(out: &assert_cmd::assert::Assert) -> String {
    String::from_utf8_lossy(&out.get_output().stderr).into_owned()
}

/// A lossy store's chunks decode with side chunks (W with m and v of its
/// commit and of its base; m with v): a lazy clone downloads those too,
/// and after a prune (chunks that keep dropped bases, whose sides a push
/// must send) the clone's checkout equals the original store's.
#[test]
fn lazy_clone_of_a_pruned_lossy_store_fetches_side_chunks() {
    let env = Env::init_with(&["--policy", "faithful"]);
    for step in &STEPS[..5] {
        env.commit(&fixture(*step), *step);
    }
    env.cmd()
        .args(["prune", "--keep-last", "2", "--keep-every", "1000"])
        .assert()
        .success();
    let expected = env.checkout("main@100", "expected");
    for url in remotes("lazy-lossy", env.tmp.path()) {
        let name = format!("l{}", url.len());
        env.cmd()
            .args(["remote", "add", &name, &url])
            .assert()
            .success();
        env.cmd().args(["push", &name]).assert().success();
        let clone = env.path(&format!("clone-{name}"));
        at(&clone)
            .args(["clone", &url])
            .arg(&clone)
            .arg("--lazy")
            .assert()
            .success();
        let dest = env.path(&format!("out-{name}"));
        let checkout = json_at(
            &clone,
            &["checkout", "main@100", "--output", dest.to_str().unwrap()],
        );
        assert!(checkout["blobs_downloaded"].as_u64().unwrap() > 0);
        assert_same_files(&expected, &dest);
    }
}

#[test]
fn push_then_lazy_clone_checks_out_one_step_with_its_chunks_only() {
    let env = store_with_steps(4);
    for url in remotes("lazy", env.tmp.path()) {
        let name = format!("r{}", url.len());
        env.cmd()
            .args(["remote", "add", &name, &url])
            .assert()
            .success();
        let pushed = env.json(&["push", &name]);
        assert_eq!(pushed["refs"][0]["status"], "created", "{url}");
        assert_eq!(pushed["commits_sent"], 4);
        // Everything is there already: a second push sends nothing.
        let again = env.json(&["push", &name]);
        assert_eq!(again["refs"][0]["status"], "up-to-date");
        assert_eq!(again["blobs_sent"], 0);
        assert_eq!(again["commits_sent"], 0);

        let clone = env.path(&format!("clone-{name}"));
        let out = at(&clone)
            .args(["--json", "clone", &url])
            .arg(&clone)
            .arg("--lazy")
            .assert()
            .success();
        let report: Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
        assert_eq!(report["fetch"]["commits_fetched"], 4);
        assert_eq!(report["fetch"]["blobs_fetched"], 0, "lazy takes no blobs");
        let log = json_at(&clone, &["log"]);
        assert_eq!(log.as_array().unwrap().len(), 4);

        // One step: only what it needs comes down, verified, and is kept.
        let dest = env.path(&format!("out-{name}"));
        let checkout = json_at(
            &clone,
            &["checkout", "main@40", "--output", dest.to_str().unwrap()],
        );
        let downloaded = checkout["blobs_downloaded"].as_u64().unwrap();
        assert!(downloaded > 0);
        assert_same_files(&fixture(40), &dest);
        let total = env.json(&["stats"])["blobs"].as_u64().unwrap();
        assert!(
            downloaded < total,
            "one step of four downloaded {downloaded} of {total} blobs"
        );
        // Kept: checking it out again downloads nothing.
        let again = json_at(
            &clone,
            &[
                "checkout",
                "main@40",
                "--force",
                "--output",
                dest.to_str().unwrap(),
            ],
        );
        assert_eq!(again["blobs_downloaded"], 0);
        at(&clone).arg("fsck").assert().success();
        env.cmd()
            .args(["fsck", "--remote", &name])
            .assert()
            .success();
    }
}

#[test]
fn fetch_and_pull_bring_new_commits_and_tracking_branches() {
    let tmp = tempfile::tempdir().unwrap();
    for url in remotes("fetch", tmp.path()) {
        let env = store_with_steps(2);
        add_and_push(&env, "o", &url);
        let clone = env.path("clone");
        at(&clone)
            .arg("clone")
            .arg(&url)
            .arg(&clone)
            .assert()
            .success();
        // A full clone holds every blob.
        let stats = json_at(&clone, &["stats"]);
        assert_eq!(stats["blobs"], env.json(&["stats"])["blobs"]);

        env.commit(&fixture(60), 60);
        env.cmd().args(["tag", "best", "40"]).assert().success();
        env.cmd().args(["push", "o", "--tags"]).assert().success();
        let fetched = json_at(&clone, &["fetch"]);
        assert_eq!(fetched["commits_fetched"], 1);
        assert_eq!(fetched["tags"], serde_json::json!(["best"]));
        assert_eq!(
            json_at(&clone, &["show", "best"])["id"],
            env.json(&["show", "best"])["id"]
        );
        assert_eq!(fetched["refs"][0]["tracking"], "origin/main");
        // The tracking branch resolves like any branch; main has not moved.
        let dest = env.path("tracking");
        at(&clone)
            .args(["checkout", "origin/main@60", "--output"])
            .arg(&dest)
            .assert()
            .success();
        assert_same_files(&fixture(60), &dest);
        assert_eq!(json_at(&clone, &["log"]).as_array().unwrap().len(), 2);
        at(&clone).arg("pull").assert().success();
        assert_eq!(json_at(&clone, &["log"]).as_array().unwrap().len(), 3);
        // A tracking branch is moved by fetch and push, not pushed itself.
        let refused = at(&clone)
            .args(["push", "origin", "origin/main"])
            .assert()
            .failure();
        assert!(stderr_of(&refused).contains("remote-tracking branch"));
    }
}

#[test]
fn push_is_fast_forward_only_and_force_overrides() {
    let base = store_with_steps(2);
    for url in remotes("ff", base.tmp.path()) {
        add_and_push(&base, "o", &url);
        let other = base.path(&format!("other-{}", url.len()));
        at(&other)
            .arg("clone")
            .arg(&url)
            .arg(&other)
            .assert()
            .success();
        at(&other)
            .args(["commit", "--step", "60"])
            .arg(fixture(60))
            .assert()
            .success();
        at(&other).args(["push"]).assert().success();

        // A diverging local commit cannot replace theirs.
        let mine = Env::init();
        for step in [20, 80] {
            mine.commit(&fixture(step), step);
        }
        mine.cmd()
            .args(["remote", "add", "o", &url])
            .assert()
            .success();
        let refused = mine.cmd().args(["push", "o"]).assert().failure();
        let message = stderr_of(&refused);
        assert!(
            message.contains("remote o main has commits you do not have (fetch first)"),
            "{message}"
        );
        let remote_tip = |env: &Env| {
            let out = env.cmd().args(["--json", "fetch", "o"]).assert().success();
            let _: Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
            env.json(&["log", "--branch", "o/main"])[0]["id"].clone()
        };
        let theirs = json_at(&other, &["log"])[0]["id"].clone();
        assert_eq!(
            remote_tip(&mine),
            theirs,
            "the refused push changed nothing"
        );
        mine.cmd().args(["push", "o", "--force"]).assert().success();
        assert_eq!(remote_tip(&mine), mine.json(&["log"])[0]["id"]);
        mine.cmd()
            .args(["fsck", "--remote", "o"])
            .assert()
            .success();
        base.cmd()
            .args(["remote", "remove", "o"])
            .assert()
            .success();
    }
}

/// Two processes push different commits onto the same remote branch at
/// once: exactly one wins, the other is refused, nothing is lost; pushes to
/// different branches both land.
#[test]
fn racing_pushes_one_winner_and_different_branches_both_land() {
    let tmp = tempfile::tempdir().unwrap();
    for url in remotes("race", tmp.path()) {
        let seed = store_with_steps(1);
        add_and_push(&seed, "o", &url);
        let clones: Vec<PathBuf> = (0..2)
            .map(|i| {
                let dir = tmp.path().join(format!("c{i}-{}", url.len()));
                at(&dir).arg("clone").arg(&url).arg(&dir).assert().success();
                at(&dir)
                    .args(["commit", "--step", &STEPS[1 + i].to_string()])
                    .arg(fixture(STEPS[1 + i]))
                    .assert()
                    .success();
                dir
            })
            .collect();
        let bin = assert_cmd::cargo::cargo_bin("ckptvc");
        let children: Vec<_> = clones
            .iter()
            .map(|dir| {
                Process::new(&bin)
                    .arg("--repo")
                    .arg(dir)
                    .args(["push", "origin"])
                    .env_remove("CKPTVC_REPO")
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let results: Vec<_> = children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect();
        let winners: Vec<usize> = (0..2).filter(|&i| results[i].status.success()).collect();
        assert_eq!(
            winners.len(),
            1,
            "{url}: exactly one push wins: {results:?}"
        );
        let loser = 1 - winners[0];
        let message = String::from_utf8_lossy(&results[loser].stderr);
        assert!(
            message.contains("fetch first") || message.contains("another push won"),
            "{message}"
        );
        // The winner's commit is the remote tip; the loser's is still local.
        let winner_tip = json_at(&clones[winners[0]], &["log"])[0]["id"].clone();
        seed.cmd().args(["fetch", "o"]).assert().success();
        assert_eq!(
            seed.json(&["log", "--branch", "o/main"])[0]["id"],
            winner_tip
        );
        assert_eq!(
            json_at(&clones[loser], &["log"]).as_array().unwrap().len(),
            2
        );
        seed.cmd()
            .args(["fsck", "--remote", "o"])
            .assert()
            .success();

        // Different branches: both land.
        let children: Vec<_> = clones
            .iter()
            .enumerate()
            .map(|(i, dir)| {
                at(dir)
                    .args(["branch", &format!("side{i}"), "main"])
                    .assert()
                    .success();
                Process::new(&bin)
                    .arg("--repo")
                    .arg(dir)
                    .args(["push", "origin", &format!("side{i}")])
                    .env_remove("CKPTVC_REPO")
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut child in children {
            assert!(child.wait().unwrap().success());
        }
        seed.cmd().args(["fetch", "o"]).assert().success();
        for (i, clone) in clones.iter().enumerate() {
            assert_eq!(
                seed.json(&["log", "--branch", &format!("o/side{i}")])[0]["id"],
                json_at(clone, &["log"])[0]["id"]
            );
        }
    }
}

#[test]
fn damaged_and_dangling_remote_objects_are_refused() {
    let env = store_with_steps(2);
    let bucket = env.path("bucket");
    let url = format!("file://{}", bucket.display());
    add_and_push(&env, "o", &url);

    // A byte flipped in a pack: the lazy checkout refuses the blob and the
    // clone keeps no damaged data.
    let clone = env.path("clone");
    at(&clone)
        .args(["clone", &url])
        .arg(&clone)
        .arg("--lazy")
        .assert()
        .success();
    for entry in std::fs::read_dir(bucket.join("packs")).unwrap() {
        let path = entry.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        std::fs::write(&path, bytes).unwrap();
    }
    let before = json_at(&clone, &["stats"]);
    let failed = at(&clone)
        .args(["checkout", "main@40", "--output"])
        .arg(env.path("out"))
        .assert()
        .failure();
    let message = stderr_of(&failed);
    assert!(message.contains("do not hash to its id"), "{message}");
    assert_eq!(json_at(&clone, &["stats"])["blobs"], before["blobs"]);
    let fsck = env.cmd().args(["fsck", "--remote", "o"]).assert().failure();
    assert!(stderr_of(&fsck).contains("problem"));

    // A ref entry naming a commit the remote does not have: reported.
    let entry = bucket.join("refs/branch/ghost/00000000000000000000");
    std::fs::create_dir_all(entry.parent().unwrap()).unwrap();
    std::fs::write(&entry, format!("ckptvc-ref 1\n{}\nnone\n", "ab".repeat(32))).unwrap();
    let failed = at(&clone).arg("fetch").assert().failure();
    let message = stderr_of(&failed);
    assert!(message.contains("which it does not have"), "{message}");
    assert!(!message.contains("panicked"), "{message}");
}

#[test]
fn gc_on_a_remote_spares_young_objects_and_removes_old_garbage() {
    let env = store_with_steps(3);
    let url = format!("file://{}", env.path("bucket").display());
    env.cmd()
        .args(["remote", "add", "o", &url])
        .assert()
        .success();
    env.cmd().args(["push", "o", "--all"]).assert().success();
    env.cmd()
        .args(["branch", "side", "main@20"])
        .assert()
        .success();
    env.cmd().args(["push", "o", "side"]).assert().success();
    // Drop main's last two commits on the remote (working on it directly).
    let remote = |args: &[&str]| {
        let mut cmd = assert_cmd::Command::cargo_bin("ckptvc").unwrap();
        cmd.arg("--repo")
            .arg(&url)
            .args(args)
            .env_remove("CKPTVC_REPO");
        cmd.assert().success()
    };
    remote(&["switch", "side"]);
    remote(&["branch", "-d", "main"]);
    let young = env.json(&["gc", "--remote", "o", "--dry-run"]);
    assert_eq!(young["commits_removed"], 0, "younger than the grace period");
    let old = env.json(&["gc", "--remote", "o", "--grace", "0"]);
    assert_eq!(old["commits_removed"], 2);
    assert!(old["blobs_removed"].as_u64().unwrap() > 0);
    env.cmd().args(["fsck", "--remote", "o"]).assert().success();
    let clone = env.path("clone");
    at(&clone)
        .arg("clone")
        .arg(&url)
        .arg(&clone)
        .assert()
        .success();
    let dest = env.path("out");
    at(&clone)
        .args(["checkout", "side", "--output"])
        .arg(&dest)
        .assert()
        .success();
    assert_same_files(&fixture(20), &dest);
}

#[test]
fn remotes_are_listed_removed_and_bad_urls_refused() {
    let env = store_with_steps(1);
    let url = format!("file://{}", env.path("bucket").display());
    env.cmd()
        .args(["remote", "add", "o", &url])
        .assert()
        .success();
    let list = env.json(&["remote", "list"]);
    assert_eq!(list[0]["name"], "o");
    assert_eq!(list[0]["conditional_writes"], true);
    let dup = env
        .cmd()
        .args(["remote", "add", "o", &url])
        .assert()
        .failure();
    assert!(stderr_of(&dup).contains("already exists"));
    let bad = env
        .cmd()
        .args(["remote", "add", "x", "ftp://host/path"])
        .assert()
        .failure();
    assert!(
        stderr_of(&bad).contains("unknown scheme"),
        "{}",
        stderr_of(&bad)
    );
    let nope = env.cmd().args(["push", "nope"]).assert().failure();
    assert!(stderr_of(&nope).contains("no remote named `nope`"));
    env.cmd().args(["push", "o"]).assert().success();
    env.cmd().args(["fetch", "o"]).assert().success();
    assert!(env.json(&["branch"]).to_string().contains("o/main"));
    env.cmd().args(["remote", "remove", "o"]).assert().success();
    assert!(!env.json(&["branch"]).to_string().contains("o/main"));
    assert_eq!(env.json(&["remote", "list"]), serde_json::json!([]));
}

/// `scripts/s3-server.sh ARGS`; for `start`, the environment it prints.
fn s3_server(args: &[&str]) -> Vec<(String, String)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/s3-server.sh");
    let out = Process::new(script).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "s3-server.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|word| word.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Stops the fault test's own server however the test ends.
struct Server(PathBuf);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = s3_server(&["stop", self.0.to_str().unwrap()]);
    }
}

/// The S3 server is killed in the middle of a push: the push fails naming
/// the remote, the remote stays consistent, and the next push sends only
/// what is missing.
#[test]
fn push_interrupted_by_a_killed_server_resumes_without_resending() {
    if common::s3_url("fault").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s3");
    let port = "18420";
    let server_env = s3_server(&["start", dir.to_str().unwrap(), port, "faults"]);
    let _server = Server(dir.clone());
    let with_server = |cmd: &mut assert_cmd::Command| {
        for (k, v) in &server_env {
            cmd.env(k, v);
        }
        cmd.env("CKPTVC_PACK_BYTES", (4 << 20).to_string())
            .env("CKPTVC_REMOTE_RETRY_SECS", "2")
            .env("CKPTVC_REMOTE_TIMEOUT_SECS", "5");
    };

    // Data that does not compress, in chunks of 4 MiB: a pack of one blob
    // each. Enough of them that the push is still going when the server is
    // killed (with 40, a quick push had finished before the kill).
    const CHUNKS: u64 = 120;
    let ckpt = tmp.path().join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..(CHUNKS as usize * (4 << 20)) / 8)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect();
    std::fs::write(ckpt.join("weights.bin"), &data).unwrap();
    let env = Env::init();
    env.commit(&ckpt, 1);
    let url = "s3://faults/run";
    let mut add = env.cmd();
    with_server(&mut add);
    add.args(["remote", "add", "o", url]).assert().success();

    let bin = assert_cmd::cargo::cargo_bin("ckptvc");
    let mut push = Process::new(&bin);
    push.arg("--repo")
        .arg(env.repo())
        .args(["--json", "push", "o"]);
    for (k, v) in &server_env {
        push.env(k, v);
    }
    push.env("CKPTVC_PACK_BYTES", (4 << 20).to_string())
        .env("CKPTVC_REMOTE_RETRY_SECS", "2")
        .env("CKPTVC_REMOTE_TIMEOUT_SECS", "5")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = push.spawn().unwrap();
    // Kill the server once some packs are in, while the push goes on. The
    // push is paused (SIGSTOP) the moment they are seen, and resumed after
    // the kill: on a fast machine it had sent the rest while the server was
    // being stopped, and succeeded.
    let signal = |sig: &str| {
        let sent = Process::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill {sig} of the push");
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let mut stats = assert_cmd::Command::new(&bin);
        with_server(&mut stats);
        let out = stats
            .args(["--repo", url, "--json", "stats"])
            .output()
            .unwrap();
        let blobs = serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v["blobs"].as_u64())
            .unwrap_or(0);
        if blobs >= 3 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no pack arrived");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    signal("-STOP");
    s3_server(&["kill", dir.to_str().unwrap()]);
    signal("-CONT");
    let failed = child.wait_with_output().unwrap();
    let message = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success(), "the push must fail: {message}");
    // Not killed by a signal: a SIGPIPE from writing to the dead server's
    // socket once ended the push with no message at all.
    assert!(
        failed.status.code().is_some(),
        "the push died of a signal ({}): {message}",
        failed.status
    );
    assert!(message.contains("remote s3://faults/run"), "{message}");
    assert!(!message.contains("panicked"), "{message}");

    s3_server(&["start", dir.to_str().unwrap(), port, "faults"]);
    let mut fsck = env.cmd();
    with_server(&mut fsck);
    fsck.args(["fsck", "--remote", "o"]).assert().success();
    let mut stats = assert_cmd::Command::new(&bin);
    with_server(&mut stats);
    let out = stats
        .args(["--repo", url, "--json", "stats"])
        .output()
        .unwrap();
    let landed = serde_json::from_slice::<Value>(&out.stdout).unwrap()["blobs"]
        .as_u64()
        .unwrap();
    assert!(
        (3..CHUNKS).contains(&landed),
        "{landed} blobs landed before the kill"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["commits"],
        0,
        "no commit before its blobs"
    );

    let mut again = env.cmd();
    with_server(&mut again);
    let out = again.args(["--json", "push", "o"]).assert().success();
    let report: Value = serde_json::from_slice(&out.get_output().stdout).unwrap();
    let sent = report["blobs_sent"].as_u64().unwrap();
    assert_eq!(
        sent,
        CHUNKS - landed,
        "only the missing blobs are sent again"
    );
    // A pack and its index per blob, the commit, the ref entry and the
    // two conditional-write probes: nothing else is written.
    let puts = report["traffic"]["puts"].as_u64().unwrap();
    assert_eq!(puts, 2 * sent + 1 + 1 + 2, "{report}");

    let clone = tmp.path().join("clone");
    let mut clone_cmd = assert_cmd::Command::new(&bin);
    with_server(&mut clone_cmd);
    clone_cmd
        .args(["--repo"])
        .arg(&clone)
        .args(["clone", url])
        .arg(&clone)
        .assert()
        .success();
    let dest = tmp.path().join("out");
    let mut checkout = assert_cmd::Command::new(&bin);
    with_server(&mut checkout);
    checkout
        .arg("--repo")
        .arg(&clone)
        .args(["checkout", "1", "--output"])
        .arg(&dest)
        .assert()
        .success();
    assert_same_files(&ckpt, &dest);
}

/// A wrong secret is one clear line, and no secret is ever written down or
/// printed.
#[test]
fn wrong_credentials_are_one_clear_line_and_secrets_stay_secret() {
    let Some(url) = common::s3_url("creds") else {
        return;
    };
    let env = store_with_steps(1);
    env.cmd()
        .args(["remote", "add", "o", &url])
        .assert()
        .success();
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_default();
    let remotes = std::fs::read_to_string(env.repo().join("remotes.json")).unwrap();
    assert!(!secret.is_empty() && !remotes.contains(&secret));
    let out = env
        .cmd()
        .env("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        .args(["push", "o"])
        .assert()
        .failure();
    let message = stderr_of(&out);
    let error_lines: Vec<&str> = message
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(error_lines.len(), 1, "{message}");
    assert!(message.contains("access denied"), "{message}");
    assert!(
        message.contains(&url) || message.contains("remote `o`"),
        "{message}"
    );
    assert!(!message.contains("not-the-secret") && !message.contains(&secret));
    let ok = env.cmd().args(["--json", "push", "o"]).assert().success();
    assert!(!String::from_utf8_lossy(&ok.get_output().stdout).contains(&secret));
}

/// A store kept in a bucket (`--repo s3://…`) runs every command the way a
/// local one does: the repo layer sees only the storage traits.
#[test]
fn a_store_in_a_bucket_runs_every_command() {
    let tmp = tempfile::tempdir().unwrap();
    for url in remotes("direct", tmp.path()) {
        let run = |args: &[&str]| {
            let mut cmd = assert_cmd::Command::cargo_bin("ckptvc").unwrap();
            cmd.arg("--repo")
                .arg(&url)
                .args(args)
                .env_remove("CKPTVC_REPO");
            cmd.env("XDG_CACHE_HOME", tmp.path().join("cache"));
            cmd
        };
        let json = |args: &[&str]| -> Value {
            let out = run(&[&["--json"], args].concat()).assert().success();
            serde_json::from_slice(&out.get_output().stdout).unwrap()
        };
        run(&["init", "--policy", "balanced"]).assert().success();
        run(&["init"]).assert().failure();
        for step in [20, 40, 60] {
            run(&["commit", "--step", &step.to_string()])
                .arg(fixture(step))
                .assert()
                .success();
        }
        let log = json(&["log"]);
        assert_eq!(log.as_array().unwrap().len(), 3, "{url}");
        assert!(log[0]["ratio"].as_f64().unwrap() > 1.0);
        let exists = run(&["commit", "--step", "60"])
            .arg(fixture(60))
            .assert()
            .failure();
        assert!(stderr_of(&exists).contains("already exists"));
        let show = json(&["show", "60"]);
        assert!(!show["entries"].as_array().unwrap().is_empty());
        run(&["branch", "exp", "main@40"]).assert().success();
        run(&["tag", "v1", "40"]).assert().success();
        run(&["switch", "exp"]).assert().success();
        run(&["commit", "--step", "80"])
            .arg(fixture(80))
            .assert()
            .success();
        assert_eq!(json(&["log", "--all"]).as_array().unwrap().len(), 4);
        assert!(json(&["log", "--graph"]).to_string().contains("tag: v1"));
        json(&["diff", "main@20", "exp@80"]);
        // The lossy commits decode to within what `show` reports; the first
        // (a keyframe) byte for byte.
        let out = tmp.path().join(format!("out-{}", url.len()));
        run(&["checkout", "main@20", "--output"])
            .arg(&out)
            .assert()
            .success();
        assert_same_files(&fixture(20), &out);
        let fsck = json(&["fsck"]);
        assert_eq!(fsck["problems"], serde_json::json!([]));
        assert!(fsck["chunks_decoded"].as_u64().unwrap() > 0);
        run(&["switch", "main"]).assert().success();
        run(&["branch", "-d", "exp"]).assert().success();
        let gc = json(&["gc", "--grace", "0"]);
        assert_eq!(gc["commits_removed"], 1);
        let stats = json(&["stats"]);
        assert_eq!(stats["commits"], 3);
        assert_eq!(json(&["fsck"])["problems"], serde_json::json!([]));
    }
}

/// A server that does not answer: the error names the remote, after the
/// retries give up (shortened here).
#[test]
fn an_unreachable_remote_is_an_error_that_names_it() {
    let env = store_with_steps(1);
    let out = env
        .cmd()
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "k")
        .env("AWS_SECRET_ACCESS_KEY", "s")
        .env("AWS_REGION", "us-east-1")
        .env("CKPTVC_REMOTE_RETRY_SECS", "1")
        .args(["remote", "add", "o", "s3://nowhere/run"])
        .assert()
        .failure();
    let message = stderr_of(&out);
    assert!(message.contains("s3://nowhere/run"), "{message}");
    assert!(!message.contains("panicked"), "{message}");
    assert_eq!(env.json(&["remote", "list"]), serde_json::json!([]));
}

/// A clone that fails (here: a remote ref to a commit the remote lacks)
/// leaves no half-made store behind.
#[test]
fn a_failed_clone_leaves_nothing_behind() {
    let env = store_with_steps(1);
    let bucket = env.path("bucket");
    let url = format!("file://{}", bucket.display());
    add_and_push(&env, "o", &url);
    let entry = bucket.join("refs/branch/ghost/00000000000000000000");
    std::fs::create_dir_all(entry.parent().unwrap()).unwrap();
    std::fs::write(&entry, format!("ckptvc-ref 1\n{}\nnone\n", "cd".repeat(32))).unwrap();
    let clone = env.path("clone");
    let out = at(&clone)
        .arg("clone")
        .arg(&url)
        .arg(&clone)
        .assert()
        .failure();
    assert!(stderr_of(&out).contains("which it does not have"));
    assert!(!clone.exists(), "the half-made clone was removed");
}
