//! Files written by `torch.save` (`optimizer.pt`, `pytorch_model.bin`,
//! `rng_state.pth`, ...): a stored zip archive holding `data.pkl` (the pickled
//! object) and one record `data/<key>` per tensor storage.
//!
//! We read where every storage lies in the file and name it by where its
//! tensor sits in the pickled object (`state.3.exp_avg` in an optimizer
//! state dict, `model.layer.weight` in a `{"model": ...}` dict). Everything
//! that is not storage data (the zip structures and the pickle) is kept as
//! it is, so checkout writes the same bytes back and only rewrites the
//! CRC-32 fields of storages whose content changed (see [`zip::Record`]).

pub mod pickle;
pub mod zip;

use std::collections::{BTreeMap, HashMap, HashSet};

use safetensors::Dtype;

use super::safetensors::TensorInfo;
use pickle::{Id, Node, Pickle};

/// The four bytes every zip archive (and so every modern torch file) starts with.
pub const ZIP_MAGIC: &[u8] = b"PK\x03\x04";

/// A parsed `torch.save` file.
#[derive(Debug, Clone)]
pub struct TorchFile {
    /// One entry per storage, in file order; `begin`/`end` are absolute
    /// offsets in the file.
    pub tensors: Vec<TensorInfo>,
    /// For each tensor, the offsets of its record's CRC-32 fields.
    pub crc_fields: Vec<Vec<u64>>,
    /// Set when the pickle is an optimizer state dict, or holds one.
    pub optimizer: Option<OptimizerState>,
    /// For each tensor, where the pickle uses its storage (`a.b.0`), in
    /// the order met: what names a storage that is not one whole tensor.
    pub paths: Vec<Vec<String>>,
}

/// The layout of a `torch.optim` state dict: `state` keyed by parameter
/// index, `param_groups` listing the indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptimizerState {
    /// Prefix of the state's tensor names: empty for a bare state dict,
    /// `"optimizer."` for one stored under that key.
    pub prefix: String,
    /// Parameter indices in `param_groups` order.
    pub params: Vec<i64>,
}

impl OptimizerState {
    /// Name of a state entry of parameter `index`, e.g. `state.3.exp_avg`.
    pub fn entry(&self, index: i64, key: &str) -> String {
        format!("{}state.{index}.{key}", self.prefix)
    }
}

/// Parses `bytes`, a whole torch zip file. The error says what is not
/// understood; callers keep such a file as opaque bytes.
pub fn parse(bytes: &[u8]) -> Result<TorchFile, String> {
    if !bytes.starts_with(ZIP_MAGIC) {
        return Err("not a zip archive (torch's legacy format is not read)".into());
    }
    let records = zip::records(bytes)?;
    let pkl = records
        .iter()
        .find(|r| r.name.ends_with("/data.pkl") && r.name.matches('/').count() == 1)
        .ok_or("no `<archive>/data.pkl` record (not a torch.save file)")?;
    let archive = pkl.name.trim_end_matches("/data.pkl");
    if let Some(order) = records
        .iter()
        .find(|r| r.name == format!("{archive}/byteorder"))
    {
        let order = &bytes[order.data_start as usize..order.data_end() as usize];
        if order != b"little" {
            return Err(format!(
                "byte order `{}` is not supported",
                String::from_utf8_lossy(order)
            ));
        }
    }
    let pickle = pickle::parse(&bytes[pkl.data_start as usize..pkl.data_end() as usize])?;
    let mut refs = Vec::new();
    find_tensors(
        &pickle,
        pickle.root,
        &mut String::new(),
        &mut HashSet::new(),
        &mut refs,
        0,
    )?;
    let by_record: HashMap<&str, &zip::Record> =
        records.iter().map(|r| (r.name.as_str(), r)).collect();
    let (tensors, crc_fields, paths) = storages(archive, &refs, &by_record)?;
    check_crc_fields(&tensors, &crc_fields)?;
    Ok(TorchFile {
        tensors,
        crc_fields,
        optimizer: optimizer_state(&pickle),
        paths,
    })
}

/// The pickled object of a torch file, as a value tree (for readers that
/// need more of it than the tensors, e.g. DeepSpeed's `param_shapes`).
pub fn parse_pickle(bytes: &[u8]) -> Result<Pickle, String> {
    let records = zip::records(bytes)?;
    let pkl = records
        .iter()
        .find(|r| r.name.ends_with("/data.pkl") && r.name.matches('/').count() == 1)
        .ok_or("no `<archive>/data.pkl` record (not a torch.save file)")?;
    pickle::parse(&bytes[pkl.data_start as usize..pkl.data_end() as usize])
}

/// A tensor found in the pickle.
#[derive(Debug)]
struct TensorRef {
    path: String,
    storage: String,
    storage_type: String,
    storage_numel: u64,
    offset: u64,
    size: Vec<u64>,
    stride: Vec<u64>,
}

impl TensorRef {
    /// Whether the tensor is its whole storage, in row-major order.
    fn covers_storage(&self) -> bool {
        let mut expected = 1u64;
        for (&d, &s) in self.size.iter().zip(&self.stride).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected = expected.saturating_mul(d);
        }
        self.offset == 0 && expected == self.storage_numel && self.size.len() == self.stride.len()
    }
}

const MAX_DEPTH: usize = 200;

/// Collects every tensor reachable from `id`, named by its path.
fn find_tensors(
    p: &Pickle,
    id: Id,
    path: &mut String,
    seen: &mut HashSet<Id>,
    out: &mut Vec<TensorRef>,
    depth: usize,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("pickle nests deeper than {MAX_DEPTH} levels"));
    }
    if !seen.insert(id) {
        return Ok(());
    }
    let mut visit = |child: Id, key: &str, path: &mut String| {
        let len = path.len();
        if !key.is_empty() {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(key);
        }
        let r = find_tensors(p, child, path, seen, out, depth + 1);
        path.truncate(len);
        r
    };
    if let Some(items) = p.dict(id) {
        for &(k, v) in items {
            let key = match p.node(k) {
                Node::Str(s) => s.clone(),
                Node::Int(i) => i.to_string(),
                _ => "?".into(),
            };
            visit(v, &key, path)?;
        }
        return Ok(());
    }
    match p.node(id) {
        Node::List(items) | Node::Tuple(items) => {
            for (i, &item) in items.iter().enumerate() {
                visit(item, &i.to_string(), path)?;
            }
        }
        Node::Call { func, args, .. } if is_tensor_rebuild(p, *func) => {
            out.push(tensor_ref(p, *args, path)?);
        }
        // A tensor with Python attributes (DeepSpeed's `ds_id`):
        // `_rebuild_from_type_v2(_rebuild_tensor_v2, Tensor, args, attrs)`.
        Node::Call { func, args, .. }
            if p.global(*func) == Some(("torch._tensor", "_rebuild_from_type_v2")) =>
        {
            if let Some(&[inner, _, inner_args, ..]) = p.seq(*args)
                && is_tensor_rebuild(p, inner)
            {
                out.push(tensor_ref(p, inner_args, path)?);
            }
        }
        Node::Call {
            args,
            state,
            items,
            appended,
            ..
        } => {
            // An object wrapping tensors (an nn.Parameter, a dataclass):
            // its tensors keep the object's path.
            let children = [*args]
                .into_iter()
                .chain(*state)
                .chain(items.iter().map(|&(_, v)| v))
                .chain(appended.iter().copied());
            for child in children.collect::<Vec<_>>() {
                visit(child, "", path)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn is_tensor_rebuild(p: &Pickle, func: Id) -> bool {
    matches!(
        p.global(func),
        Some(("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor"))
    )
}

/// Reads `_rebuild_tensor_v2((storage pid), offset, size, stride, ...)`.
fn tensor_ref(p: &Pickle, args: Id, path: &str) -> Result<TensorRef, String> {
    let bad = |what: &str| format!("tensor `{path}`: {what}");
    let args = p
        .seq(args)
        .ok_or_else(|| bad("arguments are not a tuple"))?;
    let [pid, offset, size, stride, ..] = args[..] else {
        return Err(bad("fewer than 4 arguments"));
    };
    let Node::PersistentId(pid) = p.node(pid) else {
        return Err(bad("first argument is not a storage reference"));
    };
    let pid = p
        .seq(*pid)
        .ok_or_else(|| bad("storage reference is not a tuple"))?;
    let [tag, storage_type, key, _location, numel] = pid[..] else {
        return Err(bad("storage reference does not have 5 fields"));
    };
    if p.str(tag) != Some("storage") {
        return Err(bad("storage reference is not tagged `storage`"));
    }
    let (_, storage_type) = p
        .global(storage_type)
        .ok_or_else(|| bad("storage type is not a global"))?;
    let dims = |id: Id| -> Result<Vec<u64>, String> {
        p.seq(id)
            .ok_or_else(|| bad("size or stride is not a tuple"))?
            .iter()
            .map(|&d| {
                p.int(d)
                    .and_then(|d| u64::try_from(d).ok())
                    .ok_or_else(|| bad("size or stride is not a non-negative int"))
            })
            .collect()
    };
    let int = |id: Id, what: &str| {
        p.int(id)
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| bad(what))
    };
    Ok(TensorRef {
        path: path.to_string(),
        storage: p
            .str(key)
            .ok_or_else(|| bad("storage key is not a string"))?
            .to_string(),
        storage_type: storage_type.to_string(),
        storage_numel: int(numel, "storage size is not an int")?,
        offset: int(offset, "storage offset is not an int")?,
        size: dims(size)?,
        stride: dims(stride)?,
    })
}

/// The dtype of a legacy typed storage class, e.g. `FloatStorage` → F32.
fn storage_dtype(storage_type: &str) -> Option<Dtype> {
    Some(match storage_type {
        "FloatStorage" => Dtype::F32,
        "DoubleStorage" => Dtype::F64,
        "HalfStorage" => Dtype::F16,
        "BFloat16Storage" => Dtype::BF16,
        "LongStorage" => Dtype::I64,
        "IntStorage" => Dtype::I32,
        "ShortStorage" => Dtype::I16,
        "CharStorage" => Dtype::I8,
        "ByteStorage" => Dtype::U8,
        "BoolStorage" => Dtype::BOOL,
        _ => return None,
    })
}

/// One [`TensorInfo`] per referenced storage, sorted by file offset: named
/// by its tensor when exactly one tensor is the whole storage, otherwise
/// `storage.<key>` with a flat shape (views and shared storages stay exact,
/// they are just not paired with parameters).
type Storages = (Vec<TensorInfo>, Vec<Vec<u64>>, Vec<Vec<String>>);

fn storages(
    archive: &str,
    refs: &[TensorRef],
    records: &HashMap<&str, &zip::Record>,
) -> Result<Storages, String> {
    let mut by_key: BTreeMap<&str, Vec<&TensorRef>> = BTreeMap::new();
    for r in refs {
        by_key.entry(r.storage.as_str()).or_default().push(r);
    }
    let mut path_count: HashMap<&str, usize> = HashMap::new();
    for r in refs {
        *path_count.entry(r.path.as_str()).or_default() += 1;
    }
    let mut out = Vec::with_capacity(by_key.len());
    let mut names = HashSet::new();
    for (key, users) in by_key {
        let first = users[0];
        if users.iter().any(|u| u.storage_type != first.storage_type) {
            return Err(format!("storage {key} is used with two types"));
        }
        let record = records
            .get(format!("{archive}/data/{key}").as_str())
            .ok_or_else(|| format!("storage {key} has no `{archive}/data/{key}` record"))?;
        let dtype = storage_dtype(&first.storage_type);
        let elem = dtype.map_or(1, |d| (d.bitsize() / 8) as u64);
        let numel = first.storage_numel;
        if numel.checked_mul(elem) != Some(record.len) && dtype.is_some() {
            return Err(format!(
                "storage {key}: {numel} elements of {} but its record holds {} bytes",
                first.storage_type, record.len
            ));
        }
        let whole = users.len() == 1
            && first.covers_storage()
            && !first.path.is_empty()
            && path_count[first.path.as_str()] == 1;
        let (name, shape, dtype) = match dtype {
            Some(d) if whole => (first.path.clone(), first.size.clone(), d),
            Some(d) => (format!("storage.{key}"), vec![numel], d),
            None => (format!("storage.{key}"), vec![record.len], Dtype::U8),
        };
        if !names.insert(name.clone()) {
            return Err(format!("two storages would both be named `{name}`"));
        }
        out.push((
            TensorInfo {
                name,
                dtype,
                shape,
                begin: record.data_start,
                end: record.data_end(),
            },
            record.crc_fields.clone(),
            users.iter().map(|u| u.path.clone()).collect(),
        ));
    }
    out.sort_by_key(|(t, _, _)| t.begin);
    let mut tensors = Vec::with_capacity(out.len());
    let mut crc_fields = Vec::with_capacity(out.len());
    let mut paths = Vec::with_capacity(out.len());
    for (t, c, p) in out {
        tensors.push(t);
        crc_fields.push(c);
        paths.push(p);
    }
    Ok((tensors, crc_fields, paths))
}

/// Checkout writes each tensor's CRC-32 at its fields after writing the
/// data; a field inside any tensor's data, or shared by two tensors, would
/// change bytes that were already verified. Only a crafted archive has one.
fn check_crc_fields(tensors: &[TensorInfo], crc_fields: &[Vec<u64>]) -> Result<(), String> {
    let mut fields: Vec<u64> = crc_fields.iter().flatten().copied().collect();
    fields.sort_unstable();
    if fields.windows(2).any(|w| w[1] < w[0] + 4) {
        return Err("two CRC fields overlap".into());
    }
    // Tensors are sorted and disjoint: the one that could hold a field is
    // the last that begins before the field ends.
    for &f in &fields {
        let i = tensors.partition_point(|t| t.begin < f + 4);
        if i > 0 && tensors[i - 1].end > f {
            return Err(format!(
                "a CRC field at byte {f} lies inside tensor `{}`",
                tensors[i - 1].name
            ));
        }
    }
    Ok(())
}

/// The optimizer state dict at the root, or under one key of the root.
fn optimizer_state(p: &Pickle) -> Option<OptimizerState> {
    let params_of = |dict: Id| -> Option<Vec<i64>> {
        p.dict(p.get(dict, "state")?)?;
        let groups = p.seq(p.get(dict, "param_groups")?)?;
        let mut params = Vec::new();
        for &g in groups {
            for &i in p.seq(p.get(g, "params")?)? {
                params.push(p.int(i)?);
            }
        }
        Some(params)
    };
    if let Some(params) = params_of(p.root) {
        return Some(OptimizerState {
            prefix: String::new(),
            params,
        });
    }
    p.dict(p.root)?.iter().find_map(|&(k, v)| {
        Some(OptimizerState {
            prefix: format!("{}.", p.str(k)?),
            params: params_of(v)?,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, begin: u64, end: u64) -> TensorInfo {
        TensorInfo {
            name: name.into(),
            dtype: Dtype::F32,
            shape: vec![(end - begin) / 4],
            begin,
            end,
        }
    }

    #[test]
    fn crc_fields_must_stay_out_of_tensor_data() {
        let tensors = [tensor("a", 100, 200), tensor("b", 300, 400)];
        assert!(check_crc_fields(&tensors, &[vec![10, 250], vec![296, 500]]).is_ok());
        let inside = check_crc_fields(&tensors, &[vec![10, 198], vec![500]]).unwrap_err();
        assert!(inside.contains("tensor `a`"), "{inside}");
        assert!(check_crc_fields(&tensors, &[vec![10], vec![397]]).is_err());
        assert!(
            check_crc_fields(&tensors, &[vec![10], vec![12]])
                .unwrap_err()
                .contains("overlap")
        );
    }

    #[test]
    fn a_real_optimizer_file_is_read() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/trainer-run/checkpoint-10/optimizer.pt"
        );
        let file = parse(&std::fs::read(path).unwrap()).unwrap();
        let optimizer = file.optimizer.unwrap();
        assert_eq!(optimizer.prefix, "");
        assert_eq!(optimizer.params, (0..28).collect::<Vec<i64>>());
        assert_eq!(file.tensors.len(), 28 * 3);
        let exp_avg = file
            .tensors
            .iter()
            .find(|t| t.name == "state.0.exp_avg")
            .unwrap();
        assert_eq!(exp_avg.shape, vec![256, 48]);
        assert_eq!(exp_avg.begin % 64, 0, "torch aligns storages to 64 bytes");
    }
}
