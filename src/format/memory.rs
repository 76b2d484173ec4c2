//! A checkpoint given from memory instead of a directory: what a training
//! loop commits without writing files first. Each file is either a set of
//! tensors, laid out as a safetensors file (a header this module writes,
//! then each tensor's buffer where it already is), or plain bytes (a JSON of
//! the scheduler state, say). The buffers are borrowed, not copied: a
//! [`MemoryCheckpoint`] lives no longer than they do.
//!
//! Once assembled, it is an ordinary [`Checkpoint`]: the same validation,
//! the same optimizer pairing by name (`<param>.exp_avg` /
//! `<param>.exp_avg_sq` in a file named `optimizer.safetensors`), the same
//! commit; a checkout writes the files it describes.

use std::marker::PhantomData;
use std::ops::Deref;
use std::path::PathBuf;

use super::FormatError;
use super::checkpoint::{Checkpoint, InputFile, InputKind, Segment, pair_optimizer_state};
use super::safetensors::parse_header_of;

/// One tensor: its name, safetensors dtype name (`F32`, `BF16`, `F16`,
/// `I64`, ...), shape, and its bytes in C order.
#[derive(Debug, Clone)]
pub struct MemoryTensor<'a> {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    pub data: &'a [u8],
}

/// One file of a checkpoint in memory.
#[derive(Debug, Clone)]
pub enum MemoryFile<'a> {
    /// Tensors, committed as the safetensors file `name`.
    Tensors {
        name: String,
        tensors: Vec<MemoryTensor<'a>>,
    },
    /// Bytes kept as they are.
    Bytes { name: String, data: &'a [u8] },
}

impl MemoryFile<'_> {
    pub fn name(&self) -> &str {
        match self {
            MemoryFile::Tensors { name, .. } | MemoryFile::Bytes { name, .. } => name,
        }
    }
}

/// A checkpoint whose files are buffers borrowed for `'a`.
#[derive(Debug)]
pub struct MemoryCheckpoint<'a> {
    checkpoint: Checkpoint,
    _buffers: PhantomData<&'a [u8]>,
}

impl Deref for MemoryCheckpoint<'_> {
    type Target = Checkpoint;

    fn deref(&self) -> &Checkpoint {
        &self.checkpoint
    }
}

impl<'a> MemoryCheckpoint<'a> {
    /// Assembles and validates `files` (names unique, relative, `/`-
    /// separated; tensor bytes that match dtype and shape). Errors name the
    /// file and tensor.
    pub fn new(files: Vec<MemoryFile<'a>>) -> Result<MemoryCheckpoint<'a>, FormatError> {
        let mut names: Vec<&str> = files.iter().map(MemoryFile::name).collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(bad_file(pair[0], "given twice".into()));
        }
        if files.is_empty() {
            return Err(FormatError::Directory {
                path: PathBuf::from("<memory>"),
                what: "a checkpoint needs at least one file".into(),
            });
        }
        let mut inputs: Vec<InputFile> = files.iter().map(input_file).collect::<Result<_, _>>()?;
        inputs.sort_by(|a, b| a.name.cmp(&b.name));
        let paired = pair_optimizer_state(&inputs);
        Ok(MemoryCheckpoint {
            checkpoint: Checkpoint {
                dir: PathBuf::from("<memory>"),
                files: inputs,
                pairings: paired.pairings,
                aliases: paired.aliases,
                notes: paired.notes,
            },
            _buffers: PhantomData,
        })
    }
}

fn bad_file(name: &str, what: String) -> FormatError {
    FormatError::Directory {
        path: PathBuf::from("<memory>").join(name),
        what,
    }
}

fn check_name(name: &str) -> Result<(), FormatError> {
    let ok = !name.is_empty()
        && !name.starts_with('/')
        && name
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    if ok {
        Ok(())
    } else {
        Err(bad_file(
            name,
            "a file name must be relative, `/`-separated, without `.` or `..`".into(),
        ))
    }
}

fn segment(offset: u64, bytes: &[u8]) -> Segment {
    Segment {
        offset,
        ptr: bytes.as_ptr(),
        len: bytes.len(),
    }
}

fn input_file(file: &MemoryFile<'_>) -> Result<InputFile, FormatError> {
    check_name(file.name())?;
    match file {
        MemoryFile::Bytes { name, data } => {
            let segments = if data.is_empty() {
                Vec::new()
            } else {
                vec![segment(0, data)]
            };
            Ok(InputFile::in_memory(
                name.clone(),
                InputKind::Opaque,
                data.len() as u64,
                segments,
            ))
        }
        MemoryFile::Tensors { name, tensors } => tensor_file(name, tensors),
    }
}

/// A safetensors file of `tensors` in the given order: a header made here,
/// then each buffer at its offset.
fn tensor_file(name: &str, tensors: &[MemoryTensor<'_>]) -> Result<InputFile, FormatError> {
    let header = safetensors_header(tensors);
    let mut len = header.len() as u64;
    let path = PathBuf::from("<memory>").join(name);
    let data_len: u64 = tensors.iter().map(|t| t.data.len() as u64).sum();
    let parsed = parse_header_of(&path, &header, len + data_len)?;
    // The first segment points at the parsed header's own copy, which the
    // file owns (moving a Vec does not move its heap buffer).
    let mut segments = vec![segment(0, &parsed.raw)];
    for tensor in tensors {
        if !tensor.data.is_empty() {
            segments.push(segment(len, tensor.data));
        }
        len += tensor.data.len() as u64;
    }
    Ok(InputFile::in_memory(
        name.to_string(),
        InputKind::Safetensors(parsed),
        len,
        segments,
    ))
}

/// The safetensors header (length prefix, JSON, space padding to 8 bytes)
/// for `tensors` laid out back to back in the given order. Validation of
/// dtype against byte length is left to the parser, which names the tensor.
fn safetensors_header(tensors: &[MemoryTensor<'_>]) -> Vec<u8> {
    let mut json = serde_json::Map::new();
    let mut offset = 0u64;
    for t in tensors {
        let end = offset + t.data.len() as u64;
        json.insert(
            t.name.clone(),
            serde_json::json!({
                "dtype": t.dtype,
                "shape": t.shape,
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    let mut text = serde_json::to_string(&json).expect("a JSON map serializes");
    while !(8 + text.len()).is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floats(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn tensors_read_back_from_their_buffers() {
        let w = floats(&[1.0, 2.0, 3.0, 4.0]);
        let b = floats(&[0.5, -0.5]);
        let checkpoint = MemoryCheckpoint::new(vec![
            MemoryFile::Tensors {
                name: "model.safetensors".into(),
                tensors: vec![
                    MemoryTensor {
                        name: "w".into(),
                        dtype: "F32".into(),
                        shape: vec![2, 2],
                        data: &w,
                    },
                    MemoryTensor {
                        name: "b".into(),
                        dtype: "F32".into(),
                        shape: vec![2],
                        data: &b,
                    },
                ],
            },
            MemoryFile::Bytes {
                name: "extra.json".into(),
                data: b"{}",
            },
        ])
        .unwrap();
        assert_eq!(checkpoint.files.len(), 2);
        let extra = &checkpoint.files[0];
        assert_eq!(extra.name, "extra.json");
        assert_eq!(extra.bytes(), b"{}");
        let model = &checkpoint.files[1];
        let InputKind::Safetensors(header) = &model.kind else {
            panic!("a tensor file is a safetensors file");
        };
        assert_eq!(model.len(), header.data_start() + 24);
        let w_info = header.tensors.iter().find(|t| t.name == "w").unwrap();
        let start = (header.data_start() + w_info.begin) as usize;
        assert_eq!(model.copy_out(start, 16), w);
        // A read across the two buffers.
        assert_eq!(model.copy_out(start + 12, 8), [&w[12..], &b[..4]].concat());
        let values: Vec<f32> = model.read_values(start, 4);
        assert_eq!(values, [1.0, 2.0, 3.0, 4.0]);
        // Inside one buffer at f32 alignment (malloc's, at least 16 bytes):
        // borrowed. Across two buffers or off alignment: copied. The same
        // values every way.
        use std::borrow::Cow;
        let inside = model.values::<f32>(start + 4, 3);
        assert!(matches!(inside, Cow::Borrowed(_)));
        assert_eq!(*inside, [2.0, 3.0, 4.0]);
        for (offset, count) in [(start + 12, 2), (start + 2, 2)] {
            let copied = model.values::<f32>(offset, count);
            assert!(matches!(copied, Cow::Owned(_)), "{offset}");
            assert_eq!(*copied, *model.read_values::<f32>(offset, count));
        }
        assert!(model.values::<f32>(start, 0).is_empty());
    }

    #[test]
    fn bad_tensors_and_names_are_refused_with_their_names() {
        let short = floats(&[1.0]);
        let err = MemoryCheckpoint::new(vec![MemoryFile::Tensors {
            name: "model.safetensors".into(),
            tensors: vec![MemoryTensor {
                name: "w".into(),
                dtype: "F32".into(),
                shape: vec![2],
                data: &short,
            }],
        }])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("model.safetensors") && err.contains('w'),
            "{err}"
        );
        let dup = MemoryCheckpoint::new(vec![
            MemoryFile::Bytes {
                name: "a".into(),
                data: b"1",
            },
            MemoryFile::Bytes {
                name: "a".into(),
                data: b"2",
            },
        ])
        .unwrap_err();
        assert!(dup.to_string().contains("given twice"));
        let escape = MemoryCheckpoint::new(vec![MemoryFile::Bytes {
            name: "../x".into(),
            data: b"1",
        }])
        .unwrap_err();
        assert!(escape.to_string().contains("relative"));
    }
}
