//! A checkpoint directory as committed: every regular file in it, the
//! safetensors ones parsed into tensors, the rest kept as opaque bytes.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use std::collections::HashMap;

use super::FormatError;
use super::pairing::{self, FilePairing, NAMES_FILE, OptimizerView, TRAINER_STATE};
use super::plain::{Plain, read_range};
use super::safetensors::{Header, TensorInfo, parse_header};
use super::torch::{self, TorchFile};

/// What kind of file an input is, decided by its name.
#[derive(Debug)]
pub enum InputKind {
    Safetensors(Header),
    /// A `torch.save` zip file (`optimizer.pt`, `pytorch_model.bin`, ...).
    Torch(TorchFile),
    /// Any other regular file (meta.json, trainer_state.json, ...): stored as is.
    Opaque,
}

impl InputKind {
    /// The file's tensors and the offset their `begin`/`end` are relative to.
    pub fn tensors(&self) -> Option<(&[TensorInfo], u64)> {
        match self {
            InputKind::Safetensors(h) => Some((&h.tensors, h.data_start())),
            InputKind::Torch(t) => Some((&t.tensors, 0)),
            InputKind::Opaque => None,
        }
    }
}

/// One file of a checkpoint directory, mapped into memory.
#[derive(Debug)]
pub struct InputFile {
    /// Name relative to the checkpoint directory, with `/` separators.
    pub name: String,
    pub path: PathBuf,
    pub kind: InputKind,
    /// `None` for empty files, which cannot be mapped. Only headers are
    /// read through the map; tensor data is read with `pread`.
    map: Option<Mmap>,
    file: File,
}

impl InputFile {
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    pub fn len(&self) -> u64 {
        self.bytes().len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of `[offset, offset+len)`, read with `pread` (see
    /// [`read_range`]). Panics if out of range or if the file cannot be read
    /// any more (it was validated when opened).
    pub fn copy_out(&self, offset: usize, len: usize) -> Vec<u8> {
        self.read_values(offset, len)
    }

    /// `count` elements of `T` at byte `offset` (as [`InputFile::copy_out`]).
    pub fn read_values<T: Plain>(&self, offset: usize, count: usize) -> Vec<T> {
        if count == 0 {
            return Vec::new();
        }
        read_range(&self.file, offset as u64, count).unwrap_or_else(|e| {
            panic!(
                "cannot read {} bytes at {offset} of {}: {e}",
                count * size_of::<T>(),
                self.path.display()
            )
        })
    }
}

/// All files of one checkpoint directory, sorted by name.
#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub files: Vec<InputFile>,
    /// How each optimizer file's state was paired with parameters, by file index.
    pub pairings: HashMap<usize, FilePairing>,
    /// (file index, tensor index) of a paired optimizer state tensor →
    /// `<parameter>.exp_avg` / `<parameter>.exp_avg_sq`: the name the lossy
    /// policies group it under.
    pub aliases: HashMap<(usize, usize), String>,
    /// Things the user should know that do not stop the commit, e.g. a
    /// `.pt` file kept as opaque bytes because it could not be read.
    pub notes: Vec<String>,
}

impl Checkpoint {
    /// Opens and validates every file of `dir` (recursively). Nothing is
    /// written anywhere; all errors name the offending file.
    pub fn open(dir: &Path) -> Result<Self, FormatError> {
        Self::open_excluding(dir, None)
    }

    /// Like [`Checkpoint::open`], skipping the directory `exclude` if it lies
    /// inside `dir` (a store kept in the checkpoint folder is not part of it).
    pub fn open_excluding(dir: &Path, exclude: Option<&Path>) -> Result<Self, FormatError> {
        let meta = std::fs::metadata(dir).map_err(|e| FormatError::Directory {
            path: dir.to_path_buf(),
            what: format!("cannot read checkpoint directory: {e}"),
        })?;
        if !meta.is_dir() {
            return Err(FormatError::Directory {
                path: dir.to_path_buf(),
                what: "not a directory".into(),
            });
        }
        let exclude = exclude.and_then(|p| p.canonicalize().ok());
        let mut names = Vec::new();
        collect_files(dir, "", exclude.as_deref(), &mut names)?;
        if names.is_empty() {
            return Err(FormatError::Directory {
                path: dir.to_path_buf(),
                what: "checkpoint directory contains no files".into(),
            });
        }
        names.sort();
        let mut notes = Vec::new();
        let files: Vec<InputFile> = names
            .into_iter()
            .map(|name| open_file(dir, name, &mut notes))
            .collect::<Result<_, _>>()?;
        let paired = pair_optimizer_state(&files);
        notes.extend(paired.notes);
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            pairings: paired.pairings,
            aliases: paired.aliases,
            notes,
        })
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(InputFile::len).sum()
    }
}

#[derive(Default)]
struct Paired {
    pairings: HashMap<usize, FilePairing>,
    aliases: HashMap<(usize, usize), String>,
    notes: Vec<String>,
}

/// Pairs every optimizer file's state with the parameters (see [`pairing`]).
fn pair_optimizer_state(files: &[InputFile]) -> Paired {
    let find = |name: &str| files.iter().find(|f| f.name == name);
    let model = model_tensors(files);
    let names_file = find(NAMES_FILE).map(InputFile::bytes);
    let trainer_folder = find(TRAINER_STATE).is_some();
    let mut out = Paired::default();
    for (fi, file) in files.iter().enumerate() {
        let InputKind::Torch(torch) = &file.kind else {
            continue;
        };
        let Some(optimizer) = &torch.optimizer else {
            continue;
        };
        let index_of: HashMap<&str, usize> = torch
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        let shapes = optimizer
            .params
            .iter()
            .filter_map(|&i| {
                let t = index_of.get(optimizer.entry(i, "exp_avg").as_str())?;
                Some((i, torch.tensors[*t].shape.as_slice()))
            })
            .collect();
        let view = OptimizerView {
            params: &optimizer.params,
            shapes,
        };
        let mut notes = Vec::new();
        let result = pairing::pair(&view, &model, names_file, trainer_folder, &mut notes);
        out.notes
            .extend(notes.into_iter().map(|n| format!("{}: {n}", file.name)));
        for (index, name) in &result.paired {
            for key in ["exp_avg", "exp_avg_sq"] {
                if let Some(&t) = index_of.get(optimizer.entry(*index, key).as_str()) {
                    out.aliases.insert((fi, t), format!("{name}.{key}"));
                }
            }
        }
        out.pairings.insert(fi, result);
    }
    out
}

/// Name → shape of every tensor in the model files (`model*`,
/// `pytorch_model*`, `adapter_model*`), and of a torch file's tensors
/// outside its optimizer state (a `{"model": ..., "optimizer": ...}` dict).
fn model_tensors(files: &[InputFile]) -> HashMap<&str, &[u64]> {
    let mut model = HashMap::new();
    for file in files {
        let base = file.name.rsplit('/').next().unwrap_or(&file.name);
        let is_model = ["model", "pytorch_model", "adapter_model"]
            .iter()
            .any(|p| base.starts_with(p));
        let Some((tensors, _)) = file.kind.tensors() else {
            continue;
        };
        let optimizer_prefix = match &file.kind {
            InputKind::Torch(t) => t.optimizer.as_ref().map(|o| o.prefix.as_str()),
            _ => None,
        };
        for t in tensors {
            let outside_state =
                optimizer_prefix.is_some_and(|p| !p.is_empty() && !t.name.starts_with(p));
            if is_model || outside_state {
                model.insert(t.name.as_str(), t.shape.as_slice());
            }
        }
    }
    model
}

fn collect_files(
    root: &Path,
    prefix: &str,
    exclude: Option<&Path>,
    out: &mut Vec<String>,
) -> Result<(), FormatError> {
    let dir = root.join(prefix);
    let entries = std::fs::read_dir(&dir).map_err(|e| FormatError::io(&dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| FormatError::io(&dir, e))?;
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            return Err(FormatError::Directory {
                path: entry.path(),
                what: "file name is not valid UTF-8".into(),
            });
        };
        let name = if prefix.is_empty() {
            file_name.to_string()
        } else {
            format!("{prefix}/{file_name}")
        };
        // Follow symlinks: a checkpoint assembled with links still means its content.
        let meta = std::fs::metadata(entry.path()).map_err(|e| FormatError::io(entry.path(), e))?;
        if meta.is_dir() {
            let skip = exclude.is_some_and(|ex| entry.path().canonicalize().is_ok_and(|p| p == ex));
            if !skip {
                collect_files(root, &name, exclude, out)?;
            }
        } else if meta.is_file() {
            out.push(name);
        } else {
            // A FIFO, socket or device: reading it could block or never end,
            // and skipping it would silently leave part of the checkpoint out.
            return Err(FormatError::Directory {
                path: entry.path(),
                what: "not a regular file or directory (FIFO, socket or device?)".into(),
            });
        }
    }
    Ok(())
}

fn open_file(dir: &Path, name: String, notes: &mut Vec<String>) -> Result<InputFile, FormatError> {
    let path = dir.join(&name);
    let file = File::open(&path).map_err(|e| FormatError::io(&path, e))?;
    let len = file
        .metadata()
        .map_err(|e| FormatError::io(&path, e))?
        .len();
    let map = if len == 0 {
        None
    } else {
        // SAFETY: the map is read-only and only used to parse headers. Commit
        // reads each chunk once (`copy_out`) and both hashes and encodes that
        // copy, so a file modified while it is read cannot make a blob
        // disagree with its recorded checksum.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| FormatError::io(&path, e))?;
        Some(map)
    };
    let is_safetensors = name.ends_with(".safetensors");
    let mut input = InputFile {
        name,
        path,
        kind: InputKind::Opaque,
        map,
        file,
    };
    if is_safetensors {
        input.kind = InputKind::Safetensors(parse_header(&input.path, input.bytes())?);
    } else if is_torch_name(&input.name) && input.bytes().starts_with(torch::ZIP_MAGIC) {
        // A torch file we cannot read is still a valid file: it is kept
        // byte for byte, only without per-tensor coding.
        match torch::parse(input.bytes()) {
            Ok(parsed) => input.kind = InputKind::Torch(parsed),
            Err(why) => notes.push(format!(
                "{}: kept as opaque bytes, not read as a torch file: {why}",
                input.name
            )),
        }
    }
    Ok(input)
}

/// File names `torch.save` output goes by.
fn is_torch_name(name: &str) -> bool {
    [".pt", ".pth", ".bin", ".ckpt"]
        .iter()
        .any(|ext| name.ends_with(ext))
}
