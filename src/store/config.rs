//! The settings fixed when a store is made, kept with the store whatever its
//! backend (RocksDB's `meta/config`, a remote's `config` object).

use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::codec::policy::Policy;

/// Version of [`StoreConfig`]'s layout.
pub const CONFIG_VERSION: u32 = 1;

/// Settings fixed at `init`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreConfig {
    pub version: u32,
    /// Longest chain: a lossless keyframe commit at least every this many
    /// commits along a chain.
    pub keyframe_interval: u32,
    /// A keyframe also comes as soon as checking out the new commit would mean
    /// replaying more than this many milliseconds of decoding (estimated).
    pub replay_budget_ms: u32,
    /// Upper bound on a chunk's raw size (chunks hold `chunk_bytes / 4`
    /// elements whatever the dtype).
    pub chunk_bytes: u32,
    /// Policy of commits that do not name one.
    pub policy: Policy,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            version: CONFIG_VERSION,
            keyframe_interval: 100,
            replay_budget_ms: 60_000,
            chunk_bytes: 4 << 20,
            policy: Policy::preset("balanced").expect("a preset"),
        }
    }
}

impl StoreConfig {
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("serializing to a Vec cannot fail")
    }

    /// Decodes and checks a stored config.
    pub fn from_bytes(bytes: &[u8]) -> Result<StoreConfig, StoreError> {
        let corrupt = |detail: String| StoreError::Corrupt {
            what: "store config".into(),
            detail,
        };
        let config: StoreConfig =
            postcard::from_bytes(bytes).map_err(|e| corrupt(e.to_string()))?;
        if config.version != CONFIG_VERSION {
            return Err(corrupt(format!(
                "version {} is not supported",
                config.version
            )));
        }
        // A chunk holds `chunk_bytes / 4` elements of up to 8 bytes; decoders
        // refuse blobs over MAX_RAW_LEN, so a larger setting would store
        // chunks that could never be read back.
        if config.chunk_bytes == 0 || config.chunk_bytes as u64 * 2 > crate::codec::MAX_RAW_LEN {
            return Err(corrupt(format!(
                "chunk_bytes {} is outside 1..={}",
                config.chunk_bytes,
                crate::codec::MAX_RAW_LEN / 2
            )));
        }
        Ok(config)
    }
}
