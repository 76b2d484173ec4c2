//! Reading safetensors files: the header is parsed and checked strictly, so that
//! every problem is reported with the file, the tensor and what is wrong with it.
//!
//! Layout (see docs/format.md): `u64` little-endian header length `N`, `N` bytes of
//! JSON, then the data section. Every tensor's `data_offsets` are relative to the
//! data section, and the tensors must tile it exactly: no gaps, no overlaps, no
//! trailing bytes. That strictness is what lets checkout rebuild the file
//! byte-for-byte from the original header bytes plus the tensors in offset order.

use std::path::Path;

use safetensors::Dtype;

use crate::format::FormatError;

/// Largest header the safetensors reference implementation accepts.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor as the header describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// Byte range inside the data section, `[begin, end)`.
    pub begin: u64,
    pub end: u64,
}

impl TensorInfo {
    pub fn byte_len(&self) -> u64 {
        self.end - self.begin
    }
}

/// A parsed and validated safetensors header.
#[derive(Debug, Clone)]
pub struct Header {
    /// The original bytes from the start of the file to the start of the data
    /// section (length prefix + JSON, padding included), kept verbatim so that
    /// output files are byte-identical to their inputs.
    pub raw: Vec<u8>,
    /// Tensors in data-offset order.
    pub tensors: Vec<TensorInfo>,
}

impl Header {
    /// Offset of the data section from the start of the file.
    pub fn data_start(&self) -> u64 {
        self.raw.len() as u64
    }

    pub fn data_len(&self) -> u64 {
        self.tensors.last().map_or(0, |t| t.end)
    }
}

/// Number of bytes per element used for byte-plane splitting; sub-byte dtypes
/// (F4, F6) are treated as a plain byte stream.
pub fn element_size(dtype: Dtype) -> usize {
    (dtype.bitsize() / 8).max(1)
}

/// Parses and validates the header of the safetensors file `bytes` (usually a
/// memory map of the whole file); `path` is only used in error messages.
pub fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header, FormatError> {
    parse_header_of(path, bytes, bytes.len() as u64)
}

/// Like [`parse_header`] for a file of `file_len` bytes of which only the
/// start, `bytes` (at least the header), is at hand: a file assembled in
/// memory from a header and tensor buffers.
pub fn parse_header_of(path: &Path, bytes: &[u8], file_len: u64) -> Result<Header, FormatError> {
    let bad = |what: String| FormatError::Safetensors {
        path: path.to_path_buf(),
        what,
    };
    if file_len < 8 || bytes.len() < 8 {
        return Err(bad(format!(
            "file is truncated: {file_len} bytes, too short for the 8-byte header length"
        )));
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if header_len > MAX_HEADER_LEN {
        return Err(bad(format!(
            "header length {header_len} exceeds the {MAX_HEADER_LEN}-byte limit (not a safetensors file?)"
        )));
    }
    if 8 + header_len > file_len || 8 + header_len > bytes.len() as u64 {
        return Err(bad(format!(
            "file is truncated: header says {header_len} bytes of JSON but only {} bytes follow",
            file_len - 8
        )));
    }
    let json_bytes = &bytes[8..(8 + header_len) as usize];
    let json = std::str::from_utf8(json_bytes)
        .map_err(|e| bad(format!("header is not valid UTF-8: {e}")))?;
    let Entries(entries) = serde_json::from_str(json)
        .map_err(|e| bad(format!("header is not a valid JSON object: {e}")))?;
    let mut seen = std::collections::HashSet::new();
    if let Some((name, _)) = entries.iter().find(|(name, _)| !seen.insert(name.as_str())) {
        return Err(bad(format!(
            "tensor name `{name}` appears twice in the header"
        )));
    }

    let mut tensors = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if name == "__metadata__" {
            check_metadata(&value).map_err(&bad)?;
            continue;
        }
        tensors.push(parse_tensor(&name, value).map_err(&bad)?);
    }
    tensors.sort_by(|a, b| (a.begin, a.end, &a.name).cmp(&(b.begin, b.end, &b.name)));

    let data_len = file_len - 8 - header_len;
    check_tiling(&tensors, data_len).map_err(&bad)?;
    Ok(Header {
        raw: bytes[..(8 + header_len) as usize].to_vec(),
        tensors,
    })
}

/// The header's top-level entries in file order, duplicates kept (a map
/// type would silently keep only the last of two equal names).
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    out.push(entry);
                }
                Ok(Entries(out))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

fn check_metadata(value: &serde_json::Value) -> Result<(), String> {
    let map = value
        .as_object()
        .ok_or("`__metadata__` must be an object of strings")?;
    match map.iter().find(|(_, v)| !v.is_string()) {
        Some((k, _)) => Err(format!("`__metadata__` value of `{k}` is not a string")),
        None => Ok(()),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensorInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

fn parse_tensor(name: &str, value: serde_json::Value) -> Result<TensorInfo, String> {
    let raw: RawTensorInfo = serde_json::from_value(value)
        .map_err(|e| format!("tensor `{name}`: malformed entry: {e}"))?;
    let dtype: Dtype = serde_json::from_value(serde_json::Value::String(raw.dtype.clone()))
        .map_err(|_| format!("tensor `{name}`: unknown dtype `{}`", raw.dtype))?;
    let (begin, end) = raw.data_offsets;
    if end < begin {
        return Err(format!(
            "tensor `{name}`: data_offsets [{begin}, {end}) end before they begin"
        ));
    }
    let elements = raw
        .shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("tensor `{name}`: shape {:?} overflows", raw.shape))?;
    let bits = elements
        .checked_mul(dtype.bitsize() as u64)
        .ok_or_else(|| format!("tensor `{name}`: shape {:?} overflows", raw.shape))?;
    if bits % 8 != 0 || bits / 8 != end - begin {
        return Err(format!(
            "tensor `{name}`: shape {:?} of {dtype} is {elements} elements ({} bytes) but data_offsets [{begin}, {end}) hold {} bytes",
            raw.shape,
            bits.div_ceil(8),
            end - begin
        ));
    }
    Ok(TensorInfo {
        name: name.to_string(),
        dtype,
        shape: raw.shape,
        begin,
        end,
    })
}

/// The tensors, sorted by offset, must cover `[0, data_len)` exactly once.
fn check_tiling(tensors: &[TensorInfo], data_len: u64) -> Result<(), String> {
    let mut cursor = 0u64;
    let mut previous: Option<&str> = None;
    for t in tensors {
        if t.end > data_len {
            return Err(format!(
                "tensor `{}`: data_offsets [{}, {}) run past the end of the file (data section is {data_len} bytes; truncated file?)",
                t.name, t.begin, t.end
            ));
        }
        if t.begin < cursor {
            return Err(format!(
                "tensor `{}`: data_offsets [{}, {}) overlap tensor `{}` which ends at {cursor}",
                t.name,
                t.begin,
                t.end,
                previous.unwrap_or("?")
            ));
        }
        if t.begin > cursor {
            return Err(format!(
                "tensor `{}`: data_offsets start at {} leaving a gap of {} unused bytes after offset {cursor}",
                t.name,
                t.begin,
                t.begin - cursor
            ));
        }
        cursor = t.end;
        previous = Some(&t.name);
    }
    if cursor != data_len {
        return Err(format!(
            "data section is {data_len} bytes but the tensors cover only {cursor}: {} trailing bytes",
            data_len - cursor
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data_len: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data_len));
        v
    }

    fn err(bytes: &[u8]) -> String {
        parse_header(Path::new("x.safetensors"), bytes)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn parses_and_sorts_by_offset() {
        let h = r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"U8","shape":[3],"data_offsets":[8,11]},"__metadata__":{"format":"pt"}}"#;
        let parsed = parse_header(Path::new("x"), &file(h, 11)).unwrap();
        let names: Vec<_> = parsed.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["b", "a"]);
        assert_eq!(parsed.data_start(), 8 + h.len() as u64);
        assert_eq!(parsed.data_len(), 11);
    }

    #[test]
    fn reports_each_kind_of_damage() {
        assert!(err(&[1, 2, 3]).contains("truncated"));
        assert!(err(&file("{not json", 0)).contains("not a valid JSON"));
        let unknown = r#"{"a":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}}"#;
        assert!(err(&file(unknown, 4)).contains("unknown dtype `F33`"));
        let shape = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        assert!(err(&file(shape, 8)).contains("3 elements"));
        let past = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        assert!(err(&file(past, 4)).contains("run past the end"));
        let overlap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        assert!(err(&file(overlap, 8)).contains("overlap"));
        let gap = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        assert!(err(&file(gap, 8)).contains("gap"));
        let trailing = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        assert!(err(&file(trailing, 8)).contains("trailing"));
    }
}
