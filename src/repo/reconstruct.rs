//! Decoding chunks of any commit: from the reconstruction cache when it has
//! them, otherwise from blobs, following delta bases through first parents.
//! Every decoded chunk is checked against the raw hash its commit recorded, so
//! a damaged blob or cache is reported, never passed on.

use crate::repo::Repo;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, anyhow, bail};

use super::tipcache::CacheReader;
use crate::codec;
use crate::codec::float::FloatType;
use crate::format::Plain;
use crate::store::{ChunkRef, CommitRecord, FileContent, ObjectId};

/// Identifies one chunk of one commit.
#[derive(Debug, Clone, Copy)]
pub struct ChunkAddr<'a> {
    pub file: &'a str,
    /// `None` for an opaque file.
    pub tensor: Option<&'a str>,
    pub index: usize,
}

impl std::fmt::Display for ChunkAddr<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.tensor {
            Some(t) => write!(f, "chunk {} of tensor `{t}` in {}", self.index, self.file),
            None => write!(f, "chunk {} of {}", self.index, self.file),
        }
    }
}

/// Where each (file, tensor) of a record is: (file index, tensor index).
/// Looking chunks up by name would cost a scan per chunk, quadratic for
/// checkpoints with 100k small tensors.
type TensorIndex = HashMap<(String, String), (usize, usize)>;

pub struct Reconstructor<'s> {
    store: &'s Repo,
    cache_dir: PathBuf,
    records: Mutex<HashMap<ObjectId, Arc<CommitRecord>>>,
    indexes: Mutex<HashMap<ObjectId, Arc<TensorIndex>>>,
    caches: Mutex<HashMap<ObjectId, Option<Arc<CacheReader>>>>,
    /// Chunks served from a reconstruction cache, and decoded from blobs.
    from_cache: AtomicU64,
    decoded: AtomicU64,
}

impl<'s> Reconstructor<'s> {
    pub fn new(store: &'s Repo) -> Self {
        Reconstructor {
            store,
            cache_dir: store.cache_dir(),
            records: Mutex::default(),
            indexes: Mutex::default(),
            caches: Mutex::default(),
            from_cache: AtomicU64::new(0),
            decoded: AtomicU64::new(0),
        }
    }

    pub fn store(&self) -> &'s Repo {
        self.store
    }

    /// Serves commit `id`'s chunks from `reader` (or decodes them, with
    /// `None`) instead of the branch-tip cache named by `id`: a rank's
    /// shard keeps the cache of its own files only, under their own name.
    pub fn use_cache(&self, id: ObjectId, reader: Option<CacheReader>) {
        self.caches
            .lock()
            .expect("lock")
            .insert(id, reader.map(Arc::new));
    }

    pub fn record(&self, id: &ObjectId) -> anyhow::Result<Arc<CommitRecord>> {
        if let Some(r) = self.records.lock().expect("lock").get(id) {
            return Ok(r.clone());
        }
        let record = self
            .store
            .get_commit(id)?
            .ok_or_else(|| anyhow!("commit {id} is missing from the store"))?;
        let record = Arc::new(record);
        self.records
            .lock()
            .expect("lock")
            .insert(*id, record.clone());
        Ok(record)
    }

    fn cache(&self, id: &ObjectId, record: &CommitRecord) -> Option<Arc<CacheReader>> {
        let mut caches = self.caches.lock().expect("lock");
        caches
            .entry(*id)
            .or_insert_with(|| CacheReader::open(&self.cache_dir, id, record).map(Arc::new))
            .clone()
    }

    fn index(&self, id: &ObjectId, record: &CommitRecord) -> Arc<TensorIndex> {
        let mut indexes = self.indexes.lock().expect("lock");
        indexes
            .entry(*id)
            .or_insert_with(|| {
                let mut index = TensorIndex::new();
                for (fi, file) in record.files.iter().enumerate() {
                    for (ti, tensor) in file.tensors().iter().enumerate() {
                        index.insert((file.name.clone(), tensor.name.clone()), (fi, ti));
                    }
                }
                Arc::new(index)
            })
            .clone()
    }

    /// The chunk reference at `addr` of a record, through its index.
    fn locate<'r>(
        &self,
        id: &ObjectId,
        record: &'r CommitRecord,
        addr: ChunkAddr<'_>,
    ) -> Option<&'r ChunkRef> {
        match addr.tensor {
            None => find_chunk(record, addr),
            Some(tensor) => {
                let index = self.index(id, record);
                let &(fi, ti) = index.get(&(addr.file.to_string(), tensor.to_string()))?;
                record.files[fi].tensors()[ti].chunks.get(addr.index)
            }
        }
    }

    /// The decoded bytes of one chunk of commit `id`, checked against the
    /// raw hash its commit recorded.
    pub fn chunk(&self, id: &ObjectId, addr: ChunkAddr<'_>) -> anyhow::Result<Vec<u8>> {
        let record = self.record(id)?;
        let chunk = self.require(id, &record, addr)?;
        if let Some(bytes) = self.cached::<u8>(id, &record, addr, chunk) {
            return Ok(bytes);
        }
        // The links of a delta chain are not checked one by one: the hash
        // of the result covers them (any wrong link changes it), and
        // hashing every intermediate chunk cost more than decoding it.
        let raw = self.decode_blob(id, addr, chunk, false)?;
        if ObjectId::of(&raw) == chunk.raw_hash {
            return Ok(raw);
        }
        // Something in the chain is damaged: decode again checking every
        // blob and link, so that the error names the damaged one.
        self.decode_blob(id, addr, chunk, true)
    }

    /// The decoded values of one chunk of a float tensor stored as `float`,
    /// as f32: for f32 tensors read from the cache straight into the result,
    /// without a byte buffer and a conversion copy.
    pub fn chunk_values(
        &self,
        id: &ObjectId,
        addr: ChunkAddr<'_>,
        float: FloatType,
    ) -> anyhow::Result<Vec<f32>> {
        if float == FloatType::F32 && cfg!(target_endian = "little") {
            let record = self.record(id)?;
            let chunk = self.require(id, &record, addr)?;
            if let Some(values) = self.cached::<f32>(id, &record, addr, chunk) {
                return Ok(values);
            }
        }
        Ok(float.to_f32(&self.chunk(id, addr)?))
    }

    /// The chunk reference at `addr`, or an error naming what is missing.
    fn require<'r>(
        &self,
        id: &ObjectId,
        record: &'r CommitRecord,
        addr: ChunkAddr<'_>,
    ) -> anyhow::Result<&'r ChunkRef> {
        self.locate(id, record, addr)
            .ok_or_else(|| anyhow!("commit {} has no {addr}", id.short()))
    }

    /// (chunks served from a reconstruction cache, chunks decoded from
    /// blobs) so far, delta bases of decoded chunks included.
    pub fn sources(&self) -> (u64, u64) {
        (
            self.from_cache.load(Ordering::Relaxed),
            self.decoded.load(Ordering::Relaxed),
        )
    }

    fn cached<T: Plain>(
        &self,
        id: &ObjectId,
        record: &CommitRecord,
        addr: ChunkAddr<'_>,
        chunk: &ChunkRef,
    ) -> Option<Vec<T>> {
        let tensor = addr.tensor?;
        let values = self
            .cache(id, record)?
            .read_chunk(addr.file, tensor, addr.index, chunk)?;
        self.from_cache.fetch_add(1, Ordering::Relaxed);
        Some(values)
    }

    /// Decodes `chunk` through its chain of bases (from a cache where one
    /// has them). With `checked`, also checks its blob's hash, every base
    /// (through [`Reconstructor::chunk`]) and the result against its raw
    /// hash; without, checks no hash at all.
    fn decode_blob(
        &self,
        id: &ObjectId,
        addr: ChunkAddr<'_>,
        chunk: &ChunkRef,
        checked: bool,
    ) -> anyhow::Result<Vec<u8>> {
        let context = || context(id, addr, chunk);
        self.decoded.fetch_add(1, Ordering::Relaxed);
        let blob = self.store.get_blob(&chunk.blob).with_context(context)?;
        if checked && ObjectId::of(&blob) != chunk.blob {
            bail!("{}: blob content does not match its hash", context());
        }
        let base_id = chunk.base.filter(|_| chunk.codec.needs_base());
        if chunk.codec.needs_base() && base_id.is_none() {
            bail!("{}: delta chunk without a base commit", context());
        }
        let base = match &base_id {
            Some(id) => Some(self.base_chunk(id, addr, checked)?),
            None => None,
        };
        let sides = self
            .side_chunks(id, base_id.as_ref(), addr, &blob, checked)
            .with_context(|| format!("{}: its side chunks", context()))?;
        let raw = match base {
            Some(base) => codec::decode_onto(&blob, base, &sides),
            None => codec::decode_with(&blob, None, &sides),
        }
        .with_context(context)?;
        if checked && ObjectId::of(&raw) != chunk.raw_hash {
            bail!(
                "{}: decoded bytes do not match the recorded checksum",
                context()
            );
        }
        Ok(raw)
    }
}

impl Reconstructor<'_> {
    /// The side chunks `blob` (at `addr` of commit `id`, coded against
    /// commit `base`) is decoded with, in [`codec::sides_of`] order: a lossy
    /// chunk coded in units of another tensor (m in units of √v̂) or
    /// predicted from other tensors (W from Adam's m̂ and v̂) takes their
    /// chunks at the same index, of this commit or of its base. Checked as
    /// [`Reconstructor::base_chunk`] checks.
    pub fn side_chunks(
        &self,
        id: &ObjectId,
        base: Option<&ObjectId>,
        addr: ChunkAddr<'_>,
        blob: &[u8],
        checked: bool,
    ) -> anyhow::Result<Vec<Vec<u8>>> {
        codec::sides_of(blob)?
            .iter()
            .map(|side| {
                let commit = match (side.in_base, base) {
                    (false, _) => id,
                    (true, Some(base)) => base,
                    (true, None) => bail!("a side chunk of the base, but no base commit"),
                };
                let side_addr = ChunkAddr {
                    file: side.file.as_deref().unwrap_or(addr.file),
                    tensor: Some(&side.tensor),
                    index: addr.index,
                };
                self.base_chunk(commit, side_addr, checked)
            })
            .collect()
    }

    /// The chunk at `addr` of commit `base`, which a delta (or a scaled
    /// chunk's side) is decoded against: checked through [`Reconstructor::chunk`]
    /// with `checked`, else from a cache or decoded without checks.
    fn base_chunk(
        &self,
        base: &ObjectId,
        addr: ChunkAddr<'_>,
        checked: bool,
    ) -> anyhow::Result<Vec<u8>> {
        if checked {
            return self.chunk(base, addr);
        }
        let record = self.record(base)?;
        let base_chunk = self.require(base, &record, addr)?;
        match self.cached::<u8>(base, &record, addr, base_chunk) {
            Some(bytes) => Ok(bytes),
            None => self.decode_blob(base, addr, base_chunk, false),
        }
    }
}

fn context(id: &ObjectId, addr: ChunkAddr<'_>, chunk: &ChunkRef) -> String {
    format!(
        "{addr} (blob {}) in commit {}",
        chunk.blob.short(),
        id.short()
    )
}

pub fn find_chunk<'r>(record: &'r CommitRecord, addr: ChunkAddr<'_>) -> Option<&'r ChunkRef> {
    let file = record.files.iter().find(|f| f.name == addr.file)?;
    match (&file.content, addr.tensor) {
        (FileContent::Opaque { chunks }, None) => chunks.get(addr.index),
        (FileContent::Safetensors { .. } | FileContent::Torch(_), Some(name)) => file
            .tensors()
            .iter()
            .find(|t| t.name == name)?
            .chunks
            .get(addr.index),
        _ => None,
    }
}
