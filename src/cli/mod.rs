//! The `cli` layer: argument parsing, human and JSON output, progress bars.
//! It only translates; every operation lives in [`crate::repo`].

mod output;
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::repo::{self, CommitOptions};
use crate::store::{Store, StoreConfig};
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
    /// Seconds to wait for another writer to release the store.
    #[arg(long, global = true, default_value_t = 0.0)]
    wait: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create an empty store.
    Init {
        /// Take a lossless keyframe commit every K commits along a branch.
        #[arg(long, default_value_t = 10)]
        keyframe_interval: u32,
    },
    /// Store a checkpoint directory as a new commit.
    Commit {
        /// The checkpoint directory (*.safetensors and any other files).
        dir: PathBuf,
        /// Training step of this checkpoint.
        #[arg(long)]
        step: u64,
        /// Branch to commit to (default: the current branch).
        #[arg(long)]
        branch: Option<String>,
        #[arg(long, short, default_value = "")]
        message: String,
        /// Encode every chunk standalone, starting a new delta chain.
        #[arg(long)]
        keyframe: bool,
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
    },
    /// List commits, newest first.
    Log {
        #[arg(long)]
        branch: Option<String>,
        /// Every commit of every branch.
        #[arg(long, conflicts_with = "branch")]
        all: bool,
    },
    /// Per-file and per-tensor details of a commit.
    Show { rev: String },
    /// Store totals.
    Stats,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Init { keyframe_interval } => {
            let config = StoreConfig {
                keyframe_interval: *keyframe_interval,
                ..StoreConfig::default()
            };
            repo::init(&cli.repo, &config)?;
            if !cli.quiet {
                eprintln!("initialized empty ckptvc store in {}", cli.repo.display());
            }
            Ok(())
        }
        Command::Commit {
            dir,
            step,
            branch,
            message,
            keyframe,
        } => {
            let options = CommitOptions {
                step: *step,
                branch: branch.clone(),
                message: message.clone(),
                force_keyframe: *keyframe,
                lock_wait: Duration::from_secs_f64(cli.wait.max(0.0)),
            };
            let bar = Bar::new(cli.quiet);
            let outcome = repo::commit(&cli.repo, dir, &options, &bar)?;
            let entry = repo::LogEntry::new(&outcome.id, &outcome.record);
            if cli.json {
                print_json(&entry)?;
            } else {
                println!("{}", outcome.id);
                if !cli.quiet {
                    eprintln!(
                        "step {} on {}: {} in, {} stored ({} new blobs, {:.1}x){}",
                        entry.step,
                        entry.branch,
                        bytes(entry.input_bytes),
                        bytes(entry.stored_bytes),
                        outcome.new_blobs,
                        entry.ratio,
                        if entry.keyframe { ", keyframe" } else { "" }
                    );
                }
            }
            Ok(())
        }
        Command::Checkout { rev, output, force } => {
            let bar = Bar::new(cli.quiet);
            let outcome = repo::checkout(&cli.repo, rev, output, *force, &bar)?;
            if cli.json {
                print_json(&serde_json::json!({
                    "id": outcome.id.to_hex(),
                    "files": outcome.files,
                    "bytes": outcome.bytes,
                }))?;
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
        Command::Log { branch, all } => {
            let store = Store::open_read(&cli.repo)?;
            let entries = repo::log(&store, branch.as_deref(), *all)?;
            if cli.json {
                print_json(&entries)
            } else {
                output::print_log(&entries);
                Ok(())
            }
        }
        Command::Show { rev } => {
            let store = Store::open_read(&cli.repo)?;
            let report = repo::inspect::show(&store, rev)?;
            if cli.json {
                print_json(&report)
            } else {
                output::print_show(&report);
                Ok(())
            }
        }
        Command::Stats => {
            let store = Store::open_read(&cli.repo)?;
            let stats = repo::stats(&store)?;
            if cli.json {
                print_json(&stats)
            } else {
                output::print_stats(&stats);
                Ok(())
            }
        }
    }
}
