//! `ckptvc._ckptvc`: the native half of the Python package. It is thin:
//! buffers in (any object with the buffer protocol: numpy arrays, bytes,
//! memoryviews), outcomes out as JSON text, errors as `CkptvcError` with the
//! CLI's message and a `kind` attribute. The Python half (`python/ckptvc`)
//! turns models, optimizers and numpy dicts into these calls.
//!
//! Commits borrow the callers' buffers without copying and release the
//! interpreter while they encode; loads decode straight into the callers'
//! writable buffers.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ckptvc::format::{Checkpoint, MemoryCheckpoint, MemoryFile, MemoryTensor};
use ckptvc::repo::load::{Snapshot, open_fresh};
use ckptvc::repo::seal::Shard;
use ckptvc::repo::{self, CheckoutOptions, CommitOptions, NoProgress, Repo};
use ckptvc::store::StoreConfig;
use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

pyo3::create_exception!(
    _ckptvc,
    CkptvcError,
    PyException,
    "A ckptvc operation failed; `kind` says how (locked, step_exists, unknown_revision, ...)."
);

/// The Python exception for `e`: its message is the CLI's, its `kind` the
/// typed kind callers branch on.
fn to_py(e: anyhow::Error) -> PyErr {
    let kind = serde_json::to_value(repo::kind(&e))
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "other".into());
    let err = CkptvcError::new_err(format!("{e:#}"));
    Python::attach(|py| {
        let _ = err.value(py).setattr("kind", kind);
    });
    err
}

fn json<T: serde::Serialize>(value: &T) -> PyResult<String> {
    serde_json::to_string(value).map_err(|e| to_py(e.into()))
}

/// A buffer that must stay exported (and so pinned) while Rust reads it.
struct Held {
    buffer: PyUntypedBuffer,
}

impl Held {
    fn get(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Held> {
        let buffer = PyUntypedBuffer::get(obj).map_err(|e| {
            to_py(anyhow::anyhow!(
                "{what}: not a buffer (numpy array, bytes): {e}"
            ))
        })?;
        if !buffer.is_c_contiguous() {
            return Err(to_py(anyhow::anyhow!(
                "{what}: the buffer is not C-contiguous (copy it first)"
            )));
        }
        Ok(Held { buffer })
    }

    fn bytes(&self) -> &[u8] {
        if self.buffer.len_bytes() == 0 {
            return &[];
        }
        // SAFETY: the buffer is exported (so its memory is pinned) for as
        // long as `self` lives, C-contiguous, and `len_bytes` long.
        unsafe {
            std::slice::from_raw_parts(self.buffer.buf_ptr().cast::<u8>(), self.buffer.len_bytes())
        }
    }

    fn bytes_mut(&mut self, what: &str) -> anyhow::Result<&mut [u8]> {
        if self.buffer.readonly() {
            anyhow::bail!("{what}: the buffer is read-only");
        }
        if self.buffer.len_bytes() == 0 {
            return Ok(&mut []);
        }
        // SAFETY: as in `bytes`, and the exporter says it is writable; the
        // caller does not touch it while the interpreter is released.
        Ok(unsafe {
            std::slice::from_raw_parts_mut(
                self.buffer.buf_ptr().cast::<u8>(),
                self.buffer.len_bytes(),
            )
        })
    }
}

/// One file of a commit as Python hands it over.
enum HeldFile {
    Tensors {
        name: String,
        tensors: Vec<(String, String, Vec<u64>, Held)>,
    },
    Bytes {
        name: String,
        data: Held,
    },
}

fn held_files(files: &Bound<'_, PyList>) -> PyResult<Vec<HeldFile>> {
    let mut out = Vec::new();
    for item in files.iter() {
        let (name, content): (String, Bound<'_, PyAny>) = item.extract()?;
        if let Ok(list) = content.cast::<PyList>() {
            let mut tensors = Vec::new();
            for t in list.iter() {
                let (tname, dtype, shape, data): (String, String, Vec<u64>, Bound<'_, PyAny>) =
                    t.extract()?;
                let held = Held::get(&data, &format!("{name}: tensor `{tname}`"))?;
                tensors.push((tname, dtype, shape, held));
            }
            out.push(HeldFile::Tensors { name, tensors });
        } else {
            let data = Held::get(&content, &name)?;
            out.push(HeldFile::Bytes { name, data });
        }
    }
    Ok(out)
}

fn memory_files(files: &[HeldFile]) -> Vec<MemoryFile<'_>> {
    files
        .iter()
        .map(|f| match f {
            HeldFile::Tensors { name, tensors } => MemoryFile::Tensors {
                name: name.clone(),
                tensors: tensors
                    .iter()
                    .map(|(n, d, s, h)| MemoryTensor {
                        name: n.clone(),
                        dtype: d.clone(),
                        shape: s.clone(),
                        data: h.bytes(),
                    })
                    .collect(),
            },
            HeldFile::Bytes { name, data } => MemoryFile::Bytes {
                name: name.clone(),
                data: data.bytes(),
            },
        })
        .collect()
}

/// Commits `checkpoint` as `shard` of its step (in `group`, by default
/// torchrun's run), sealing the step if it is the last; the outcome as a
/// JSON value.
fn commit_shard(
    repo: &Repo,
    checkpoint: &Checkpoint,
    options: &CommitOptions,
    shard: Shard,
    group: Option<String>,
) -> anyhow::Result<serde_json::Value> {
    let group = group.unwrap_or_else(repo::seal::default_group);
    let outcome =
        repo::commit::commit_shard(repo, checkpoint, options, shard, &group, &NoProgress)?;
    Ok(serde_json::to_value(&outcome)?)
}

/// `(rank, world size)` as a [`Shard`], refused unless rank < world size.
fn parse_shard(shard: Option<(u32, u32)>) -> PyResult<Option<Shard>> {
    shard
        .map(|(index, count)| format!("{index}/{count}").parse::<Shard>())
        .transpose()
        .map_err(|e| to_py(anyhow::anyhow!(e)))
}

fn policy(name: &str) -> PyResult<ckptvc::codec::policy::Policy> {
    use ckptvc::codec::policy::Policy;
    Policy::preset(name).ok_or_else(|| {
        to_py(anyhow::anyhow!(
            "unknown policy `{name}` (one of {})",
            Policy::PRESETS.join(", ")
        ))
    })
}

/// An open store (a directory or a bucket URL).
#[pyclass(module = "ckptvc._ckptvc")]
struct NativeRepo {
    /// `None` once closed. Calls take a clone of the `Arc` and let the lock
    /// go at once: a call that releases the interpreter must not hold a lock
    /// another Python thread could wait on while holding the interpreter.
    repo: Mutex<Option<Arc<Repo>>>,
    location: String,
}

impl NativeRepo {
    fn current(&self) -> PyResult<Arc<Repo>> {
        self.repo.lock().expect("repo lock").clone().ok_or_else(|| {
            to_py(anyhow::anyhow!(
                "the repository {} is closed",
                self.location
            ))
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Repo) -> anyhow::Result<T>) -> PyResult<T> {
        let repo = self.current()?;
        f(&repo).map_err(to_py)
    }

    /// After a write: a view that sees it.
    fn refresh(&self) -> PyResult<()> {
        let fresh = self.current()?.reopen().map_err(|e| to_py(e.into()))?;
        let mut guard = self.repo.lock().expect("repo lock");
        if guard.is_some() {
            *guard = Some(Arc::new(fresh));
        }
        Ok(())
    }

    fn wrap(repo: Repo, location: String) -> NativeRepo {
        NativeRepo {
            repo: Mutex::new(Some(Arc::new(repo))),
            location,
        }
    }
}

#[pymethods]
impl NativeRepo {
    #[staticmethod]
    fn init(location: String, policy_name: &str) -> PyResult<NativeRepo> {
        let config = StoreConfig {
            policy: policy(policy_name)?,
            ..StoreConfig::default()
        };
        let repo = Repo::init(&location, &config).map_err(to_py)?;
        Ok(NativeRepo::wrap(repo, location))
    }

    #[staticmethod]
    fn open(location: String) -> PyResult<NativeRepo> {
        let repo = Repo::open(&location).map_err(|e| to_py(e.into()))?;
        Ok(NativeRepo::wrap(repo, location))
    }

    #[getter]
    fn location(&self) -> String {
        self.location.clone()
    }

    fn close(&self) {
        *self.repo.lock().expect("repo lock") = None;
    }

    /// Commits `files` (see `held_files`) as `step`; returns the outcome
    /// as JSON. The buffers are read in place, with the interpreter
    /// released. With `shard` (rank, world size) the files are that rank's
    /// part of a step every rank commits at once (their names must say the
    /// rank: `rankK/...`); the step is sealed when the last shard is in.
    #[pyo3(signature = (step, files, branch=None, parent=None, message=None, policy_name=None, wait=0.0, shard=None, group=None))]
    #[allow(clippy::too_many_arguments)]
    fn commit(
        &self,
        py: Python<'_>,
        step: u64,
        files: &Bound<'_, PyList>,
        branch: Option<String>,
        parent: Option<String>,
        message: Option<String>,
        policy_name: Option<String>,
        wait: f64,
        shard: Option<(u32, u32)>,
        group: Option<String>,
    ) -> PyResult<String> {
        let held = held_files(files)?;
        let options = CommitOptions {
            step,
            branch,
            parent,
            message: message.unwrap_or_default(),
            policy: policy_name.as_deref().map(policy).transpose()?,
            lock_wait: Duration::from_secs_f64(wait.max(0.0)),
            ..CommitOptions::default()
        };
        let shard = parse_shard(shard)?;
        if shard.is_some() && options.parent.is_some() {
            return Err(to_py(anyhow::anyhow!(
                "a shard is coded against its branch's tip: `parent` cannot be given with `shard`"
            )));
        }
        let outcome = self.with(|repo| {
            py.detach(|| {
                let checkpoint = MemoryCheckpoint::new(memory_files(&held))?;
                match shard {
                    Some(shard) => commit_shard(repo, &checkpoint, &options, shard, group),
                    None => Ok(serde_json::to_value(repo::commit_checkpoint(
                        repo,
                        &checkpoint,
                        &options,
                        &NoProgress,
                    )?)?),
                }
            })
        })?;
        self.refresh()?;
        json(&outcome)
    }

    /// Commits checkpoint directory `dir` as `step`, or with `shard`
    /// (rank, world size) only that rank's files of a step all ranks commit
    /// at once (see `ckptvc commit --shard`). Returns the outcome as JSON.
    #[pyo3(signature = (dir, step, shard=None, group=None, branch=None, message=None, policy_name=None, wait=0.0))]
    #[allow(clippy::too_many_arguments)]
    fn commit_dir(
        &self,
        py: Python<'_>,
        dir: PathBuf,
        step: u64,
        shard: Option<(u32, u32)>,
        group: Option<String>,
        branch: Option<String>,
        message: Option<String>,
        policy_name: Option<String>,
        wait: f64,
    ) -> PyResult<String> {
        let options = CommitOptions {
            step,
            branch,
            message: message.unwrap_or_default(),
            policy: policy_name.as_deref().map(policy).transpose()?,
            lock_wait: Duration::from_secs_f64(wait.max(0.0)),
            ..CommitOptions::default()
        };
        let shard = parse_shard(shard)?;
        let outcome = self.with(|repo| {
            py.detach(|| match shard {
                Some(shard) => {
                    let input = repo::commit::open_shard_input(repo, &dir, shard)?;
                    commit_shard(repo, &input, &options, shard, group)
                }
                None => Ok(serde_json::to_value(repo::commit(
                    repo,
                    &dir,
                    &options,
                    &NoProgress,
                )?)?),
            })
        })?;
        self.refresh()?;
        json(&outcome)
    }

    /// Steps whose shards have not all arrived, as JSON.
    fn pending(&self) -> PyResult<String> {
        self.with(|repo| repo::seal::pending(&repo.reopen()?))
            .and_then(|p| json(&p))
    }

    #[pyo3(signature = (branch=None, all=false))]
    fn log(&self, branch: Option<String>, all: bool) -> PyResult<String> {
        self.with(|repo| repo::log(&repo.reopen()?, branch.as_deref(), all))
            .and_then(|entries| json(&entries))
    }

    fn show(&self, rev: &str) -> PyResult<String> {
        self.with(|repo| repo::show(&repo.reopen()?, rev))
            .and_then(|report| json(&report))
    }

    /// The files and tensors of `rev` as JSON.
    fn files(&self, rev: &str) -> PyResult<String> {
        let files = self.with(|repo| Ok(Snapshot::open(&repo.reopen()?, rev)?.files()))?;
        json(&files)
    }

    /// Decodes each (file, tensor, buffer) of `rev` into its writable
    /// buffer, with the interpreter released. In a lazy clone the commit's
    /// chunks are downloaded first.
    #[pyo3(signature = (rev, items, wait=0.0))]
    fn read_into(
        &self,
        py: Python<'_>,
        rev: &str,
        items: &Bound<'_, PyList>,
        wait: f64,
    ) -> PyResult<()> {
        let mut held = Vec::new();
        for item in items.iter() {
            let (file, tensor, buffer): (String, String, Bound<'_, PyAny>) = item.extract()?;
            let h = Held::get(&buffer, &format!("{file}: tensor `{tensor}`"))?;
            held.push((file, tensor, h));
        }
        self.with(|repo| {
            py.detach(|| {
                let fresh = open_fresh(repo, rev, Duration::from_secs_f64(wait.max(0.0)))?;
                let snapshot = Snapshot::open(&fresh, rev)?;
                for (file, tensor, h) in &mut held {
                    let what = format!("{file}: tensor `{tensor}`");
                    snapshot.read_tensor_into(file, tensor, h.bytes_mut(&what)?)?;
                }
                Ok(())
            })
        })
    }

    /// Decodes bytes `offset..offset + len(buffer)` of tensor `tensor` of
    /// `file` in `rev` into `buffer`, with the interpreter released: a
    /// tensor that lives on a GPU is loaded through one bounded host buffer,
    /// piece by piece.
    fn read_range_into(
        &self,
        py: Python<'_>,
        rev: &str,
        file: &str,
        tensor: &str,
        offset: u64,
        buffer: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let what = format!("{file}: tensor `{tensor}`");
        let mut held = Held::get(buffer, &what)?;
        self.with(|repo| {
            py.detach(|| {
                let fresh = open_fresh(repo, rev, Duration::ZERO)?;
                let snapshot = Snapshot::open(&fresh, rev)?;
                snapshot.read_tensor_range_into(file, tensor, offset, held.bytes_mut(&what)?)
            })
        })
    }

    /// The bytes of file `file` of `rev` (a file kept as bytes).
    fn read_file<'py>(
        &self,
        py: Python<'py>,
        rev: &str,
        file: &str,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = self.with(|repo| {
            py.detach(|| {
                let fresh = open_fresh(repo, rev, Duration::ZERO)?;
                Snapshot::open(&fresh, rev)?.read_file(file)
            })
        })?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// Tags `rev` as `name` (moving the tag if it exists); returns the commit id.
    #[pyo3(signature = (name, rev, wait=0.0))]
    fn tag(&self, name: &str, rev: &str, wait: f64) -> PyResult<String> {
        let wait = Duration::from_secs_f64(wait.max(0.0));
        let change = self.with(|repo| {
            let fresh = repo.reopen()?;
            if fresh.tag_target(name)?.is_some() {
                repo::history::delete_tag(&fresh, name, wait)?;
            }
            repo::history::create_tag(&fresh.reopen()?, name, rev, wait)
        })?;
        self.refresh()?;
        Ok(change.id.to_hex())
    }

    /// Deletes tag `name` (its commits stay until gc).
    #[pyo3(signature = (name, wait=0.0))]
    fn delete_tag(&self, name: &str, wait: f64) -> PyResult<()> {
        let wait = Duration::from_secs_f64(wait.max(0.0));
        self.with(|repo| repo::history::delete_tag(&repo.reopen()?, name, wait))?;
        self.refresh()
    }

    /// The current branch.
    fn head(&self) -> PyResult<String> {
        self.with(|repo| Ok(repo.reopen()?.head_branch()?))
    }

    #[pyo3(signature = (rev, output, force=false, shard=None))]
    fn checkout(
        &self,
        py: Python<'_>,
        rev: &str,
        output: PathBuf,
        force: bool,
        shard: Option<(u32, u32)>,
    ) -> PyResult<String> {
        let shard = shard
            .map(|(index, count)| format!("{index}/{count}").parse::<Shard>())
            .transpose()
            .map_err(|e| to_py(anyhow::anyhow!(e)))?;
        let outcome = self.with(|repo| {
            py.detach(|| {
                let options = CheckoutOptions {
                    force,
                    shard,
                    ..CheckoutOptions::default()
                };
                repo::checkout(&repo.reopen()?, rev, &output, options, &NoProgress)
            })
        })?;
        json(&outcome)
    }
}

/// Runs the command line with `argv` (program name first); returns the
/// exit status. The wheel's `ckptvc` command is this.
#[pyfunction]
fn run_cli(py: Python<'_>, argv: Vec<String>) -> i32 {
    py.detach(|| ckptvc::cli::run_args(argv))
}

#[pymodule]
fn _ckptvc(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeRepo>()?;
    m.add_function(wrap_pyfunction!(run_cli, m)?)?;
    m.add("CkptvcError", m.py().get_type::<CkptvcError>())?;
    Ok(())
}
