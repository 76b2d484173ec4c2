//! PyTorch Distributed Checkpoint (DCP) directories, as FSDP/FSDP2,
//! torchtitan, Accelerate and Megatron's `torch_dist` write them: a
//! `.metadata` pickle plus `__<rank>_<n>.distcp` data files.
//!
//! `.metadata` maps every fully-qualified name (FQN) to its dtype, global
//! size and chunks (offsets and sizes), and every stored item — one chunk of
//! a tensor, or one pickled object — to `(relative_path, offset, length)` in
//! a data file. Each item is a complete, stored (uncompressed) `torch.save`
//! zip. A data file is therefore read as one torch file whose tensors are the
//! items' storages, renamed after the chunk they hold
//! (`model.fc1.weight[128:255,0:64]`); every other byte (the items' zip
//! structures, pickled objects) is kept verbatim, so checkout writes the same
//! bytes back and rewrites only the CRC-32 fields of changed storages.
//!
//! The pickle is read with the strict reader of [`super::torch::pickle`]:
//! classes are data, nothing is executed. `.metadata` itself changes from
//! save to save (a fresh `save_id` uuid, the checkpoint path) and is stored as
//! an opaque file; nothing relies on its hash.
//!
//! Optimizer state saved through `torch.distributed.checkpoint.state_dict`
//! is keyed by parameter FQN (`optim.state.fc1.weight.exp_avg`), so each
//! moment chunk pairs with the weight chunk of the same parameter and the
//! same offsets with certainty; see [`pair_moments`].

use std::collections::{BTreeMap, HashMap};

use safetensors::Dtype;

use super::torch::pickle::{Id, Node, Pickle, attr, torch_size};
use super::torch::{self, TorchFile};

/// The name of a DCP directory's metadata file.
pub const METADATA: &str = ".metadata";

/// The data files' extension.
pub const DATA_EXTENSION: &str = ".distcp";

/// What `.metadata` says about one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    pub dtype: Dtype,
    /// The global (unsharded) size.
    pub size: Vec<u64>,
    /// Every chunk's (offsets, sizes) in the global tensor.
    pub chunks: Vec<(Vec<u64>, Vec<u64>)>,
}

/// Where one item is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub fqn: String,
    /// The chunk's offsets in its tensor (empty for a bytes item).
    pub offsets: Vec<u64>,
    /// The data file, relative to the DCP directory.
    pub relative_path: String,
    pub offset: u64,
    pub length: u64,
}

/// A parsed `.metadata`.
#[derive(Debug, Clone, Default)]
pub struct Metadata {
    pub tensors: BTreeMap<String, TensorMeta>,
    /// FQNs stored as pickled objects (step counters, `param_groups` values).
    pub objects: Vec<String>,
    pub items: Vec<Item>,
}

/// Parses a `.metadata` file.
pub fn parse_metadata(bytes: &[u8]) -> Result<Metadata, String> {
    let p = torch::pickle::parse(bytes)?;
    let root = p.root;
    expect_class(&p, root, "Metadata")?;
    let entries = attr(&p, root, "state_dict_metadata")
        .and_then(|d| p.dict(d))
        .ok_or("`state_dict_metadata` is not a dict")?;
    let mut meta = Metadata::default();
    for &(k, v) in entries {
        let fqn = p
            .str(k)
            .ok_or("a state_dict_metadata key is not a string")?;
        match class_name(&p, v) {
            Some("TensorStorageMetadata") => {
                let tensor = tensor_meta(&p, v).map_err(|e| format!("`{fqn}`: {e}"))?;
                meta.tensors.insert(fqn.to_string(), tensor);
            }
            Some("BytesStorageMetadata") => meta.objects.push(fqn.to_string()),
            other => return Err(format!("`{fqn}`: unknown storage metadata {other:?}")),
        }
    }
    let storage = attr(&p, root, "storage_data")
        .and_then(|d| p.dict(d))
        .ok_or("`storage_data` is not a dict (a storage layer other than the file system?)")?;
    for &(k, v) in storage {
        meta.items.push(item(&p, k, v)?);
    }
    Ok(meta)
}

fn tensor_meta(p: &Pickle, v: Id) -> Result<TensorMeta, String> {
    let properties = attr(p, v, "properties").ok_or("no `properties`")?;
    let dtype = properties_dtype(p, properties)?;
    let size = torch_size(p, attr(p, v, "size").ok_or("no `size`")?)?;
    let chunk_list = attr(p, v, "chunks")
        .and_then(|c| p.seq(c))
        .ok_or("`chunks` is not a list")?;
    let mut chunks = Vec::with_capacity(chunk_list.len());
    for &c in chunk_list {
        let offsets = torch_size(p, attr(p, c, "offsets").ok_or("a chunk has no `offsets`")?)?;
        let sizes = torch_size(p, attr(p, c, "sizes").ok_or("a chunk has no `sizes`")?)?;
        if offsets.len() != size.len() || sizes.len() != size.len() {
            return Err("a chunk's rank differs from the tensor's".into());
        }
        let inside = offsets
            .iter()
            .zip(&sizes)
            .zip(&size)
            .all(|((&o, &s), &n)| o.checked_add(s).is_some_and(|end| end <= n));
        if !inside {
            return Err(format!(
                "chunk at {offsets:?} of size {sizes:?} lies outside {size:?}"
            ));
        }
        chunks.push((offsets, sizes));
    }
    Ok(TensorMeta {
        dtype,
        size,
        chunks,
    })
}

/// `TensorProperties` pickles its fields as a tuple (its `__getstate__`):
/// `(dtype, layout, requires_grad, memory_format, pin_memory)`; older
/// versions as a dict.
fn properties_dtype(p: &Pickle, properties: Id) -> Result<Dtype, String> {
    let dtype = match p.node(properties) {
        Node::Call { state: Some(s), .. } => match p.seq(*s) {
            Some(fields) => fields.first().copied(),
            None => p.get(*s, "dtype"),
        },
        _ => None,
    }
    .ok_or("`properties` has no dtype")?;
    match p.global(dtype) {
        Some(("torch", name)) => torch_dtype(name).ok_or_else(|| format!("dtype torch.{name}")),
        _ => Err("the dtype is not a torch global".into()),
    }
}

/// A `torch.<name>` dtype.
pub fn torch_dtype(name: &str) -> Option<Dtype> {
    Some(match name {
        "float32" | "float" => Dtype::F32,
        "float64" | "double" => Dtype::F64,
        "float16" | "half" => Dtype::F16,
        "bfloat16" => Dtype::BF16,
        "int64" | "long" => Dtype::I64,
        "int32" | "int" => Dtype::I32,
        "int16" | "short" => Dtype::I16,
        "int8" => Dtype::I8,
        "uint8" => Dtype::U8,
        "bool" => Dtype::BOOL,
        _ => return None,
    })
}

fn item(p: &Pickle, key: Id, value: Id) -> Result<Item, String> {
    expect_class(p, key, "MetadataIndex")?;
    let fqn = attr(p, key, "fqn")
        .and_then(|f| p.str(f))
        .ok_or("a MetadataIndex has no `fqn`")?;
    let bad = |what: &str| format!("storage of `{fqn}`: {what}");
    let offsets = match attr(p, key, "offset") {
        Some(o) if !matches!(p.node(o), Node::None) => torch_size(p, o).map_err(|e| bad(&e))?,
        _ => Vec::new(),
    };
    let int = |name: &str| {
        attr(p, value, name)
            .and_then(|v| p.int(v))
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| bad(&format!("`{name}` is not a non-negative int")))
    };
    let relative_path = attr(p, value, "relative_path")
        .and_then(|v| p.str(v))
        .ok_or_else(|| bad("`relative_path` is not a string"))?;
    if relative_path.contains("..") || relative_path.starts_with('/') {
        return Err(bad(&format!("path `{relative_path}` leaves the directory")));
    }
    if attr(p, value, "transform_descriptors")
        .and_then(|t| p.seq(t))
        .is_some_and(|t| !t.is_empty())
    {
        return Err(bad("stored with transforms (compression?), not read"));
    }
    Ok(Item {
        fqn: fqn.to_string(),
        offsets,
        relative_path: relative_path.to_string(),
        offset: int("offset")?,
        length: int("length")?,
    })
}

/// The class name of a `NEWOBJ`/`REDUCE` object.
fn class_name(p: &Pickle, id: Id) -> Option<&str> {
    match p.node(id) {
        Node::Call { func, .. } => p.global(*func).map(|(_, name)| name),
        _ => None,
    }
}

fn expect_class(p: &Pickle, id: Id, name: &str) -> Result<(), String> {
    match class_name(p, id) {
        Some(n) if n == name => Ok(()),
        other => Err(format!("expected a {name}, found {other:?}")),
    }
}

/// How a chunk is named: the FQN alone when the chunk is the whole tensor,
/// else the FQN with the chunk's ranges, `fc1.weight[128:255,0:64]`.
pub fn chunk_name(fqn: &str, offsets: &[u64], sizes: &[u64], size: &[u64]) -> String {
    if offsets.iter().all(|&o| o == 0) && sizes == size {
        return fqn.to_string();
    }
    let ranges: Vec<String> = offsets
        .iter()
        .zip(sizes)
        .map(|(o, s)| format!("{o}:{}", o + s))
        .collect();
    format!("{fqn}[{}]", ranges.join(","))
}

/// One tensor chunk found in a data file, parallel to the torch file's
/// tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkKey {
    pub fqn: String,
    pub offsets: Vec<u64>,
}

/// Reads data file `relative_path` of a DCP directory: every item the
/// metadata places in it, as one torch file whose tensors are the chunks.
pub fn parse_data_file(
    relative_path: &str,
    bytes: &[u8],
    meta: &Metadata,
) -> Result<(TorchFile, Vec<ChunkKey>), String> {
    let mut items: Vec<&Item> = meta
        .items
        .iter()
        .filter(|i| i.relative_path == relative_path)
        .collect();
    items.sort_by_key(|i| i.offset);
    let mut out = TorchFile {
        tensors: Vec::new(),
        crc_fields: Vec::new(),
        optimizer: None,
        paths: Vec::new(),
    };
    let mut keys = Vec::new();
    let mut end = 0u64;
    for item in items {
        let bad = |what: String| format!("item `{}` at byte {}: {what}", item.fqn, item.offset);
        if item.offset < end {
            return Err(bad("overlaps the previous item".into()));
        }
        end = item
            .offset
            .checked_add(item.length)
            .filter(|&e| e <= bytes.len() as u64)
            .ok_or_else(|| bad(format!("runs past the file's {} bytes", bytes.len())))?;
        let Some(tensor) = meta.tensors.get(&item.fqn) else {
            continue; // a pickled object: kept verbatim
        };
        let sizes = tensor
            .chunks
            .iter()
            .find(|(o, _)| *o == item.offsets)
            .map(|(_, s)| s)
            .ok_or_else(|| bad("no chunk at these offsets in the metadata".into()))?;
        let slice = &bytes[item.offset as usize..end as usize];
        let parsed = torch::parse(slice).map_err(bad)?;
        let [info] = parsed.tensors.as_slice() else {
            return Err(bad(format!(
                "holds {} storages, not one",
                parsed.tensors.len()
            )));
        };
        let numel: u64 = sizes.iter().product();
        let elem = (tensor.dtype.bitsize() / 8) as u64;
        if info.dtype != tensor.dtype || info.byte_len() != numel * elem {
            return Err(bad(format!(
                "its storage ({} bytes of {:?}) is not the chunk ({numel} × {:?})",
                info.byte_len(),
                info.dtype,
                tensor.dtype
            )));
        }
        let mut info = info.clone();
        info.name = chunk_name(&item.fqn, &item.offsets, sizes, &tensor.size);
        info.shape = sizes.clone();
        info.begin += item.offset;
        info.end += item.offset;
        out.tensors.push(info);
        out.crc_fields.push(
            parsed.crc_fields[0]
                .iter()
                .map(|f| f + item.offset)
                .collect(),
        );
        out.paths.push(vec![item.fqn.clone()]);
        keys.push(ChunkKey {
            fqn: item.fqn.clone(),
            offsets: item.offsets.clone(),
        });
    }
    Ok((out, keys))
}

/// The Adam moments DCP keys by parameter FQN: `<prefix>state.<param>.<key>`.
const MOMENTS: [&str; 2] = ["exp_avg", "exp_avg_sq"];

/// Splits an optimizer moment FQN into (parameter, moment key).
fn moment_of(fqn: &str) -> Option<(&str, &str)> {
    let key = MOMENTS.iter().find(|k| fqn.ends_with(&format!(".{k}")))?;
    let rest = &fqn[..fqn.len() - key.len() - 1];
    let start = if rest.starts_with("state.") {
        0
    } else {
        rest.find(".state.")? + 1
    };
    Some((&rest[start + "state.".len()..], key))
}

/// Whether an FQN is optimizer state rather than a model tensor.
fn is_optimizer_entry(fqn: &str) -> bool {
    ["state.", "param_groups."]
        .iter()
        .any(|p| fqn.starts_with(p) || fqn.contains(&format!(".{p}")))
}

/// A DCP chunk anywhere in the checkpoint: (file index, tensor index).
pub struct Located<'a> {
    pub file: usize,
    pub tensor: usize,
    pub key: &'a ChunkKey,
    pub name: &'a str,
    pub global_size: &'a [u64],
}

/// Pairs each moment chunk with the weight chunk of the same parameter and
/// offsets. Returns the aliases (moment chunk → `<weight chunk>.<key>`) and
/// a note on what was paired.
pub fn pair_moments(chunks: &[Located<'_>]) -> (HashMap<(usize, usize), String>, Vec<String>) {
    let mut params: HashMap<&str, &[u64]> = HashMap::new();
    let mut by_key: HashMap<(&str, &[u64]), &Located<'_>> = HashMap::new();
    for c in chunks {
        if !is_optimizer_entry(&c.key.fqn) {
            params.insert(&c.key.fqn, c.global_size);
            by_key.insert((&c.key.fqn, &c.key.offsets), c);
        }
    }
    let mut aliases = HashMap::new();
    let (mut paired, mut moments, mut ambiguous) = (0usize, 0usize, Vec::new());
    for c in chunks {
        let Some((param, key)) = moment_of(&c.key.fqn) else {
            continue;
        };
        moments += 1;
        let candidates: Vec<&str> = params
            .iter()
            .filter(|(fqn, size)| {
                (**fqn == param || fqn.ends_with(&format!(".{param}"))) && **size == c.global_size
            })
            .map(|(fqn, _)| *fqn)
            .collect();
        let [weight] = candidates[..] else {
            if candidates.len() > 1 {
                ambiguous.push(c.key.fqn.clone());
            }
            continue;
        };
        if let Some(w) = by_key.get(&(weight, c.key.offsets.as_slice())) {
            aliases.insert((c.file, c.tensor), format!("{}.{key}", w.name));
            paired += 1;
        }
    }
    let mut notes = Vec::new();
    if moments > 0 {
        notes.push(format!(
            "distributed checkpoint: {paired} of {moments} Adam moment chunks paired with their parameter's chunk by name"
        ));
    }
    if !ambiguous.is_empty() {
        notes.push(format!(
            "distributed checkpoint: {} moments match more than one parameter and stay unpaired (e.g. `{}`)",
            ambiguous.len(),
            ambiguous[0]
        ));
    }
    (aliases, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/dcp/step-000006");

    #[test]
    fn real_metadata_is_read() {
        let bytes = std::fs::read(format!("{STEP}/.metadata")).unwrap();
        let meta = parse_metadata(&bytes).unwrap();
        let w = &meta.tensors["model.fc1.weight"];
        assert_eq!(w.dtype, Dtype::F32);
        assert_eq!(w.chunks.len(), 2, "two ranks hold one chunk each");
        assert!(meta.tensors.contains_key("optim.state.fc1.weight.exp_avg"));
        assert!(
            meta.items
                .iter()
                .all(|i| i.relative_path.ends_with(".distcp"))
        );
    }

    #[test]
    fn data_files_are_the_items_chunks() {
        let meta = parse_metadata(&std::fs::read(format!("{STEP}/.metadata")).unwrap()).unwrap();
        for file in ["__0_0.distcp", "__1_0.distcp"] {
            let bytes = std::fs::read(format!("{STEP}/{file}")).unwrap();
            let (torch, keys) = parse_data_file(file, &bytes, &meta).unwrap();
            assert_eq!(torch.tensors.len(), keys.len());
            assert!(
                torch
                    .tensors
                    .iter()
                    .any(|t| t.name.starts_with("model.fc1.weight["))
            );
        }
    }

    #[test]
    fn moment_names_split() {
        assert_eq!(
            moment_of("optim.state.fc1.weight.exp_avg_sq"),
            Some(("fc1.weight", "exp_avg_sq"))
        );
        assert_eq!(moment_of("state.w.exp_avg"), Some(("w", "exp_avg")));
        assert_eq!(moment_of("optim.state.fc1.weight.step"), None);
        assert!(is_optimizer_entry("optimizer.param_groups.w.lr"));
        assert!(!is_optimizer_entry("model.fc1.weight"));
    }

    #[test]
    fn chunk_names_show_their_ranges() {
        assert_eq!(chunk_name("w", &[0, 0], &[4, 8], &[4, 8]), "w");
        assert_eq!(chunk_name("w", &[4, 0], &[3, 8], &[7, 8]), "w[4:7,0:8]");
    }
}
