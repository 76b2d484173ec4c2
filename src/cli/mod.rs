//! The `cli` layer: argument parsing, human and JSON output, progress bars.
//! It only translates; every operation lives in [`crate::repo`].

/// `println!` for the command's output: a line to stdout, where a reader
/// that went away ends the process quietly instead of panicking (see
/// [`output::write_stdout`]).
macro_rules! outln {
    () => {
        $crate::cli::output::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::output::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod output;
#[cfg(feature = "plot")]
mod plot;
mod progress;
mod style;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::codec::policy::{Knobs, Policy};
use crate::repo::seal::Shard;
use crate::repo::{self, CommitOptions, Repo};
use crate::store::StoreConfig;
use output::{bytes, print_json};
use progress::Bar;

#[derive(Parser, Debug)]
#[command(
    name = "ckptvc",
    version,
    about = "Version control for training checkpoints"
)]
struct Cli {
    /// Store location.
    #[arg(long, global = true, env = "CKPTVC_REPO", default_value = ".ckptvc")]
    repo: PathBuf,
    /// Print nothing but errors (and requested data).
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for another writer to release the store (default:
    /// fail at once with "store is locked by another writer (pid N)").
    #[arg(long, global = true, default_value_t = 0.0, alias = "lock-timeout")]
    wait: f64,
    /// Colour tables: `auto` (on a terminal, unless NO_COLOR is set),
    /// `always` or `never`.
    #[arg(long, global = true, value_enum, default_value_t = style::ColorChoice::Auto)]
    color: style::ColorChoice,
    #[command(subcommand)]
    command: Command,
}

/// Where `import` and `watch` commit.
#[derive(clap::Args, Debug)]
struct ImportTarget {
    /// Branch to commit to (default: the current branch).
    #[arg(long)]
    branch: Option<String>,
    /// Where a new --branch starts (REV), e.g. `main@500` for a restart.
    #[arg(long, requires = "branch")]
    parent: Option<String>,
    /// lossless, excp, compact, balanced or faithful (default: the store's).
    #[arg(long, value_parser = parse_preset)]
    policy: Option<Policy>,
}

impl ImportTarget {
    fn options(&self, cli: &Cli) -> repo::import::ImportOptions {
        repo::import::ImportOptions {
            branch: self.branch.clone(),
            parent: self.parent.clone(),
            policy: self.policy.clone(),
            lock_wait: wait(cli),
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create an empty store.
    Init {
        /// Longest chain: a lossless keyframe at least every K commits.
        #[arg(long, default_value_t = 100)]
        keyframe_interval: u32,
        /// Also take a keyframe when checking out a commit would replay more
        /// than this many seconds of decoding (estimated at 500 MB/s), once a
        /// chain has at least 4 commits.
        #[arg(long, default_value_t = 60.0)]
        replay_budget: f64,
        /// Default policy of commits: lossless, excp, compact, balanced, faithful.
        #[arg(long, default_value = "balanced", value_parser = parse_preset)]
        policy: Policy,
    },
    /// Store a checkpoint directory as a new commit.
    Commit {
        /// The checkpoint directory: *.safetensors, torch.save files (optimizer.pt,
        /// pytorch_model.bin, ...) and any other files.
        dir: PathBuf,
        /// Training step of this checkpoint.
        #[arg(long)]
        step: u64,
        /// Branch to commit to (default: the current branch). A new branch
        /// forks from the current branch's tip, or from --parent.
        #[arg(long)]
        branch: Option<String>,
        /// Where a new --branch starts (REV), e.g. `main@500` for a restart.
        #[arg(long, requires = "branch")]
        parent: Option<String>,
        /// A note kept with the commit.
        #[arg(long, short, default_value = "")]
        message: String,
        /// Encode every chunk standalone and losslessly, starting a new chain.
        #[arg(long)]
        keyframe: bool,
        /// lossless, excp, compact, balanced or faithful (default: the store's).
        #[arg(long, value_parser = parse_preset)]
        policy: Option<Policy>,
        /// excp: weight threshold factor alpha (implies --policy excp).
        #[arg(long)]
        alpha: Option<f32>,
        /// excp: momentum threshold factor beta (implies --policy excp).
        #[arg(long)]
        beta: Option<f32>,
        /// excp: bits per code, 2^bits - 1 centres (implies --policy excp).
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=7))]
        bits: Option<u8>,
        /// Tuned policies: W step as a fraction of RMS(W) (makes the policy `custom`).
        #[arg(long)]
        w_step: Option<f32>,
        /// Tuned policies: W step bound as a fraction of RMS(W − Ŵ_parent),
        /// the change since the parent (makes the policy `custom`).
        #[arg(long)]
        w_update_step: Option<f32>,
        /// Tuned policies: m step as a fraction of the RMS of m in units of
        /// the parent's √v̂ + ε, i.e. of Adam's update (before 2026-11-30's
        /// presets: of RMS(m)) (makes the policy `custom`).
        #[arg(long)]
        m_step: Option<f32>,
        /// Tuned policies: v step in natural-log units (makes the policy `custom`).
        #[arg(long)]
        v_log_step: Option<f32>,
        /// Presets: code W without predicting its change from Adam's m̂ and
        /// v̂ (makes the policy `custom`; for comparisons).
        #[arg(long)]
        no_w_prediction: bool,
        /// Commit only rank K's files of a step that N ranks commit at once
        /// (`__K_*.distcp`, `zero_pp_rank_K_*`, `rankK*`; files of no rank
        /// go with rank 0). The step appears once all N shards are in.
        #[arg(long, value_name = "K/N", conflicts_with = "parent")]
        shard: Option<Shard>,
        /// Names the attempt the shards belong to, so that a retried step's
        /// shards never mix with a crashed attempt's (default: torchrun's
        /// run id and restart count, when set).
        #[arg(long, requires = "shard")]
        group: Option<String>,
    },
    /// Commit every checkpoint folder of a run directory (`checkpoint-<step>`,
    /// `step-<step>`, `global_step<step>`) in step order, skipping steps the
    /// branch already has.
    Import {
        /// The run directory (a Trainer's output_dir).
        run_dir: PathBuf,
        #[command(flatten)]
        target: ImportTarget,
    },
    /// Keep importing checkpoint folders as a running trainer writes them.
    Watch {
        /// The run directory (a Trainer's output_dir).
        run_dir: PathBuf,
        #[command(flatten)]
        target: ImportTarget,
        /// Seconds between looks at the run directory.
        #[arg(long, default_value_t = 10.0)]
        interval: f64,
        /// Delete each checkpoint folder once its commit is read back and verified.
        #[arg(long)]
        delete_imported: bool,
        /// Exit after this many seconds without a new checkpoint (default: run until killed).
        #[arg(long)]
        idle_exit: Option<f64>,
    },
    /// Write a commit's files into a directory.
    Checkout {
        /// STEP, BRANCH@STEP, BRANCH, or a commit id prefix (6+ hex digits).
        rev: String,
        #[arg(long, short)]
        output: PathBuf,
        /// Write into a non-empty directory.
        #[arg(long)]
        force: bool,
        /// Do not wait for the files to reach the disk (by default each file
        /// is fsync'ed before it takes its name).
        #[arg(long)]
        no_sync: bool,
        /// Write only rank K's files of a sharded step (see `commit --shard`).
        #[arg(long, value_name = "K/N")]
        shard: Option<Shard>,
    },
    /// Steps whose shards have not all arrived (not sealed, not visible).
    Status,
    /// List commits, newest first.
    Log {
        #[arg(long)]
        branch: Option<String>,
        /// Every commit that a branch or tag reaches.
        #[arg(long, conflicts_with = "branch")]
        all: bool,
        /// Draw the commit graph (implies --all).
        #[arg(long, conflicts_with = "branch")]
        graph: bool,
    },
    /// List branches, create one at REV (`branch NAME REV`), or delete one.
    Branch {
        /// Name of the branch to create.
        name: Option<String>,
        /// Where the new branch starts (default: the current branch's tip).
        rev: Option<String>,
        /// Delete this branch (its commits stay until `gc`).
        #[arg(long, short, value_name = "NAME", conflicts_with_all = ["name", "rev"])]
        delete: Option<String>,
    },
    /// Make NAME the current branch (bare steps and `commit` use it).
    Switch { name: String },
    /// List tags, tag REV as NAME (`tag NAME REV`), or delete a tag.
    Tag {
        name: Option<String>,
        /// The commit to tag (default: the current branch's tip).
        rev: Option<String>,
        #[arg(long, short, value_name = "NAME", conflicts_with_all = ["name", "rev"])]
        delete: Option<String>,
    },
    /// Per-tensor differences between two commits.
    Diff { rev_a: String, rev_b: String },
    /// Delete what no branch or tag reaches and give the space back.
    Gc {
        /// Report what would be removed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Collect garbage on this remote instead of the local store.
        #[arg(long, value_name = "NAME")]
        remote: Option<String>,
        /// Spare objects younger than this many seconds (a concurrent push
        /// may not have moved its ref yet). Matters on remotes.
        #[arg(long, value_name = "SECONDS", default_value_t = 86400.0)]
        grace: f64,
    },
    /// Thin out a branch's history, then gc.
    Prune {
        /// Keep the N newest commits.
        #[arg(long, default_value_t = 1)]
        keep_last: usize,
        /// Keep every commit whose step is a multiple of K.
        #[arg(long)]
        keep_every: Option<u64>,
        /// The branch to prune (default: the current one).
        #[arg(long)]
        branch: Option<String>,
        /// Report what would be dropped; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Verify every blob, record, chunk and ref; non-zero exit on any problem.
    Fsck {
        /// Check this remote instead of the local store.
        #[arg(long, value_name = "NAME")]
        remote: Option<String>,
    },
    /// Manage remotes: `remote add NAME URL`, `remote list`, `remote remove NAME`.
    Remote {
        #[command(subcommand)]
        action: RemoteAction,
    },
    /// Send branches to a remote: only what it lacks, then move its refs
    /// (fast-forward only unless --force).
    Push {
        /// The remote (default: origin).
        remote: Option<String>,
        /// Branches to push (default: the current one).
        branches: Vec<String>,
        /// Push every local branch.
        #[arg(long, conflicts_with = "branches")]
        all: bool,
        /// Also push tags.
        #[arg(long)]
        tags: bool,
        /// Move remote refs even when that drops commits they have.
        #[arg(long)]
        force: bool,
    },
    /// Bring a remote's new commits and set its remote-tracking branches
    /// (`origin/main`).
    Fetch {
        /// The remote (default: origin).
        remote: Option<String>,
    },
    /// Fetch, then fast-forward the current branch to the remote's.
    Pull {
        /// The remote (default: origin).
        remote: Option<String>,
    },
    /// Copy a remote store into a new local one (remote `origin`).
    Clone {
        /// s3://bucket/prefix, gs://…, az://…, or file:///path.
        url: String,
        /// Directory of the new store (default: `.ckptvc`, or --repo).
        dir: Option<PathBuf>,
        /// Take commit records and refs only; each checkout downloads the
        /// chunks its commit needs.
        #[arg(long)]
        lazy: bool,
    },
    /// Per-file and per-tensor details of a commit.
    Show { rev: String },
    /// Store totals; with --plot, a picture of a branch's history.
    Stats {
        /// Also draw stored bytes, ratio and error per step of a branch into
        /// FILE (PNG, or SVG if FILE ends in .svg).
        #[arg(long, value_name = "FILE")]
        plot: Option<PathBuf>,
        /// The branch --plot draws (default: the current branch).
        #[arg(long, requires = "plot")]
        branch: Option<String>,
    },
    /// Print a shell completion script, e.g.
    /// `ckptvc completions bash > ~/.local/share/bash-completion/completions/ckptvc`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `ckptvc man > ~/.local/share/man/man1/ckptvc.1`.
    Man,
}

#[derive(Subcommand, Debug)]
enum RemoteAction {
    /// Add a remote (checks that it is reachable and honours conditional writes).
    Add { name: String, url: String },
    /// List remotes.
    List,
    /// Remove a remote and its remote-tracking branches.
    Remove { name: String },
}

fn wait(cli: &Cli) -> Duration {
    Duration::from_secs_f64(cli.wait.max(0.0))
}

/// `branch` and `tag`: list, create at REV (default: the current branch's
/// tip), or delete.
#[derive(Clone, Copy)]
enum RefKind {
    Branch,
    Tag,
}

fn ref_command(
    cli: &Cli,
    repo: &Repo,
    kind: RefKind,
    name: &Option<String>,
    rev: &Option<String>,
    delete: &Option<String>,
) -> anyhow::Result<()> {
    use repo::history;
    let (action, name, change) = match (name, delete) {
        (_, Some(name)) => {
            let change = match kind {
                RefKind::Branch => history::delete_branch(repo, name, wait(cli))?,
                RefKind::Tag => history::delete_tag(repo, name, wait(cli))?,
            };
            ("deleted", name, change)
        }
        (Some(name), None) => {
            let rev = match rev {
                Some(rev) => rev.clone(),
                None => repo.head_branch()?,
            };
            let change = match kind {
                RefKind::Branch => history::create_branch(repo, name, &rev, wait(cli))?,
                RefKind::Tag => history::create_tag(repo, name, &rev, wait(cli))?,
            };
            ("created", name, change)
        }
        (None, None) => {
            let store = repo;
            match (kind, cli.json) {
                (RefKind::Branch, true) => print_json(&history::branches(store)?)?,
                (RefKind::Branch, false) => {
                    output::print_branches(&history::branches(store)?, cli.palette())
                }
                (RefKind::Tag, true) => print_json(&history::tags(store)?)?,
                (RefKind::Tag, false) => output::print_tags(&history::tags(store)?),
            }
            return Ok(());
        }
    };
    let noun = match kind {
        RefKind::Branch => "branch",
        RefKind::Tag => "tag",
    };
    let id = change.id;
    if cli.json {
        print_json(&change)
    } else {
        if !cli.quiet {
            eprintln!("{action} {noun} `{name}` ({})", id.short());
        }
        Ok(())
    }
}

fn parse_preset(name: &str) -> Result<Policy, String> {
    Policy::preset(name).ok_or_else(|| {
        format!(
            "unknown policy `{name}` (one of {})",
            Policy::PRESETS.join(", ")
        )
    })
}

pub fn main() -> ExitCode {
    match run_args(std::env::args()) {
        0 => ExitCode::SUCCESS,
        2 => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    }
}

/// Runs the command line `args` (program name first) and returns its exit
/// status: 0, 1 on an error (printed), 2 on a usage error. The Python
/// package's `ckptvc` command calls this.
pub fn run_args(args: impl IntoIterator<Item = String>) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match run(&cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(hint) = hint(&e) {
                eprintln!("hint: {hint}");
            }
            1
        }
    }
}

/// The store of remote `name` of `repo`, opened like any store.
fn open_remote(repo: &Repo, name: &str) -> anyhow::Result<Repo> {
    let remotes = repo::remote::remotes(repo)?;
    let remote = remotes.get(name)?;
    Repo::open(&remote.url).map_err(|e| anyhow::Error::new(e).context(format!("remote `{name}`")))
}

fn remote_command(cli: &Cli, repo: &Repo, action: &RemoteAction) -> anyhow::Result<()> {
    match action {
        RemoteAction::Add { name, url } => {
            let remote = repo::remote::add(repo, name, url, wait(cli))?;
            if cli.json {
                return print_json(&remote);
            }
            if !cli.quiet {
                eprintln!("added remote `{}` ({})", remote.name, remote.url);
            }
            if !remote.conditional_writes {
                eprintln!(
                    "warning: {} accepted a second create-only write of one object; pushes to it are refused (two writers could overwrite each other's branches)",
                    remote.url
                );
            }
            Ok(())
        }
        RemoteAction::List => {
            let remotes = repo::remote::remotes(repo)?;
            if cli.json {
                return print_json(&remotes.remotes);
            }
            for r in &remotes.remotes {
                let lazy = if remotes.lazy.as_deref() == Some(&r.name) {
                    " (lazy)"
                } else {
                    ""
                };
                outln!("{}\t{}{lazy}", r.name, r.url);
            }
            Ok(())
        }
        RemoteAction::Remove { name } => {
            let removed = repo::remote::remove(repo, name, wait(cli))?;
            if cli.json {
                return print_json(&removed);
            }
            if !cli.quiet {
                eprintln!("removed remote `{}` ({})", removed.name, removed.url);
            }
            Ok(())
        }
    }
}

/// `stats --plot FILE`: a branch's history drawn into FILE.
#[cfg(feature = "plot")]
fn plot_history(
    cli: &Cli,
    store: &Repo,
    branch: &Option<String>,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    let branch = match branch {
        Some(b) => b.clone(),
        None => store.head_branch()?,
    };
    let entries = repo::log(store, Some(&branch), false)?;
    plot::plot_history(&entries, &branch, path)?;
    if !cli.quiet && !cli.json {
        eprintln!(
            "plotted {} commits of `{branch}` into {}",
            entries.len(),
            path.display()
        );
    }
    Ok(())
}

#[cfg(not(feature = "plot"))]
fn plot_history(
    _cli: &Cli,
    _store: &Repo,
    _branch: &Option<String>,
    _path: &std::path::Path,
) -> anyhow::Result<()> {
    anyhow::bail!("this build of ckptvc has no plotting (build it with the `plot` feature)")
}

/// What to do about a failure, in terms of this command line's flags (the
/// library's messages name no flags).
fn hint(e: &anyhow::Error) -> Option<&'static str> {
    match repo::kind(e) {
        repo::ErrorKind::Locked => Some("pass --wait SECONDS to wait for the other writer"),
        repo::ErrorKind::NotAStore => Some("run `ckptvc init` first, or pass --repo"),
        repo::ErrorKind::Corrupt => Some("run `ckptvc fsck` to see what is damaged"),
        repo::ErrorKind::TooNew => Some("upgrade ckptvc to read this store"),
        repo::ErrorKind::OutputNotEmpty => Some("pass --force to write into it anyway"),
        repo::ErrorKind::NotFastForward => {
            Some("`ckptvc fetch`, then branch from or pull the remote's commits; or push --force")
        }
        _ => None,
    }
}

impl Cli {
    fn palette(&self) -> style::Palette {
        style::Palette::for_stdout(self.color)
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Init { .. }
        | Command::Completions { .. }
        | Command::Man
        | Command::Clone { .. } => run_without_store(cli),
        _ => run_on(cli, &Repo::open(&cli.repo)?),
    }
}

/// The commands that have no store to open (yet).
fn run_without_store(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Init {
            keyframe_interval,
            replay_budget,
            policy,
        } => {
            let config = StoreConfig {
                keyframe_interval: *keyframe_interval,
                replay_budget_ms: (replay_budget * 1000.0).clamp(0.0, u32::MAX as f64) as u32,
                policy: policy.clone(),
                ..StoreConfig::default()
            };
            Repo::init(&cli.repo, &config)?;
            if !cli.quiet {
                eprintln!("initialized empty ckptvc store in {}", cli.repo.display());
            }
            Ok(())
        }
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut command, "ckptvc", &mut script);
            output::write_stdout(format_args!("{}", String::from_utf8_lossy(&script)));
            Ok(())
        }
        Command::Man => {
            let command = <Cli as clap::CommandFactory>::command();
            let mut page = Vec::new();
            clap_mangen::Man::new(command).render(&mut page)?;
            output::write_stdout(format_args!("{}", String::from_utf8_lossy(&page)));
            Ok(())
        }
        Command::Clone { url, dir, lazy } => {
            let dir = dir.clone().unwrap_or_else(|| cli.repo.clone());
            let report = repo::remote::clone(url, &dir, *lazy, &Bar::new(cli.quiet))?;
            if cli.json {
                print_json(&report)
            } else {
                if !cli.quiet {
                    eprintln!(
                        "cloned {} into {} ({} branches, {} commits, {} blobs{})",
                        report.url,
                        report.dir,
                        report.branches.len(),
                        report.fetch.commits_fetched,
                        report.fetch.blobs_fetched,
                        if *lazy {
                            "; lazy: checkouts download what they need"
                        } else {
                            ""
                        }
                    );
                }
                Ok(())
            }
        }
        _ => unreachable!("only commands without a store come here"),
    }
}

fn run_on(cli: &Cli, repo: &Repo) -> anyhow::Result<()> {
    match &cli.command {
        Command::Commit {
            dir,
            step,
            branch,
            parent,
            message,
            keyframe,
            policy,
            alpha,
            beta,
            bits,
            w_step,
            w_update_step,
            m_step,
            v_log_step,
            no_w_prediction,
            shard,
            group,
        } => {
            let knobs = Knobs {
                alpha: *alpha,
                beta: *beta,
                bits: *bits,
                w_step: *w_step,
                w_update_step: *w_update_step,
                m_step: *m_step,
                v_log_step: *v_log_step,
                w_predicted: no_w_prediction.then_some(false),
            };
            let options = CommitOptions {
                step: *step,
                branch: branch.clone(),
                parent: parent.clone(),
                message: message.clone(),
                force_keyframe: *keyframe,
                policy: knobs.apply(policy.clone()).map_err(anyhow::Error::msg)?,
                lock_wait: Duration::from_secs_f64(cli.wait.max(0.0)),
            };
            let bar = Bar::new(cli.quiet);
            if let Some(shard) = shard {
                let group = group.clone().unwrap_or_else(repo::seal::default_group);
                let outcome = repo::commit::commit_shard(
                    repo,
                    &repo::commit::open_shard_input(repo, dir, *shard)?,
                    &options,
                    *shard,
                    &group,
                    &bar,
                )?;
                return if cli.json {
                    print_json(&outcome)
                } else {
                    output::print_shard(&outcome, cli.quiet);
                    Ok(())
                };
            }
            let outcome = repo::commit(repo, dir, &options, &bar)?;
            let entry = &outcome.entry;
            if cli.json {
                print_json(&outcome)?;
            } else {
                outln!("{}", outcome.id);
                if !cli.quiet {
                    eprintln!(
                        "step {} on {}: {} in, {} stored ({} new blobs, {}){}",
                        entry.step,
                        entry.branch,
                        bytes(entry.input_bytes),
                        bytes(entry.stored_bytes),
                        outcome.new_blobs,
                        output::ratio(entry.ratio),
                        if entry.keyframe { ", keyframe" } else { "" }
                    );
                    for note in &outcome.notes {
                        eprintln!("note: {note}");
                    }
                    if outcome.bases_decoded > 0 {
                        eprintln!(
                            "{} delta base chunks were decoded from blobs (no usable \
                             reconstruction cache for the parent)",
                            outcome.bases_decoded
                        );
                    }
                }
            }
            Ok(())
        }
        Command::Import { run_dir, target } => {
            let bar = Bar::new(cli.quiet);
            let report = repo::import::import(repo, run_dir, &target.options(cli), &bar)?;
            if cli.json {
                print_json(&report)
            } else {
                output::print_import(&report, cli.quiet);
                Ok(())
            }
        }
        Command::Watch {
            run_dir,
            target,
            interval,
            delete_imported,
            idle_exit,
        } => {
            let options = repo::import::WatchOptions {
                import: target.options(cli),
                interval: Duration::from_secs_f64(interval.max(0.01)),
                delete_imported: *delete_imported,
                idle_exit: idle_exit.map(|s| Duration::from_secs_f64(s.max(0.0))),
            };
            let events = output::WatchPrinter {
                json: cli.json,
                quiet: cli.quiet,
            };
            let report = repo::import::watch(repo, run_dir, &options, &events)?;
            if !cli.json {
                output::print_import(&report, cli.quiet);
            }
            Ok(())
        }
        Command::Checkout {
            rev,
            output,
            force,
            no_sync,
            shard,
        } => {
            let bar = Bar::new(cli.quiet);
            let options = repo::CheckoutOptions {
                lock_wait: wait(cli),
                force: *force,
                no_sync: *no_sync,
                shard: *shard,
            };
            let outcome = repo::checkout(repo, rev, output, options, &bar)?;
            if cli.json {
                print_json(&outcome)?;
            } else if !cli.quiet {
                eprintln!(
                    "checked out {} ({} files, {}) into {}",
                    outcome.id.short(),
                    outcome.files.len(),
                    bytes(outcome.bytes),
                    output.display()
                );
            }
            Ok(())
        }
        Command::Remote { action } => remote_command(cli, repo, action),
        Command::Push {
            remote,
            branches,
            all,
            tags,
            force,
        } => {
            let options = repo::remote::PushOptions {
                branches: branches.clone(),
                all: *all,
                tags: *tags,
                force: *force,
                lock_wait: wait(cli),
            };
            let name = remote.as_deref().unwrap_or("origin");
            let report = repo::remote::push(repo, name, &options, &Bar::new(cli.quiet))?;
            if cli.json {
                print_json(&report)
            } else {
                output::print_push(&report, cli.quiet);
                Ok(())
            }
        }
        Command::Fetch { remote } | Command::Pull { remote } => {
            let name = remote.as_deref().unwrap_or("origin");
            let bar = Bar::new(cli.quiet);
            let report = if matches!(cli.command, Command::Pull { .. }) {
                repo::remote::pull(repo, name, wait(cli), &bar)?
            } else {
                repo::remote::fetch(repo, name, wait(cli), &bar)?
            };
            if cli.json {
                print_json(&report)
            } else {
                output::print_fetch(&report, cli.quiet);
                Ok(())
            }
        }
        Command::Log { graph: true, .. } => {
            let lines = repo::graph::graph(repo)?;
            if cli.json {
                let nodes: Vec<_> = lines.into_iter().filter_map(|l| l.node()).collect();
                print_json(&nodes)
            } else {
                output::print_graph(&lines);
                Ok(())
            }
        }
        Command::Log { branch, all, .. } => {
            let store = repo;
            let entries = repo::log(store, branch.as_deref(), *all)?;
            if cli.json {
                print_json(&entries)
            } else {
                output::print_log(&entries, cli.palette());
                Ok(())
            }
        }
        Command::Status => {
            let pending = repo::seal::pending(repo)?;
            if cli.json {
                print_json(&pending)
            } else {
                output::print_pending(&pending);
                Ok(())
            }
        }
        Command::Show { rev } => {
            let store = repo;
            let report = repo::inspect::show(store, rev)?;
            if cli.json {
                print_json(&report)
            } else {
                output::print_show(&report);
                Ok(())
            }
        }
        Command::Branch { name, rev, delete } => {
            ref_command(cli, repo, RefKind::Branch, name, rev, delete)
        }
        Command::Switch { name } => {
            let change = repo::history::switch(repo, name, wait(cli))?;
            if cli.json {
                print_json(&change)
            } else {
                if !cli.quiet {
                    eprintln!("switched to branch `{name}` (tip {})", change.id.short());
                }
                Ok(())
            }
        }
        Command::Tag { name, rev, delete } => {
            ref_command(cli, repo, RefKind::Tag, name, rev, delete)
        }
        Command::Diff { rev_a, rev_b } => {
            let store = repo;
            let report = repo::diff::diff(store, rev_a, rev_b)?;
            if cli.json {
                print_json(&report)
            } else {
                output::print_diff(&report);
                Ok(())
            }
        }
        Command::Gc {
            dry_run,
            remote,
            grace,
        } => {
            let options = repo::gc::GcOptions {
                dry_run: *dry_run,
                lock_wait: wait(cli),
                grace: Duration::from_secs_f64(grace.max(0.0)),
            };
            let report = match remote {
                Some(name) => repo::gc::gc(&open_remote(repo, name)?, &options)?,
                None => repo::gc::gc(repo, &options)?,
            };
            if cli.json {
                print_json(&report)
            } else {
                output::print_gc(&report);
                Ok(())
            }
        }
        Command::Prune {
            keep_last,
            keep_every,
            branch,
            dry_run,
        } => {
            let options = repo::prune::PruneOptions {
                branch: branch.clone(),
                keep_last: *keep_last,
                keep_every: *keep_every,
                dry_run: *dry_run,
                lock_wait: wait(cli),
            };
            let report = repo::prune::prune(repo, &options)?;
            if cli.json {
                print_json(&report)
            } else {
                output::print_prune(&report);
                Ok(())
            }
        }
        Command::Fsck { remote } => {
            let report = match remote {
                Some(name) => repo::fsck::fsck(&open_remote(repo, name)?)?,
                None => repo::fsck::fsck(repo)?,
            };
            if cli.json {
                print_json(&report)?;
            } else {
                output::print_fsck(&report, cli.palette());
            }
            if !report.ok() {
                anyhow::bail!("fsck found {} problem(s)", report.problems.len());
            }
            Ok(())
        }
        Command::Stats { plot, branch } => {
            let store = repo;
            let stats = repo::stats(store)?;
            if let Some(path) = plot {
                plot_history(cli, store, branch, path)?;
            }
            if cli.json {
                print_json(&stats)
            } else {
                output::print_stats(&stats);
                Ok(())
            }
        }
        Command::Init { .. }
        | Command::Clone { .. }
        | Command::Completions { .. }
        | Command::Man => unreachable!("commands without a store run elsewhere"),
    }
}
