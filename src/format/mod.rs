//! The `format` layer: reading checkpoint directories and the files in them.
//! Nothing here knows about codecs or the store.

pub mod checkpoint;
pub mod dcp;
pub mod direct;
pub mod memory;
pub mod pairing;
pub mod plain;
pub mod safetensors;
pub mod torch;
pub mod zero;

use std::path::PathBuf;

pub use checkpoint::{Checkpoint, InputFile, InputKind};
pub use memory::{MemoryCheckpoint, MemoryFile, MemoryTensor};
pub use plain::{Plain, as_bytes, pread_into, read_range};

/// A problem with the user's input files.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{}: {what}", path.display())]
    Safetensors { path: PathBuf, what: String },
    #[error("{}: {what}", path.display())]
    Directory { path: PathBuf, what: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FormatError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FormatError::Io {
            path: path.into(),
            source,
        }
    }
}
