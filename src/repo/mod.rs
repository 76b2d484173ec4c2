//! The `repo` layer: the operations a user runs (init, commit, checkout, log,
//! show, stats), built on the store and the codecs. Everything the CLI prints
//! comes from here as plain data, so a library user gets the same answers.

pub mod checkout;
pub mod commit;
pub mod diff;
pub mod fsck;
pub mod gc;
pub mod graph;
pub mod history;
pub mod import;
pub mod inspect;
pub mod progress;
pub mod prune;
pub mod reconstruct;
pub mod rev;
pub mod tipcache;

use std::path::Path;

pub use checkout::{CheckoutOptions, CheckoutOutcome, checkout};
pub use commit::{CommitOptions, commit};
pub use inspect::{LogEntry, Stats, TensorReport, log, show, stats};
pub use progress::{NoProgress, Progress};
pub use rev::resolve;

use crate::store::{Store, StoreConfig};

/// Creates an empty store at `root`.
pub fn init(root: &Path, config: &StoreConfig) -> anyhow::Result<()> {
    if config.keyframe_interval == 0 {
        anyhow::bail!("--keyframe-interval must be at least 1");
    }
    Store::init(root, config)?;
    Ok(())
}
