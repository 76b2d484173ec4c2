//! [`Repo`]: the one way to open a store for any operation. A `Repo` is a
//! view of a store, wherever it is kept, plus where its local tip cache
//! lives; operations that change the store take the same `Repo` and get a
//! writer from it ([`Repo::write`]) after checking their preconditions.
//!
//! The repo layer reaches storage only through [`Backend`], which a `Repo`
//! dereferences to, so every operation runs on every backend: a local
//! directory (RocksDB) or a bucket (`s3://`, `gs://`, `az://`, `file://`).

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::store::{Backend, BucketStore, ObjectId, RocksStore, StoreConfig, StoreError};

/// Where a store is.
#[derive(Debug, Clone)]
enum Place {
    /// A local directory (RocksDB).
    Dir(PathBuf),
    /// A bucket URL, and the local directory of its tip cache.
    Bucket { url: String, cache: PathBuf },
}

/// An open store.
pub struct Repo {
    place: Place,
    backend: Box<dyn Backend>,
}

/// Whether `location` names a bucket (`scheme://...`) rather than a path.
pub fn is_url(location: &str) -> bool {
    location.split_once("://").is_some_and(|(scheme, _)| {
        !scheme.is_empty() && scheme.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

/// The local cache directory of a bucket store: one per URL, under the
/// user's cache directory.
fn bucket_cache_dir(url: &str) -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("ckptvc")
        .join(ObjectId::of(url.trim_end_matches('/').as_bytes()).short())
}

impl Repo {
    /// Creates an empty store at `location` (a directory, or a bucket URL).
    pub fn init(location: impl AsRef<Path>, config: &StoreConfig) -> anyhow::Result<Repo> {
        let location = location.as_ref();
        if config.keyframe_interval == 0 {
            anyhow::bail!("the keyframe interval must be at least 1");
        }
        match location.to_str().filter(|l| is_url(l)) {
            Some(url) => {
                if BucketStore::connect(url)?.exists()? {
                    return Err(StoreError::AlreadyExists(location.to_path_buf()).into());
                }
                drop(BucketStore::open_or_create(url, config)?);
            }
            None => drop(RocksStore::init(location, config)?),
        }
        Ok(Repo::open(location)?)
    }

    /// Opens the store at `location` (a directory, or a bucket URL). A local
    /// store is seen as it was when opened (a consistent snapshot; see
    /// [`Repo::reopen`]); a bucket is read afresh at every call.
    pub fn open(location: impl AsRef<Path>) -> Result<Repo, StoreError> {
        let location = location.as_ref();
        match location.to_str().filter(|l| is_url(l)) {
            Some(url) => Ok(Repo {
                place: Place::Bucket {
                    url: url.to_string(),
                    cache: bucket_cache_dir(url),
                },
                backend: Box::new(BucketStore::open(url)?),
            }),
            None => Ok(Repo {
                place: Place::Dir(location.to_path_buf()),
                backend: Box::new(RocksStore::open_read(location)?),
            }),
        }
    }

    /// A new view of the same store, which sees every commit published
    /// since this one was opened (its own included).
    pub fn reopen(&self) -> Result<Repo, StoreError> {
        match &self.place {
            Place::Dir(root) => Repo::open(root),
            Place::Bucket { url, .. } => Repo::open(url),
        }
    }

    /// A writer on this store. For a local store: takes the writer lock
    /// (waiting up to `wait`), runs `check` on a fresh view under the lock,
    /// and only if it passes opens the store for writing, so a refused
    /// operation leaves the store exactly as it was. A bucket has no lock:
    /// writers there serialize on their refs' compare-and-swap.
    pub fn write<T>(
        &self,
        wait: Duration,
        check: impl FnOnce(&Repo) -> anyhow::Result<T>,
    ) -> anyhow::Result<(Repo, T)> {
        match &self.place {
            Place::Dir(root) => {
                let lock = RocksStore::lock(root, wait)?;
                let checked = check(&self.reopen()?)?;
                let writer = RocksStore::open_writable(root, lock)?;
                let repo = Repo {
                    place: self.place.clone(),
                    backend: Box::new(writer),
                };
                Ok((repo, checked))
            }
            Place::Bucket { .. } => {
                let view = self.reopen()?;
                let checked = check(&view)?;
                Ok((view, checked))
            }
        }
    }

    /// The store's directory, for a local store.
    pub fn local_root(&self) -> Option<&Path> {
        match &self.place {
            Place::Dir(root) => Some(root),
            Place::Bucket { .. } => None,
        }
    }

    /// Where the store is: its directory or its URL.
    pub fn location(&self) -> String {
        self.backend.location()
    }

    /// The reconstruction cache of branch tips: always local, whatever the
    /// backend, and safe to delete.
    pub fn cache_dir(&self) -> PathBuf {
        match &self.place {
            Place::Dir(root) => root.join("cache"),
            Place::Bucket { cache, .. } => cache.clone(),
        }
    }

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }
}

impl Deref for Repo {
    type Target = dyn Backend;

    fn deref(&self) -> &(dyn Backend + 'static) {
        self.backend.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::is_url;

    #[test]
    fn urls_are_told_from_paths() {
        assert!(is_url("s3://bucket/prefix"));
        assert!(is_url("file:///tmp/x"));
        assert!(!is_url("/tmp/x"));
        assert!(!is_url("relative/dir"));
        assert!(!is_url("weird dir://x"));
    }
}
