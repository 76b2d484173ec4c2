//! Cutting a checkpoint into units of parallel work.
//!
//! Every tensor is cut into chunks of the same number of elements
//! (`chunk_bytes / 4`), whatever its dtype, so that a weight tensor and its
//! Adam moments line up chunk for chunk even when their dtypes differ. A
//! weight with `<name>.exp_avg` and `<name>.exp_avg_sq` in the same commit
//! forms a *group* that lossy policies code jointly; everything else is coded
//! losslessly chunk by chunk.

use std::borrow::Cow;
use std::collections::HashMap;

use crate::codec::float::FloatType;
use crate::format::safetensors::TensorInfo;
use crate::format::{Checkpoint, InputFile};
use crate::repo::reconstruct::ChunkAddr;
use crate::repo::tipcache::CacheLayout;
use crate::store::{ChunkRef, CommitRecord, TensorEntry};

/// Tensors smaller than this stay lossless: a step planned on fewer elements
/// is noise. Biases and norms (a few hundred elements) are coded lossily
/// with their moments: kept lossless they cost ~27 bits per element, which in
/// a model of a few million parameters was a fifth of a residual commit's
/// bytes for 0.5% of its elements (docs/benchmarks.md). ExCP, the reference
/// method, compresses every parameter too.
pub const MIN_LOSSY_ELEMENTS: u64 = 64;

/// Index used in place of a tensor index for opaque files.
pub const OPAQUE: usize = usize::MAX;

/// One tensor of the checkpoint, with where its chunks go.
pub struct TensorSlot<'c> {
    pub file: &'c InputFile,
    pub file_index: usize,
    pub tensor_index: usize,
    pub info: &'c TensorInfo,
    /// Absolute offset of the tensor's data in its file.
    pub data_offset: u64,
    pub chunk_len: u64,
    pub cache_start: u64,
    /// The parent's tensor of the same name, dtype and shape.
    pub parent: Option<&'c TensorEntry>,
    /// The name weight groups are formed by: the tensor's own name, or for
    /// a paired optimizer state entry (`state.3.exp_avg`) the name it was
    /// paired to (`<parameter>.exp_avg`).
    pub group_name: &'c str,
}

impl TensorSlot<'_> {
    pub fn chunk_count(&self) -> usize {
        self.info.byte_len().div_ceil(self.chunk_len) as usize
    }

    /// (absolute file offset, length) of chunk `index`.
    pub fn chunk_range(&self, index: usize) -> (u64, u64) {
        let start = index as u64 * self.chunk_len;
        (
            self.data_offset + start,
            self.chunk_len.min(self.info.byte_len() - start),
        )
    }

    pub fn cache_offset(&self, index: usize) -> u64 {
        self.cache_start + index as u64 * self.chunk_len
    }

    pub fn addr(&self, index: usize) -> ChunkAddr<'_> {
        ChunkAddr {
            file: &self.file.name,
            tensor: Some(&self.info.name),
            index,
        }
    }

    /// The parent's chunk at the same position, if it has the same length.
    pub fn parent_chunk(&self, index: usize) -> Option<&ChunkRef> {
        let (_, len) = self.chunk_range(index);
        self.parent?.chunks.get(index).filter(|c| c.raw_len == len)
    }

    /// Chunk `index` of the input: a private copy from a file on disk
    /// (read, not mapped), borrowed from a checkpoint in memory where one
    /// buffer holds it (see [`InputFile::values`]).
    pub fn read(&self, index: usize) -> Cow<'_, [u8]> {
        let (offset, len) = self.chunk_range(index);
        self.file.values(offset as usize, len as usize)
    }

    /// Chunk `index` of a float tensor stored as `float`, as f32: read
    /// straight into the values for f32 on little-endian machines.
    /// Chunk `index` as f32: borrowed from a checkpoint in memory where
    /// it is f32 there already (see [`InputFile::values`]).
    pub fn read_values(&self, index: usize, float: FloatType) -> Cow<'_, [f32]> {
        if float == FloatType::F32 && cfg!(target_endian = "little") {
            let (offset, len) = self.chunk_range(index);
            return self.file.values(offset as usize, len as usize / 4);
        }
        Cow::Owned(float.to_f32(&self.read(index)))
    }

    pub fn float(&self) -> Option<FloatType> {
        FloatType::from_dtype(&self.info.dtype.to_string())
    }

    pub fn numel(&self) -> u64 {
        self.info.shape.iter().product()
    }
}

/// A weight and its Adam moments (indices into [`Plan::slots`]).
#[derive(Debug, Clone, Copy)]
pub struct Group {
    pub w: usize,
    pub m: usize,
    pub v: usize,
}

pub enum Work<'c> {
    Opaque {
        file: &'c InputFile,
        file_index: usize,
        index: usize,
        offset: u64,
        len: u64,
    },
    Tensor {
        slot: usize,
        index: usize,
    },
    Group {
        group: usize,
        index: usize,
    },
}

impl Work<'_> {
    pub fn input_bytes(&self, plan: &Plan<'_>) -> u64 {
        match *self {
            Work::Opaque { len, .. } => len,
            Work::Tensor { slot, index } => plan.slots[slot].chunk_range(index).1,
            Work::Group { group, index } => {
                let g = plan.groups[group];
                [g.w, g.m, g.v]
                    .iter()
                    .map(|&s| plan.slots[s].chunk_range(index).1)
                    .sum()
            }
        }
    }
}

pub struct Plan<'c> {
    pub slots: Vec<TensorSlot<'c>>,
    pub groups: Vec<Group>,
    pub work: Vec<Work<'c>>,
    pub layout: CacheLayout,
}

/// Bytes of one chunk of a tensor with `bits`-bit elements.
fn chunk_len(chunk_bytes: u64, bits: usize) -> u64 {
    ((chunk_bytes / 4).max(8) * bits as u64).div_ceil(8)
}

/// Plans the commit. With `lossy`, weight groups whose parent has the same
/// three tensors are coded jointly; the rest is lossless.
pub fn plan<'c>(
    checkpoint: &'c Checkpoint,
    chunk_bytes: u64,
    parent: Option<&'c CommitRecord>,
    lossy: bool,
) -> Plan<'c> {
    let mut plan = Plan {
        slots: Vec::new(),
        groups: Vec::new(),
        work: Vec::new(),
        layout: CacheLayout::default(),
    };
    // By name, once: a scan per tensor is quadratic with 100k tensors.
    let parent_tensors: std::collections::HashMap<(&str, &str), &crate::store::TensorEntry> =
        parent
            .map(|p| {
                p.files
                    .iter()
                    .flat_map(|f| {
                        f.tensors()
                            .iter()
                            .map(move |t| ((f.name.as_str(), t.name.as_str()), t))
                    })
                    .collect()
            })
            .unwrap_or_default();
    for (file_index, file) in checkpoint.files.iter().enumerate() {
        let Some((tensors, data_start)) = file.kind.tensors() else {
            for (index, start) in (0..file.len()).step_by(chunk_bytes as usize).enumerate() {
                plan.work.push(Work::Opaque {
                    file,
                    file_index,
                    index,
                    offset: start,
                    len: chunk_bytes.min(file.len() - start),
                });
            }
            continue;
        };
        for (tensor_index, info) in tensors.iter().enumerate() {
            let chunk_len = chunk_len(chunk_bytes, info.dtype.bitsize());
            let cache_start = plan
                .layout
                .push(&file.name, &info.name, info.byte_len(), chunk_len);
            let parent = parent_tensors
                .get(&(file.name.as_str(), info.name.as_str()))
                .copied()
                .filter(|t| t.dtype == info.dtype.to_string() && t.shape == info.shape);
            plan.slots.push(TensorSlot {
                file,
                file_index,
                tensor_index,
                info,
                data_offset: data_start + info.begin,
                group_name: checkpoint
                    .aliases
                    .get(&(file_index, tensor_index))
                    .map_or(info.name.as_str(), String::as_str),
                chunk_len,
                cache_start,
                parent,
            });
        }
    }
    if lossy {
        plan.groups = find_groups(&plan.slots);
    }
    let mut grouped = vec![false; plan.slots.len()];
    for (g, group) in plan.groups.iter().enumerate() {
        for s in [group.w, group.m, group.v] {
            grouped[s] = true;
        }
        let chunks = plan.slots[group.w].chunk_count();
        plan.work
            .extend((0..chunks).map(|index| Work::Group { group: g, index }));
    }
    for (s, slot) in plan.slots.iter().enumerate() {
        if !grouped[s] {
            plan.work
                .extend((0..slot.chunk_count()).map(|index| Work::Tensor { slot: s, index }));
        }
    }
    plan
}

fn lossy_candidate(slot: &TensorSlot<'_>) -> bool {
    slot.float().is_some()
        && slot.numel() >= MIN_LOSSY_ELEMENTS
        && slot
            .parent
            .is_some_and(|p| p.chunks.len() == slot.chunk_count())
}

/// Forms weight groups by name. Several files may hold tensors of the same
/// names (one folder per rank, each with its `model.safetensors` and
/// `optimizer.safetensors`): a weight's moments are looked for in its own
/// folder first, and anywhere only when the name is unique; no moment joins
/// two groups.
fn find_groups(slots: &[TensorSlot<'_>]) -> Vec<Group> {
    let mut by_name: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, s) in slots.iter().enumerate() {
        by_name.entry(s.group_name).or_default().push(i);
    }
    let folder = |i: usize| {
        let name = &slots[i].file.name;
        name.rsplit_once('/').map_or("", |(dir, _)| dir)
    };
    let mut used = vec![false; slots.len()];
    let mut groups = Vec::new();
    for (w, slot) in slots.iter().enumerate() {
        let name = slot.group_name;
        if name.ends_with(".exp_avg") || name.ends_with(".exp_avg_sq") || !lossy_candidate(slot) {
            continue;
        }
        let moment = |suffix: &str, used: &[bool]| {
            let candidates = by_name.get(format!("{name}{suffix}").as_str())?;
            let fits = |&&i: &&usize| {
                !used[i] && slots[i].info.shape == slot.info.shape && lossy_candidate(&slots[i])
            };
            let near: Vec<usize> = candidates
                .iter()
                .filter(|&&i| folder(i) == folder(w))
                .filter(fits)
                .copied()
                .collect();
            match (near.as_slice(), candidates.as_slice()) {
                ([one], _) => Some(*one),
                ([], [only]) if fits(&only) => Some(*only),
                _ => None,
            }
        };
        if let (Some(m), Some(v)) = (moment(".exp_avg", &used), moment(".exp_avg_sq", &used)) {
            used[m] = true;
            used[v] = true;
            groups.push(Group { w, m, v });
        }
    }
    groups
}
