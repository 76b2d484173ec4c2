//! Progress reporting as a callback, so the library stays free of terminal
//! concerns; the CLI plugs in an indicatif bar.

/// Receives progress of a long operation, in bytes. Called from worker threads.
pub trait Progress: Sync {
    fn begin(&self, _label: &str, _total_bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {}
