//! ckptvc: a content-addressed, versioned store for training checkpoints.
//!
//! Layers, each depending only on those above it in this list:
//! - [`format`]: reading checkpoint directories and safetensors files;
//! - [`codec`]: pure chunk encoders and decoders;
//! - [`store`]: RocksDB objects, refs, locking;
//! - [`repo`]: the operations (commit, checkout, log, show, stats);
//! - `cli` (in the binary): argument parsing, output, progress bars.

pub mod cli;
pub mod codec;
pub mod format;
pub mod repo;
pub mod store;
