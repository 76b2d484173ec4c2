//! ckptvc: a content-addressed, versioned store for training checkpoints.
//!
//! Layers, each depending only on those above it in this list:
//! - [`format`]: reading checkpoint directories and safetensors files;
//! - [`codec`]: pure chunk encoders and decoders;
//! - [`store`]: RocksDB objects, refs, locking;
//! - [`repo`]: the operations (commit, checkout, log, show, stats);
//! - `cli` (in the binary): argument parsing, output, progress bars.

pub mod codec;
pub mod format;

#[cfg(feature = "store")]
pub mod cli;
#[cfg(feature = "store")]
pub mod repo;
#[cfg(feature = "store")]
pub mod store;
