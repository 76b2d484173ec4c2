//! The `repo` layer: the operations a user runs (init, commit, checkout, log,
//! show, stats, ...), built on the store and the codecs. Every operation
//! takes an open [`Repo`]; everything the CLI prints comes from here as
//! plain data that serializes, so a library user gets the same answers and
//! `--json` prints the outcome itself.

pub(crate) mod cache_io;
pub mod checkout;
pub mod commit;
pub mod diff;
pub mod error;
pub mod fsck;
pub mod gc;
pub mod graph;
pub mod history;
pub mod import;
pub mod inspect;
pub mod load;
pub mod progress;
pub mod prune;
pub mod reconstruct;
pub mod remote;
pub mod repository;
pub mod rev;
pub mod seal;
pub mod tipcache;
pub mod walk;

pub use checkout::{CheckoutOptions, CheckoutOutcome, checkout};
pub use commit::{CommitOptions, CommitOutcome, commit, commit_checkpoint};
pub use error::{ErrorKind, RepoError, kind};
pub use inspect::{LogEntry, Stats, TensorReport, log, show, stats};
pub use progress::{NoProgress, Progress};
pub use repository::Repo;
pub use rev::resolve;
