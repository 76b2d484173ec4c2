//! The object-storage backend: a store kept in a bucket (S3 and what speaks
//! it, GCS, Azure, or a plain directory through `file://`), through the
//! `object_store` crate. Its tokio runtime is private: callers see blocking
//! calls, like the RocksDB backend's.
//!
//! Objects are immutable and content-addressed, except `HEAD`. Blobs are
//! grouped into packs of about [`PACK_TARGET`] bytes with an index object
//! each, so a checkpoint of thousands of chunks costs a few dozen PUTs, and
//! one blob is read with one ranged GET. A writer uploads in the order packs
//! → indexes → commits → refs, so no ref ever points at something missing.
//!
//! Refs are logs: each update *creates* the next entry
//! `refs/<kind>/<name>/<seq>` with a create-only PUT (`If-None-Match: *`),
//! and the entry with the highest sequence number is the ref. Two writers
//! that read the same entry both try to create the next one; the store lets
//! exactly one succeed and the other gets [`StoreError::RefMoved`]. Only
//! create-only writes are needed (no `If-Match`), which every backend of
//! `object_store` supports, the local file system included.
//! [`BucketStore::probe_conditional_writes`] checks that a server honours
//! them before anyone relies on it.

pub mod layout;
mod pending;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as KeyPath;
use object_store::prefix::PrefixStore;
use object_store::{
    ClientConfigKey, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
};
use serde::Serialize;

use layout::{PackBuilder, PackEntry, PackIndex, RefEntry};

use super::StoreError;
use super::backend::{Backend, BlobStore, MetaStore, RefKind};
use super::config::StoreConfig;
use super::object::{CommitRecord, ObjectId, pack_record, unpack_record};
use super::pending::{PendingInfo, PendingKey, ShardSink};
use super::refs::RefEdit;

/// Packs are sealed and uploaded once they reach this size ("tens of MB":
/// few requests, and a bounded amount of memory per upload in flight).
/// `CKPTVC_PACK_BYTES` overrides it (tests use small packs to get many).
pub const PACK_TARGET: usize = 32 << 20;

fn pack_target() -> usize {
    std::env::var("CKPTVC_PACK_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or(PACK_TARGET)
}
/// Packs uploading at once (each holds up to about [`PACK_TARGET`] bytes).
const UPLOADS_IN_FLIGHT: usize = 4;
/// Ranged GETs at once when fetching many blobs.
const DOWNLOADS_IN_FLIGHT: usize = 8;
/// Neighbouring blobs of one pack are fetched with one GET when the gap
/// between them is at most this, up to [`MAX_RANGE`] per GET.
const RANGE_GAP: u64 = 256 << 10;
const MAX_RANGE: u64 = 16 << 20;

/// Requests and bytes a [`BucketStore`] has made and moved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Traffic {
    pub puts: u64,
    pub gets: u64,
    pub lists: u64,
    pub deletes: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

#[derive(Default)]
struct Counters {
    puts: AtomicU64,
    gets: AtomicU64,
    lists: AtomicU64,
    deletes: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

/// Where a blob is: which pack, which bytes.
#[derive(Debug, Clone, Copy)]
struct Location {
    pack: ObjectId,
    offset: u64,
    len: u64,
}

/// One ranged GET of a pack: the pack, the byte range, and the blobs in it.
type RangedGet = (ObjectId, Range<u64>, Vec<(ObjectId, Location)>);

type Upload = tokio::task::JoinHandle<Result<PackIndex, StoreError>>;

/// A store in a bucket (or under a prefix of one).
pub struct BucketStore {
    url: String,
    store: Arc<dyn ObjectStore>,
    runtime: tokio::runtime::Runtime,
    /// Every blob of every pack whose index has been read or written;
    /// `None` until first needed (one LIST plus one GET per pack).
    index: RwLock<Option<HashMap<ObjectId, Location>>>,
    pending: Mutex<PackBuilder>,
    /// Blobs of sealed packs whose upload has not finished (not in `pending`
    /// any more, not in `index` yet).
    uploading: Mutex<HashSet<ObjectId>>,
    uploads: Mutex<Vec<Upload>>,
    counters: Arc<Counters>,
}

fn env_secs(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(default)
}

/// Transient failures (connection errors, 5xx, throttling) are retried
/// with exponential backoff for up to `CKPTVC_REMOTE_RETRY_SECS` (30 s).
fn retry() -> RetryConfig {
    RetryConfig {
        max_retries: 10,
        retry_timeout: Duration::from_secs(env_secs("CKPTVC_REMOTE_RETRY_SECS", 30)),
        ..RetryConfig::default()
    }
}

/// Per-request timeouts, as client settings on top of what the cloud's
/// environment configured (`with_client_options` would replace those,
/// `AWS_ALLOW_HTTP` among them): `CKPTVC_REMOTE_TIMEOUT_SECS` (120 s) for
/// a whole request, 10 s to connect.
fn timeouts() -> [(ClientConfigKey, String); 2] {
    [
        (
            ClientConfigKey::Timeout,
            format!("{}s", env_secs("CKPTVC_REMOTE_TIMEOUT_SECS", 120)),
        ),
        (ClientConfigKey::ConnectTimeout, "10s".to_string()),
    ]
}

/// The object store and key prefix a URL names. Credentials and endpoints
/// come from each cloud's usual environment (`AWS_*`, `GOOGLE_*`,
/// `AZURE_*`); none is ever stored.
fn open_url(url: &str) -> Result<Arc<dyn ObjectStore>, StoreError> {
    let bad = |detail: String| StoreError::Remote {
        remote: url.to_string(),
        detail,
    };
    let parsed = url::Url::parse(url).map_err(|e| bad(format!("not a URL: {e}")))?;
    let prefix = parsed.path().trim_matches('/').to_string();
    let inner: Arc<dyn ObjectStore> = match parsed.scheme() {
        "s3" | "s3a" => {
            use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
            let builder = timeouts().into_iter().fold(
                AmazonS3Builder::from_env()
                    .with_url(url)
                    .with_retry(retry()),
                |b, (key, value)| b.with_config(AmazonS3ConfigKey::Client(key), value),
            );
            Arc::new(builder.build().map_err(|e| bad(describe(&e)))?)
        }
        "gs" => {
            use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
            let builder = timeouts().into_iter().fold(
                GoogleCloudStorageBuilder::from_env()
                    .with_url(url)
                    .with_retry(retry()),
                |b, (key, value)| b.with_config(GoogleConfigKey::Client(key), value),
            );
            Arc::new(builder.build().map_err(|e| bad(describe(&e)))?)
        }
        "az" | "azure" | "abfs" | "abfss" => {
            use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
            let builder = timeouts().into_iter().fold(
                MicrosoftAzureBuilder::from_env()
                    .with_url(url)
                    .with_retry(retry()),
                |b, (key, value)| b.with_config(AzureConfigKey::Client(key), value),
            );
            Arc::new(builder.build().map_err(|e| bad(describe(&e)))?)
        }
        "file" => {
            let dir = parsed
                .to_file_path()
                .map_err(|_| bad("a file:// URL needs an absolute path".into()))?;
            std::fs::create_dir_all(&dir).map_err(|e| StoreError::io(&dir, e))?;
            let local = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| bad(describe(&e)))?;
            return Ok(Arc::new(local));
        }
        "memory" => return Ok(Arc::new(object_store::memory::InMemory::new())),
        other => {
            return Err(bad(format!(
                "unknown scheme `{other}://` (use s3://, gs://, az:// or file://)"
            )));
        }
    };
    if prefix.is_empty() {
        Ok(inner)
    } else {
        Ok(Arc::new(PrefixStore::new(inner, prefix.as_str())))
    }
}

/// One line about an object-store error: its kind and the server's reason,
/// without request dumps (and never a credential: object_store does not
/// print them).
fn describe(e: &object_store::Error) -> String {
    use object_store::Error as E;
    let text = match e {
        E::Unauthenticated { .. } | E::PermissionDenied { .. } => {
            "access denied: the server refused the credentials, or they may not use this bucket (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the cloud's login)".to_string()
        }
        _ => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                let more = s.to_string();
                if !text.contains(&more) {
                    text.push_str(": ");
                    text.push_str(&more);
                }
                source = s.source();
            }
            text
        }
    };
    let line = text.lines().next().unwrap_or_default().to_string();
    if line.len() > 400 {
        format!("{}…", &line[..400])
    } else {
        line
    }
}

fn key(text: &str) -> KeyPath {
    KeyPath::from(text)
}

impl BucketStore {
    /// Connects to the store at `url` (nothing is read yet).
    pub fn connect(url: &str) -> Result<BucketStore, StoreError> {
        let store = open_url(url)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ckptvc-remote")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Remote {
                remote: url.to_string(),
                detail: format!("cannot start the I/O runtime: {e}"),
            })?;
        Ok(BucketStore {
            url: url.to_string(),
            store,
            runtime,
            index: RwLock::new(None),
            pending: Mutex::new(PackBuilder::default()),
            uploading: Mutex::new(HashSet::new()),
            uploads: Mutex::new(Vec::new()),
            counters: Arc::new(Counters::default()),
        })
    }

    /// Opens an existing store at `url`.
    pub fn open(url: &str) -> Result<BucketStore, StoreError> {
        let bucket = Self::connect(url)?;
        match bucket.get_opt(layout::FORMAT_KEY)? {
            Some(bytes) if bytes == layout::FORMAT_LINE.as_bytes() => Ok(bucket),
            Some(bytes) => Err(bucket.remote_error(format!(
                "FORMAT says `{}`, expected `{}`",
                String::from_utf8_lossy(&bytes).trim(),
                layout::FORMAT_LINE.trim()
            ))),
            None => Err(bucket.remote_error("no ckptvc store there (push to it first)".into())),
        }
    }

    /// Opens the store at `url`, making an empty one with `config` when
    /// there is none (the first push).
    pub fn open_or_create(url: &str, config: &StoreConfig) -> Result<BucketStore, StoreError> {
        let bucket = Self::connect(url)?;
        if bucket.get_opt(layout::FORMAT_KEY)?.is_none() {
            // Config before FORMAT: FORMAT's presence means complete.
            bucket.put_create(layout::CONFIG_KEY, config.to_bytes())?;
            bucket.put_create(layout::HEAD_KEY, b"main".to_vec())?;
            bucket.put_create(layout::FORMAT_KEY, layout::FORMAT_LINE.as_bytes().to_vec())?;
        }
        Self::open(url)
    }

    /// Whether a store (its `FORMAT` object) is there.
    pub fn exists(&self) -> Result<bool, StoreError> {
        Ok(self.get_opt(layout::FORMAT_KEY)?.is_some())
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Requests and bytes so far.
    pub fn traffic(&self) -> Traffic {
        let c = &self.counters;
        Traffic {
            puts: c.puts.load(Ordering::Relaxed),
            gets: c.gets.load(Ordering::Relaxed),
            lists: c.lists.load(Ordering::Relaxed),
            deletes: c.deletes.load(Ordering::Relaxed),
            bytes_up: c.bytes_up.load(Ordering::Relaxed),
            bytes_down: c.bytes_down.load(Ordering::Relaxed),
        }
    }

    fn remote_error(&self, detail: String) -> StoreError {
        StoreError::Remote {
            remote: self.url.clone(),
            detail,
        }
    }

    fn error(&self, what: &str, e: &object_store::Error) -> StoreError {
        self.remote_error(format!("{what}: {}", describe(e)))
    }

    /// Checks that the server refuses a second create-only PUT of one key,
    /// which refs rely on. Writes and deletes one small object.
    pub fn probe_conditional_writes(&self) -> Result<bool, StoreError> {
        let nonce = ObjectId::of(
            format!("{}-{:?}", std::process::id(), std::time::SystemTime::now()).as_bytes(),
        );
        let probe = format!("{}/{}", layout::PROBE, nonce.short());
        let first = self.put_create(&probe, b"1".to_vec())?;
        let second = self.put_create(&probe, b"2".to_vec())?;
        self.delete_key(&probe)?;
        Ok(first && !second)
    }

    // --- object I/O --------------------------------------------------------

    fn get_opt(&self, k: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        let result = self.runtime.block_on(async {
            match self.store.get(&key(k)).await {
                Ok(r) => r.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        match result {
            Ok(bytes) => {
                let bytes = bytes.map(|b| b.to_vec());
                let n = bytes.as_ref().map_or(0, |b| b.len() as u64);
                self.counters.bytes_down.fetch_add(n, Ordering::Relaxed);
                Ok(bytes)
            }
            Err(e) => Err(self.error(&format!("reading {k}"), &e)),
        }
    }

    /// A create-only PUT: `Ok(false)` when the key already exists.
    fn put_create(&self, k: &str, bytes: Vec<u8>) -> Result<bool, StoreError> {
        self.runtime
            .block_on(put_create(&self.store, &self.counters, k, bytes))
            .map_err(|e| self.error(&format!("writing {k}"), &e))
    }

    fn put_overwrite(&self, k: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_up
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.runtime
            .block_on(self.store.put(&key(k), PutPayload::from(bytes)))
            .map(|_| ())
            .map_err(|e| self.error(&format!("writing {k}"), &e))
    }

    fn delete_key(&self, k: &str) -> Result<(), StoreError> {
        self.counters.deletes.fetch_add(1, Ordering::Relaxed);
        match self.runtime.block_on(self.store.delete(&key(k))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(&format!("deleting {k}"), &e)),
        }
    }

    /// Every key under `prefix` (a folder, with its trailing `/`) with its
    /// size and age.
    fn list(&self, prefix: &str) -> Result<Vec<object_store::ObjectMeta>, StoreError> {
        self.counters.lists.fetch_add(1, Ordering::Relaxed);
        let folder = key(prefix.trim_end_matches('/'));
        self.runtime
            .block_on(self.store.list(Some(&folder)).try_collect::<Vec<_>>())
            .map_err(|e| self.error(&format!("listing {prefix}"), &e))
    }

    // --- packs -------------------------------------------------------------

    /// The blob index, loaded on first use from every pack index.
    fn with_index<T>(
        &self,
        f: impl FnOnce(&HashMap<ObjectId, Location>) -> T,
    ) -> Result<T, StoreError> {
        if let Some(index) = self.index.read().expect("index lock").as_ref() {
            return Ok(f(index));
        }
        let loaded = self.load_index()?;
        let mut slot = self.index.write().expect("index lock");
        let index = slot.get_or_insert(loaded);
        Ok(f(index))
    }

    fn load_index(&self) -> Result<HashMap<ObjectId, Location>, StoreError> {
        let mut index = HashMap::new();
        for pack in self.pack_indexes()? {
            add_to_index(&mut index, &pack);
        }
        Ok(index)
    }

    /// Starts uploading a sealed pack, waiting first if too many are in
    /// flight (memory stays bounded).
    fn start_upload(&self, builder: PackBuilder) -> Result<(), StoreError> {
        let (bytes, index) = builder.seal();
        self.uploading
            .lock()
            .expect("uploading lock")
            .extend(index.entries.iter().map(|e| e.blob));
        let store = self.store.clone();
        let counters = self.counters.clone();
        let handle =
            self.runtime
                .spawn(upload_pack(store, counters, bytes, index, self.url.clone()));
        let oldest = {
            let mut uploads = self.uploads.lock().expect("uploads lock");
            uploads.push(handle);
            if uploads.len() > UPLOADS_IN_FLIGHT {
                Some(uploads.remove(0))
            } else {
                None
            }
        };
        if let Some(handle) = oldest {
            self.finish_upload(handle)?;
        }
        Ok(())
    }

    fn finish_upload(&self, handle: Upload) -> Result<(), StoreError> {
        let index = self
            .runtime
            .block_on(handle)
            .map_err(|e| self.remote_error(format!("upload task failed: {e}")))??;
        let mut slot = self.index.write().expect("index lock");
        if let Some(map) = slot.as_mut() {
            add_to_index(map, &index);
        }
        let mut uploading = self.uploading.lock().expect("uploading lock");
        for entry in &index.entries {
            uploading.remove(&entry.blob);
        }
        Ok(())
    }

    /// Splits `ids` into download batches of at most `max_bytes` each (a
    /// single larger blob is a batch of its own), in pack order, so that
    /// each batch's blobs share ranged GETs and memory stays bounded.
    pub fn download_batches(
        &self,
        ids: &[ObjectId],
        max_bytes: u64,
    ) -> Result<Vec<Vec<ObjectId>>, StoreError> {
        let mut located: Vec<(ObjectId, Location)> = self.with_index(|index| {
            ids.iter()
                .map(|id| {
                    index
                        .get(id)
                        .map(|loc| (*id, *loc))
                        .ok_or_else(|| StoreError::Corrupt {
                            what: format!("blob {id}"),
                            detail: format!("missing from {}", self.url),
                        })
                })
                .collect::<Result<Vec<_>, _>>()
        })??;
        located.sort_by_key(|(_, loc)| (loc.pack, loc.offset));
        let mut batches: Vec<Vec<ObjectId>> = Vec::new();
        let mut size = 0;
        for (id, loc) in located {
            if batches.is_empty() || size + loc.len > max_bytes {
                batches.push(Vec::new());
                size = 0;
            }
            size += loc.len;
            batches.last_mut().expect("pushed above").push(id);
        }
        Ok(batches)
    }

    /// Fetches many blobs with few ranged GETs (neighbours in one pack
    /// share a request), several at once, and checks each against its id.
    pub fn get_blobs(&self, ids: &[ObjectId]) -> Result<Vec<(ObjectId, Vec<u8>)>, StoreError> {
        let mut by_pack: BTreeMap<ObjectId, Vec<(ObjectId, Location)>> = BTreeMap::new();
        self.with_index(|index| -> Result<(), StoreError> {
            for id in ids {
                let loc = index.get(id).ok_or_else(|| StoreError::Corrupt {
                    what: format!("blob {id}"),
                    detail: format!("missing from {}", self.url),
                })?;
                by_pack.entry(loc.pack).or_default().push((*id, *loc));
            }
            Ok(())
        })??;
        let requests: Vec<RangedGet> = by_pack
            .into_iter()
            .flat_map(|(pack, blobs)| coalesce(pack, blobs))
            .collect();
        let store = &self.store;
        let counters = &self.counters;
        let fetched: Vec<_> = self.runtime.block_on(
            futures::stream::iter(requests)
                .map(|(pack, range, blobs)| async move {
                    counters.gets.fetch_add(1, Ordering::Relaxed);
                    let bytes = store
                        .get_range(&key(&layout::pack_key(&pack)), range.clone())
                        .await;
                    (pack, range, blobs, bytes)
                })
                .buffer_unordered(DOWNLOADS_IN_FLIGHT)
                .collect(),
        );
        let mut out = Vec::with_capacity(ids.len());
        for (pack, range, blobs, bytes) in fetched {
            let bytes = bytes.map_err(|e| self.error(&format!("reading pack {pack}"), &e))?;
            self.counters
                .bytes_down
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            for (id, loc) in blobs {
                let start = (loc.offset - range.start) as usize;
                let blob = bytes.get(start..start + loc.len as usize).ok_or_else(|| {
                    StoreError::Corrupt {
                        what: format!("pack {pack} on {}", self.url),
                        detail: "shorter than its index says".into(),
                    }
                })?;
                if ObjectId::of(blob) != id {
                    return Err(StoreError::Corrupt {
                        what: format!("blob {id} on {}", self.url),
                        detail: "its bytes do not hash to its id (damaged on the remote)".into(),
                    });
                }
                out.push((id, blob.to_vec()));
            }
        }
        Ok(out)
    }

    // --- refs --------------------------------------------------------------

    /// The latest entry of a ref: its sequence number and what it says.
    fn read_ref(&self, kind: RefKind, name: &str) -> Result<Option<(u64, RefEntry)>, StoreError> {
        let Some(&seq) = self
            .latest_entries(kind, &layout::ref_dir(kind, name))?
            .get(name)
        else {
            return Ok(None);
        };
        let entry = self.read_entry(kind, name, seq)?.ok_or_else(|| {
            self.remote_error(format!(
                "ref entry {} vanished while read",
                layout::ref_entry_key(kind, name, seq)
            ))
        })?;
        Ok(Some((seq, entry)))
    }

    fn ref_target(&self, kind: RefKind, name: &str) -> Result<Option<ObjectId>, StoreError> {
        Ok(self.read_ref(kind, name)?.and_then(|(_, e)| e.target))
    }

    /// Every ref of a kind with its target, by name (deleted ones left out).
    fn list_refs(&self, kind: RefKind) -> Result<Vec<(String, ObjectId)>, StoreError> {
        let mut out = Vec::new();
        for (name, seq) in self.latest_entries(kind, &layout::refs_dir(kind))? {
            if let Some(target) = self.read_entry(kind, &name, seq)?.and_then(|e| e.target) {
                out.push((name, target));
            }
        }
        Ok(out)
    }

    /// The newest entry's sequence number of every ref listed under
    /// `folder` (one ref's folder, or a kind's), by ref name.
    fn latest_entries(
        &self,
        kind: RefKind,
        folder: &str,
    ) -> Result<BTreeMap<String, u64>, StoreError> {
        let base = layout::refs_dir(kind);
        let mut latest: BTreeMap<String, u64> = BTreeMap::new();
        for meta in self.list(folder)? {
            let k = meta.location.to_string();
            if let Some((name, seq)) = k.strip_prefix(&base).and_then(layout::parse_ref_entry) {
                let slot = latest.entry(name.to_string()).or_insert(seq);
                *slot = (*slot).max(seq);
            }
        }
        Ok(latest)
    }

    /// Ref entry `seq` of `name`, parsed; `None` if it is gone.
    fn read_entry(
        &self,
        kind: RefKind,
        name: &str,
        seq: u64,
    ) -> Result<Option<RefEntry>, StoreError> {
        let k = layout::ref_entry_key(kind, name, seq);
        let Some(bytes) = self.get_opt(&k)? else {
            return Ok(None);
        };
        RefEntry::parse(&bytes)
            .map(Some)
            .map_err(|detail| StoreError::Corrupt {
                what: format!("ref entry {k} on {}", self.url),
                detail,
            })
    }

    /// Sets a ref whatever it points at now (retrying if another writer
    /// moves it meanwhile).
    fn set_ref(
        &self,
        kind: RefKind,
        name: &str,
        target: Option<ObjectId>,
    ) -> Result<(), StoreError> {
        for _ in 0..16 {
            let current = self.ref_target(kind, name)?;
            if current == target {
                return Ok(());
            }
            match self.compare_and_swap_ref(kind, name, current, target) {
                Err(StoreError::RefMoved { .. }) => continue,
                other => return other,
            }
        }
        Err(self.remote_error(format!("{} `{name}` kept moving; try again", kind.noun())))
    }

    /// Every object's key, size and age under the store's prefix.
    pub fn objects(&self) -> Result<Vec<object_store::ObjectMeta>, StoreError> {
        self.list("")
    }

    /// Deletes objects by key (for `gc --remote`).
    pub fn delete_keys(&self, keys: &[String]) -> Result<(), StoreError> {
        keys.iter().try_for_each(|k| self.delete_key(k))
    }

    /// Every pack index object, read several at once and checked (its
    /// version, its entries inside the pack, its key naming its pack). An
    /// index deleted between the listing and the read (by a concurrent gc)
    /// is left out.
    pub fn pack_indexes(&self) -> Result<Vec<PackIndex>, StoreError> {
        let keys: Vec<String> = self
            .list(&format!("{}/", layout::INDEX))?
            .into_iter()
            .map(|m| m.location.to_string())
            .collect();
        let store = &self.store;
        let counters = &self.counters;
        let fetched: Vec<(String, Result<Vec<u8>, object_store::Error>)> = self.runtime.block_on(
            futures::stream::iter(keys)
                .map(|k| async move {
                    counters.gets.fetch_add(1, Ordering::Relaxed);
                    let bytes = match store.get(&key(&k)).await {
                        Ok(r) => r.bytes().await.map(|b| b.to_vec()),
                        Err(e) => Err(e),
                    };
                    (k, bytes)
                })
                .buffer_unordered(DOWNLOADS_IN_FLIGHT)
                .collect(),
        );
        let mut out = Vec::new();
        for (k, bytes) in fetched {
            let bytes = match bytes {
                Ok(bytes) => bytes,
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(self.error(&format!("reading {k}"), &e)),
            };
            self.counters
                .bytes_down
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            let corrupt = |detail: String| StoreError::Corrupt {
                what: format!("pack index {k} on {}", self.url),
                detail,
            };
            let pack = PackIndex::from_bytes(&bytes).map_err(corrupt)?;
            if k.rsplit('/').next() != Some(pack.pack.to_hex().as_str()) {
                return Err(corrupt(format!("describes pack {}", pack.pack)));
            }
            out.push(pack);
        }
        Ok(out)
    }
}

/// Splits one pack's wanted blobs into ranged GETs: neighbours less than
/// [`RANGE_GAP`] apart share one, up to [`MAX_RANGE`] bytes.
fn coalesce(pack: ObjectId, mut blobs: Vec<(ObjectId, Location)>) -> Vec<RangedGet> {
    blobs.sort_by_key(|(_, loc)| loc.offset);
    let mut out: Vec<RangedGet> = Vec::new();
    for (id, loc) in blobs {
        let end = loc.offset + loc.len;
        if let Some((_, range, members)) = out.last_mut()
            && loc.offset <= range.end + RANGE_GAP
            && end.max(range.end) - range.start <= MAX_RANGE
        {
            range.end = range.end.max(end);
            members.push((id, loc));
            continue;
        }
        out.push((pack, loc.offset..end, vec![(id, loc)]));
    }
    out
}

fn add_to_index(map: &mut HashMap<ObjectId, Location>, index: &PackIndex) {
    for PackEntry { blob, offset, len } in &index.entries {
        map.entry(*blob).or_insert(Location {
            pack: index.pack,
            offset: *offset,
            len: *len,
        });
    }
}

async fn put_create(
    store: &Arc<dyn ObjectStore>,
    counters: &Counters,
    k: &str,
    bytes: Vec<u8>,
) -> Result<bool, object_store::Error> {
    counters.puts.fetch_add(1, Ordering::Relaxed);
    counters
        .bytes_up
        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    let opts = PutOptions {
        mode: PutMode::Create,
        ..PutOptions::default()
    };
    match store.put_opts(&key(k), PutPayload::from(bytes), opts).await {
        Ok(_) => Ok(true),
        Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Pack first, then its index: an index never names a pack that is not
/// there. Both are content-addressed, so finding either present already
/// (a retried push) is success.
async fn upload_pack(
    store: Arc<dyn ObjectStore>,
    counters: Arc<Counters>,
    bytes: Vec<u8>,
    index: PackIndex,
    url: String,
) -> Result<PackIndex, StoreError> {
    let fail = |what: String, e: object_store::Error| StoreError::Remote {
        remote: url.clone(),
        detail: format!("{what}: {}", describe(&e)),
    };
    let pack_key = layout::pack_key(&index.pack);
    put_create(&store, &counters, &pack_key, bytes)
        .await
        .map_err(|e| fail(format!("uploading {pack_key}"), e))?;
    let index_key = layout::index_key(&index.pack);
    put_create(&store, &counters, &index_key, index.to_bytes())
        .await
        .map_err(|e| fail(format!("uploading {index_key}"), e))?;
    Ok(index)
}

impl BlobStore for BucketStore {
    fn has_blob(&self, id: &ObjectId) -> Result<bool, StoreError> {
        if self.pending.lock().expect("pending lock").contains(id)
            || self.uploading.lock().expect("uploading lock").contains(id)
        {
            return Ok(true);
        }
        self.with_index(|index| index.contains_key(id))
    }

    fn put_blob(&self, id: &ObjectId, bytes: &[u8]) -> Result<(), StoreError> {
        if self.with_index(|index| index.contains_key(id))? {
            return Ok(());
        }
        let full = {
            if self.uploading.lock().expect("uploading lock").contains(id) {
                return Ok(());
            }
            let mut pending = self.pending.lock().expect("pending lock");
            if pending.contains(id) {
                return Ok(());
            }
            pending.push(*id, bytes);
            (pending.bytes.len() >= pack_target()).then(|| std::mem::take(&mut *pending))
        };
        match full {
            Some(pack) => self.start_upload(pack),
            None => Ok(()),
        }
    }

    fn flush_blobs(&self) -> Result<(), StoreError> {
        let last = std::mem::take(&mut *self.pending.lock().expect("pending lock"));
        if !last.is_empty() {
            self.start_upload(last)?;
        }
        let uploads = std::mem::take(&mut *self.uploads.lock().expect("uploads lock"));
        let mut first_error = None;
        for handle in uploads {
            if let Err(e) = self.finish_upload(handle) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn get_blob(&self, id: &ObjectId) -> Result<Vec<u8>, StoreError> {
        let mut blobs = self.get_blobs(std::slice::from_ref(id))?;
        Ok(blobs.pop().expect("one blob asked, one returned").1)
    }

    fn get_blob_range(&self, id: &ObjectId, range: Range<u64>) -> Result<Vec<u8>, StoreError> {
        let loc = self
            .with_index(|index| index.get(id).copied())?
            .ok_or_else(|| StoreError::Corrupt {
                what: format!("blob {id}"),
                detail: format!("missing from {}", self.url),
            })?;
        let end = range.end.min(loc.len);
        let start = range.start.min(end);
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        let k = layout::pack_key(&loc.pack);
        let bytes = self
            .runtime
            .block_on(
                self.store
                    .get_range(&key(&k), loc.offset + start..loc.offset + end),
            )
            .map_err(|e| self.error(&format!("reading {k}"), &e))?;
        self.counters
            .bytes_down
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(bytes.to_vec())
    }

    fn blob_sizes(&self) -> Result<Vec<(ObjectId, u64)>, StoreError> {
        self.with_index(|index| index.iter().map(|(id, loc)| (*id, loc.len)).collect())
    }

    /// Blobs live in packs: a pack none of whose blobs survives is deleted
    /// (index first, so no index names a missing pack); a pack with
    /// survivors is rewritten with only them, then deleted.
    fn delete_blobs(&self, ids: &[ObjectId]) -> Result<(), StoreError> {
        let doomed: std::collections::HashSet<ObjectId> = ids.iter().copied().collect();
        for pack in self.pack_indexes()? {
            if !pack.entries.iter().any(|e| doomed.contains(&e.blob)) {
                continue;
            }
            let survivors: Vec<ObjectId> = pack
                .entries
                .iter()
                .map(|e| e.blob)
                .filter(|b| !doomed.contains(b))
                .collect();
            // Forget the old pack's entries so that survivors are written anew.
            if let Some(map) = self.index.write().expect("index lock").as_mut() {
                for e in &pack.entries {
                    if map.get(&e.blob).is_some_and(|l| l.pack == pack.pack) {
                        map.remove(&e.blob);
                    }
                }
            }
            if !survivors.is_empty() {
                let mut builder = PackBuilder::default();
                let wanted: Vec<(ObjectId, Location)> = pack
                    .entries
                    .iter()
                    .filter(|e| !doomed.contains(&e.blob))
                    .map(|e| {
                        (
                            e.blob,
                            Location {
                                pack: pack.pack,
                                offset: e.offset,
                                len: e.len,
                            },
                        )
                    })
                    .collect();
                {
                    let mut slot = self.index.write().expect("index lock");
                    let map = slot.get_or_insert_with(HashMap::new);
                    for (id, loc) in &wanted {
                        map.insert(*id, *loc);
                    }
                }
                for (id, bytes) in self.get_blobs(&survivors)? {
                    builder.push(id, &bytes);
                }
                if let Some(map) = self.index.write().expect("index lock").as_mut() {
                    for id in &survivors {
                        map.remove(id);
                    }
                }
                self.start_upload(builder)?;
                self.flush_blobs()?;
            }
            self.delete_key(&layout::index_key(&pack.pack))?;
            self.delete_key(&layout::pack_key(&pack.pack))?;
        }
        Ok(())
    }
}

impl MetaStore for BucketStore {
    fn config(&self) -> Result<StoreConfig, StoreError> {
        let bytes = self
            .get_opt(layout::CONFIG_KEY)?
            .ok_or_else(|| self.remote_error("the store config object is missing".into()))?;
        StoreConfig::from_bytes(&bytes)
    }

    fn get_commit_bytes(&self, id: &ObjectId) -> Result<Option<Vec<u8>>, StoreError> {
        match self.get_opt(&layout::commit_key(id))? {
            Some(stored) => Ok(Some(unpack_record(id, &stored)?.into_owned())),
            None => Ok(None),
        }
    }

    fn commit_ids(&self) -> Result<Vec<ObjectId>, StoreError> {
        Ok(self
            .list(&format!("{}/", layout::COMMITS))?
            .into_iter()
            .filter_map(|m| {
                let k = m.location.to_string();
                ObjectId::from_hex(k.rsplit('/').next()?)
            })
            .collect())
    }

    fn head_branch(&self) -> Result<String, StoreError> {
        Ok(self.get_opt(layout::HEAD_KEY)?.map_or_else(
            || "main".into(),
            |b| String::from_utf8_lossy(&b).trim().to_string(),
        ))
    }

    fn branch_tip(&self, branch: &str) -> Result<Option<ObjectId>, StoreError> {
        self.ref_target(RefKind::Branch, branch)
    }

    fn branches(&self) -> Result<Vec<(String, ObjectId)>, StoreError> {
        self.list_refs(RefKind::Branch)
    }

    fn tag_target(&self, name: &str) -> Result<Option<ObjectId>, StoreError> {
        self.ref_target(RefKind::Tag, name)
    }

    fn tags(&self) -> Result<Vec<(String, ObjectId)>, StoreError> {
        self.list_refs(RefKind::Tag)
    }

    fn commit_at_step(&self, branch: &str, step: u64) -> Result<Option<ObjectId>, StoreError> {
        Ok(self
            .branch_steps(branch)?
            .into_iter()
            .find(|(s, _)| *s == step)
            .map(|(_, id)| id))
    }

    /// A bucket keeps no step index: it is the tip's first-parent ancestry,
    /// read commit by commit.
    fn branch_steps(&self, branch: &str) -> Result<Vec<(u64, ObjectId)>, StoreError> {
        let mut out = Vec::new();
        let mut next = self.branch_tip(branch)?;
        while let Some(id) = next {
            let summary = self
                .get_commit_summary(&id)?
                .ok_or_else(|| StoreError::Corrupt {
                    what: format!("commit {id} on {}", self.url),
                    detail: format!("missing, but in the history of branch `{branch}`"),
                })?;
            out.push((summary.step, id));
            next = summary.first_parent();
        }
        out.sort_by_key(|(step, _)| *step);
        Ok(out)
    }

    fn step_index_branches(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.branches()?.into_iter().map(|(name, _)| name).collect())
    }

    /// The record, then the branch moved from the record's parent with a
    /// create-only ref entry: a concurrent publisher on the same branch
    /// makes this fail with [`StoreError::RefMoved`].
    fn publish_commit(
        &self,
        record: &CommitRecord,
        _inherited_steps: &[(u64, ObjectId)],
    ) -> Result<ObjectId, StoreError> {
        let bytes = record.to_bytes();
        let id = ObjectId::of(&bytes);
        self.put_create(&layout::commit_key(&id), pack_record(&bytes).into_owned())?;
        let current = self.branch_tip(&record.branch)?;
        let expected = match current {
            Some(tip) if Some(tip) != record.first_parent() => {
                return Err(StoreError::RefMoved {
                    what: format!("branch `{}` on {}", record.branch, self.url),
                    expected: record.first_parent(),
                    found: Some(tip),
                });
            }
            other => other,
        };
        self.compare_and_swap_ref(RefKind::Branch, &record.branch, expected, Some(id))?;
        self.put_overwrite(layout::HEAD_KEY, record.branch.as_bytes().to_vec())?;
        Ok(id)
    }

    /// Not atomic on a bucket: records first, then refs, then deletions, so
    /// that an interruption leaves no ref pointing at a missing record.
    /// Step-index edits are ignored (a bucket derives steps from history).
    fn apply(&self, edit: &RefEdit) -> Result<(), StoreError> {
        for (id, bytes) in &edit.put_commits {
            self.put_create(&layout::commit_key(id), pack_record(bytes).into_owned())?;
        }
        for (name, id) in &edit.set_branches {
            self.set_ref(RefKind::Branch, name, Some(*id))?;
        }
        for (name, id) in &edit.set_tags {
            self.set_ref(RefKind::Tag, name, Some(*id))?;
        }
        for name in &edit.delete_branches {
            self.set_ref(RefKind::Branch, name, None)?;
        }
        for name in &edit.delete_tags {
            self.set_ref(RefKind::Tag, name, None)?;
        }
        if let Some(head) = &edit.head {
            self.put_overwrite(layout::HEAD_KEY, head.as_bytes().to_vec())?;
        }
        for id in &edit.delete_commits {
            self.delete_key(&layout::commit_key(id))?;
        }
        Ok(())
    }

    fn compare_and_swap_ref(
        &self,
        kind: RefKind,
        name: &str,
        expected: Option<ObjectId>,
        new: Option<ObjectId>,
    ) -> Result<(), StoreError> {
        let latest = self.read_ref(kind, name)?;
        let current = latest.as_ref().and_then(|(_, e)| e.target);
        let moved = |found| StoreError::RefMoved {
            what: format!("{} `{name}` on {}", kind.noun(), self.url),
            expected,
            found,
        };
        if current != expected {
            return Err(moved(current));
        }
        let seq = latest.map_or(0, |(seq, _)| seq + 1);
        let entry = RefEntry {
            target: new,
            previous: current,
        };
        let k = layout::ref_entry_key(kind, name, seq);
        if self.put_create(&k, entry.to_text().into_bytes())? {
            Ok(())
        } else {
            Err(moved(self.ref_target(kind, name)?))
        }
    }
}

impl Backend for BucketStore {
    fn location(&self) -> String {
        self.url.clone()
    }

    fn recent_objects(&self, grace: Duration) -> Result<HashSet<ObjectId>, StoreError> {
        let cutoff = chrono_cutoff(grace);
        let mut recent = HashSet::new();
        let mut young_packs = HashSet::new();
        for meta in self.objects()? {
            if meta.last_modified < cutoff {
                continue;
            }
            let k = meta.location.to_string();
            let Some((folder, name)) = k.rsplit_once('/') else {
                continue;
            };
            let Some(id) = ObjectId::from_hex(name) else {
                continue;
            };
            match folder {
                layout::COMMITS => {
                    recent.insert(id);
                }
                layout::PACKS | layout::INDEX => {
                    young_packs.insert(id);
                }
                _ => {}
            }
        }
        self.with_index(|index| {
            recent.extend(
                index
                    .iter()
                    .filter(|(_, loc)| young_packs.contains(&loc.pack))
                    .map(|(id, _)| *id),
            )
        })?;
        Ok(recent)
    }

    fn sweep_leftovers(&self, grace: Duration, dry_run: bool) -> Result<usize, StoreError> {
        let cutoff = chrono_cutoff(grace);
        let objects = self.objects()?;
        let indexed: HashSet<String> = objects
            .iter()
            .filter_map(|m| {
                let k = m.location.to_string();
                k.strip_prefix(&format!("{}/", layout::INDEX))
                    .map(str::to_string)
            })
            .collect();
        let mut doomed = Vec::new();
        // Newest entry of each ref, which stays.
        let mut newest: HashMap<String, String> = HashMap::new();
        for meta in &objects {
            let k = meta.location.to_string();
            if let Some((dir, _)) = k.rsplit_once('/')
                && k.starts_with("refs/")
            {
                let slot = newest.entry(dir.to_string()).or_default();
                if k > *slot {
                    *slot = k.clone();
                }
            }
        }
        for meta in objects.iter().filter(|m| m.last_modified < cutoff) {
            let k = meta.location.to_string();
            let orphan_pack = k
                .strip_prefix(&format!("{}/", layout::PACKS))
                .is_some_and(|name| !indexed.contains(name));
            let old_ref_entry = k.starts_with("refs/")
                && k.rsplit_once('/')
                    .is_some_and(|(dir, _)| newest.get(dir) != Some(&k));
            let stale_probe = k.starts_with(&format!("{}/", layout::PROBE));
            if orphan_pack || old_ref_entry || stale_probe {
                doomed.push(k);
            }
        }
        if !dry_run {
            self.delete_keys(&doomed)?;
        }
        Ok(doomed.len())
    }

    fn physical_bytes(&self) -> Result<u64, StoreError> {
        Ok(self.objects()?.iter().map(|m| m.size).sum())
    }

    fn shard_sink<'a>(
        &'a self,
        key: &PendingKey,
        shard: u32,
    ) -> Result<Box<dyn ShardSink + 'a>, StoreError> {
        Ok(Box::new(pending::BucketShardSink::new(self, key, shard)))
    }

    fn shard_manifests(&self, key: &PendingKey) -> Result<Vec<(u32, Vec<u8>)>, StoreError> {
        self.read_shard_manifests(key)
    }

    fn pending_steps(&self) -> Result<Vec<PendingInfo>, StoreError> {
        self.list_pending()
    }

    /// A shard's blobs are packs of the bucket already.
    fn adopt_shards(&self, _key: &PendingKey) -> Result<(), StoreError> {
        Ok(())
    }

    fn drop_pending(&self, key: &PendingKey) -> Result<(), StoreError> {
        self.delete_pending(key)
    }
}

/// The moment `grace` ago, in the time type of object listings.
fn chrono_cutoff(grace: Duration) -> chrono::DateTime<chrono::Utc> {
    let delta = chrono::TimeDelta::from_std(grace).unwrap_or(chrono::TimeDelta::MAX);
    chrono::Utc::now()
        .checked_sub_signed(delta)
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC)
}

impl Drop for BucketStore {
    /// Blobs put but never flushed are abandoned (nothing refers to them);
    /// uploads in flight are let finish, so no half-written request is cut.
    fn drop(&mut self) {
        let uploads = std::mem::take(&mut *self.uploads.lock().expect("uploads lock"));
        for handle in uploads {
            let _ = self.runtime.block_on(handle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalescing_joins_neighbours_and_caps_requests() {
        let pack = ObjectId::of(b"p");
        let at = |n: u8, offset, len| (ObjectId::of(&[n]), Location { pack, offset, len });
        let groups = coalesce(
            pack,
            vec![at(2, 100, 50), at(1, 0, 100), at(3, 10 << 20, 10)],
        );
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].1, 0..150);
        assert_eq!(groups[0].2.len(), 2);
        assert_eq!(groups[1].1, (10 << 20)..(10 << 20) + 10);
        let big = coalesce(pack, vec![at(1, 0, MAX_RANGE), at(2, MAX_RANGE, 1)]);
        assert_eq!(big.len(), 2);
    }
}
