//! A checkpoint directory as committed: every regular file in it, the
//! safetensors ones parsed into tensors, the rest kept as opaque bytes.

use std::borrow::Cow;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use std::collections::HashMap;

use super::FormatError;
use super::dcp;
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

/// One file of a checkpoint: on disk, or assembled in memory.
#[derive(Debug)]
pub struct InputFile {
    /// Name relative to the checkpoint directory, with `/` separators.
    pub name: String,
    /// Its path on disk (for a file in memory, `<memory>/<name>`, only for
    /// messages).
    pub path: PathBuf,
    pub kind: InputKind,
    source: Source,
}

/// Where an input file's bytes are.
#[derive(Debug)]
pub(crate) enum Source {
    /// On disk. `map` is `None` for empty files, which cannot be mapped.
    /// Only headers are read through the map; tensor data is read with
    /// `pread`.
    Disk { map: Option<Mmap>, file: File },
    /// In this process's memory, as segments at increasing offsets that
    /// cover the file (a header, then each tensor's buffer): a commit from
    /// memory reads tensors where they are, without a copy.
    Memory { len: u64, segments: Vec<Segment> },
}

/// Bytes `[offset, offset + len)` of a file in memory, borrowed: see
/// [`super::memory::MemoryCheckpoint`], which keeps the buffers borrowed for
/// as long as the checkpoint lives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Segment {
    pub offset: u64,
    pub ptr: *const u8,
    pub len: usize,
}

// SAFETY: a segment is a shared borrow of immutable bytes (the lifetime is
// enforced by `MemoryCheckpoint<'a>`); reading it from several threads is
// what `&[u8]` allows.
unsafe impl Send for Segment {}
unsafe impl Sync for Segment {}

impl Segment {
    fn bytes(&self) -> &[u8] {
        // SAFETY: see the type's documentation: the borrow outlives every
        // use of the checkpoint that holds the segment.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl InputFile {
    /// A file assembled in memory (see [`super::memory`]).
    pub(crate) fn in_memory(
        name: String,
        kind: InputKind,
        len: u64,
        segments: Vec<Segment>,
    ) -> Self {
        InputFile {
            path: PathBuf::from("<memory>").join(&name),
            name,
            kind,
            source: Source::Memory { len, segments },
        }
    }

    /// Whether the file is on disk (not assembled in memory).
    pub fn on_disk(&self) -> bool {
        matches!(self.source, Source::Disk { .. })
    }

    /// The bytes readable in place: all of a file on disk; of a file in
    /// memory, its first segment (its header, or all of an opaque file).
    pub fn bytes(&self) -> &[u8] {
        match &self.source {
            Source::Disk { map, .. } => map.as_deref().unwrap_or(&[]),
            Source::Memory { segments, .. } => segments
                .first()
                .filter(|s| s.offset == 0)
                .map_or(&[], Segment::bytes),
        }
    }

    pub fn len(&self) -> u64 {
        match &self.source {
            Source::Disk { map, .. } => map.as_deref().map_or(0, |m| m.len() as u64),
            Source::Memory { len, .. } => *len,
        }
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

    /// `count` elements of `T` at byte `offset`: borrowed where a file in
    /// memory holds them in one piece at `T`'s alignment (a tensor's own
    /// buffer), else copied as [`InputFile::read_values`] does. The lossy
    /// coder reads every input element once, and copying a 3.45 GB state
    /// first took 5% of a commit's CPU time.
    pub fn values<T: Plain>(&self, offset: usize, count: usize) -> Cow<'_, [T]> {
        if let Source::Memory { segments, .. } = &self.source
            && count > 0
            && let Some(values) = borrowed(segments, offset as u64, count)
        {
            return Cow::Borrowed(values);
        }
        Cow::Owned(self.read_values(offset, count))
    }

    /// `count` elements of `T` at byte `offset` (as [`InputFile::copy_out`]).
    pub fn read_values<T: Plain>(&self, offset: usize, count: usize) -> Vec<T> {
        if count == 0 {
            return Vec::new();
        }
        let read = match &self.source {
            Source::Disk { file, .. } => read_range(file, offset as u64, count),
            Source::Memory { segments, .. } => gather(segments, offset as u64, count),
        };
        read.unwrap_or_else(|e| {
            panic!(
                "cannot read {} bytes at {offset} of {}: {e}",
                count * size_of::<T>(),
                self.path.display()
            )
        })
    }
}

/// `count` elements of `T` at byte `offset` of a file in memory, borrowed:
/// when one segment holds them all at `T`'s alignment.
fn borrowed<T: Plain>(segments: &[Segment], offset: u64, count: usize) -> Option<&[T]> {
    let len = size_of::<T>() * count;
    let end = offset.checked_add(len as u64)?;
    let segment = segments
        .iter()
        .find(|s| s.offset <= offset && end <= s.offset + s.len as u64)?;
    let from = (offset - segment.offset) as usize;
    let bytes = &segment.bytes()[from..from + len];
    // SAFETY: `T: Plain` has no padding and every bit pattern is a valid
    // `T`; `align_to` puts only aligned, whole elements in the middle part.
    let (prefix, values, _) = unsafe { bytes.align_to::<T>() };
    (prefix.is_empty() && values.len() == count).then_some(values)
}

/// `count` elements of `T` at byte `offset` of a file in memory, copied out
/// of the segments that cover them.
fn gather<T: Plain>(segments: &[Segment], offset: u64, count: usize) -> std::io::Result<Vec<T>> {
    let len = size_of::<T>() * count;
    let mut out: Vec<T> = Vec::with_capacity(count);
    let dst = out.as_mut_ptr().cast::<u8>();
    let end = offset + len as u64;
    let mut done = 0usize;
    for segment in segments {
        let (start, stop) = (segment.offset, segment.offset + segment.len as u64);
        let at = offset + done as u64;
        if done == len || stop <= at || start > at {
            continue;
        }
        let take = (stop.min(end) - at) as usize;
        let from = (at - start) as usize;
        let src = &segment.bytes()[from..from + take];
        // SAFETY: `dst + done .. dst + done + take` lies inside the
        // allocation's capacity (`done + take <= len`), and the source is a
        // separate buffer.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.add(done), take) };
        done += take;
    }
    if done != len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    // SAFETY: all `len` bytes of the first `count` elements were written
    // above, and `T: Plain` accepts any bytes.
    unsafe { out.set_len(count) };
    Ok(out)
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
        Self::open_selected(dir, exclude, &|_| true)
    }

    /// Like [`Checkpoint::open_excluding`], opening only the files `wanted`
    /// names, plus those that describe the others (a DCP `.metadata`, a
    /// DeepSpeed `*model_states.pt` with `param_shapes`): one rank of 512
    /// then reads its own files, not every rank's. The describing files are
    /// read for pairing; drop them with [`Checkpoint::retain_files`] if they
    /// are not the caller's to commit.
    pub fn open_selected(
        dir: &Path,
        exclude: Option<&Path>,
        wanted: &dyn Fn(&str) -> bool,
    ) -> Result<Self, FormatError> {
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
        names.retain(|name| wanted(name) || describes_others(name));
        names.sort();
        let mut notes = Vec::new();
        let files: Vec<InputFile> = names
            .into_iter()
            .map(|name| open_file(dir, name, &mut notes))
            .collect::<Result<_, _>>()?;
        let mut files = files;
        let dcp_aliases = read_dcp_directories(&mut files, &mut notes);
        super::zero::read_zero_directories(&mut files, &mut notes);
        let mut paired = pair_optimizer_state(&files);
        paired.aliases.extend(dcp_aliases);
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

    /// Keeps only the files whose names pass `keep` (one rank's shard of a
    /// step), after everything was read and paired with all files in view:
    /// a rank's optimizer shard pairs with weights another rank's file
    /// describes.
    pub fn retain_files(&mut self, keep: impl Fn(&str) -> bool) {
        let mut new_index = HashMap::new();
        let mut kept = Vec::new();
        for (old, file) in std::mem::take(&mut self.files).into_iter().enumerate() {
            if keep(&file.name) {
                new_index.insert(old, kept.len());
                kept.push(file);
            }
        }
        self.files = kept;
        self.pairings = std::mem::take(&mut self.pairings)
            .into_iter()
            .filter_map(|(fi, p)| Some((*new_index.get(&fi)?, p)))
            .collect();
        self.aliases = std::mem::take(&mut self.aliases)
            .into_iter()
            .filter_map(|((fi, ti), name)| Some(((*new_index.get(&fi)?, ti), name)))
            .collect();
    }
}

/// Reads every DCP directory of the checkpoint (a `.metadata` with its
/// `.distcp` files): the data files become torch files of chunks, and the
/// Adam moment chunks are paired with their weight chunks (the aliases
/// returned). A directory that cannot be read stays opaque, with a note.
fn read_dcp_directories(
    files: &mut [InputFile],
    notes: &mut Vec<String>,
) -> HashMap<(usize, usize), String> {
    let mut keys: HashMap<usize, Vec<dcp::ChunkKey>> = HashMap::new();
    let mut sizes: HashMap<(usize, usize), Vec<u64>> = HashMap::new();
    let metadata: Vec<usize> = (0..files.len())
        .filter(|&i| parent_and_base(&files[i].name).1 == dcp::METADATA)
        .collect();
    for m in metadata {
        let (dir, _) = parent_and_base(&files[m].name);
        let dir = dir.to_string();
        let meta = match dcp::parse_metadata(files[m].bytes()) {
            Ok(meta) => meta,
            Err(why) => {
                notes.push(format!(
                    "{}: not read as distributed-checkpoint metadata ({why}); its data files are kept as opaque bytes",
                    files[m].name
                ));
                continue;
            }
        };
        for (fi, file) in files.iter_mut().enumerate() {
            let (parent, base) = parent_and_base(&file.name);
            if parent != dir || !base.ends_with(dcp::DATA_EXTENSION) {
                continue;
            }
            match dcp::parse_data_file(base, file.bytes(), &meta) {
                Ok((torch, chunk_keys)) => {
                    for (ti, key) in chunk_keys.iter().enumerate() {
                        sizes.insert((fi, ti), meta.tensors[&key.fqn].size.clone());
                    }
                    keys.insert(fi, chunk_keys);
                    file.kind = InputKind::Torch(torch);
                }
                Err(why) => notes.push(format!(
                    "{}: kept as opaque bytes, not read as a distributed-checkpoint data file: {why}",
                    file.name
                )),
            }
        }
    }
    let mut located = Vec::new();
    for (&fi, chunk_keys) in &keys {
        let InputKind::Torch(torch) = &files[fi].kind else {
            continue;
        };
        for (ti, key) in chunk_keys.iter().enumerate() {
            located.push(dcp::Located {
                file: fi,
                tensor: ti,
                key,
                name: &torch.tensors[ti].name,
                global_size: &sizes[&(fi, ti)],
            });
        }
    }
    let (aliases, dcp_notes) = dcp::pair_moments(&located);
    notes.extend(dcp_notes);
    aliases
}

/// Files whose content other files are read by: a DCP directory's
/// `.metadata`, DeepSpeed's model states (their `param_shapes`).
fn describes_others(name: &str) -> bool {
    let (_, base) = parent_and_base(name);
    base == dcp::METADATA || base.ends_with("model_states.pt")
}

/// `("a/b", "c")` for `a/b/c`, `("", "c")` for `c`.
fn parent_and_base(name: &str) -> (&str, &str) {
    name.rsplit_once('/').unwrap_or(("", name))
}

#[derive(Default)]
pub(crate) struct Paired {
    pub pairings: HashMap<usize, FilePairing>,
    pub aliases: HashMap<(usize, usize), String>,
    pub notes: Vec<String>,
}

/// Pairs every optimizer file's state with the parameters (see [`pairing`]).
pub(crate) fn pair_optimizer_state(files: &[InputFile]) -> Paired {
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
        source: Source::Disk { map, file },
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
