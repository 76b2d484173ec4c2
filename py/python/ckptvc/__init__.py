"""ckptvc: version control for training checkpoints, from memory to memory.

``Repo.commit`` reads a model's and an optimizer's tensors where they are
(CPU tensors and numpy arrays by their buffers, without a copy; CUDA tensors
copied to host memory in pieces of at most 64 MiB, with no temporary copy)
and stores them in a ckptvc store, with each Adam moment paired to its
parameter by name, so that the lossy policies apply. ``Repo.load`` decodes
a commit straight into the tensors' memory (a CUDA tensor through one
64 MiB host buffer, piece by piece). Plain numpy arrays work everywhere
torch tensors do: the package needs numpy only; torch is used when it is
given torch objects.

Non-tensor state (``extra``, the optimizer's ``param_groups`` and scalar
state) is stored as a pickle that round-trips exactly. Like
``torch.load(weights_only=False)``, loading it runs pickle: load only from
stores you trust.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import re
import threading
from typing import Any, Mapping, Optional

import numpy as np

from ._ckptvc import CkptvcError, NativeRepo, run_cli

__all__ = ["Repo", "CkptvcError", "CommitHandle", "run_cli"]

MODEL_FILE = "model.safetensors"
# A file of rank K of a sharded commit: `rank<K>/<file>`.
_RANK_FILE = re.compile(r"rank(\d+)/")
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "ckptvc-state.pkl"

_NUMPY_DTYPES = {
    np.dtype("float64"): "F64",
    np.dtype("float32"): "F32",
    np.dtype("float16"): "F16",
    np.dtype("int64"): "I64",
    np.dtype("int32"): "I32",
    np.dtype("int16"): "I16",
    np.dtype("int8"): "I8",
    np.dtype("uint64"): "U64",
    np.dtype("uint32"): "U32",
    np.dtype("uint16"): "U16",
    np.dtype("uint8"): "U8",
    np.dtype("bool"): "BOOL",
}
_FROM_SAFETENSORS = {v: k for k, v in _NUMPY_DTYPES.items()}
# bf16 has no numpy type: its bits travel as uint16.
_FROM_SAFETENSORS["BF16"] = np.dtype("uint16")

_TORCH_DTYPES = {
    "torch.float64": "F64",
    "torch.float32": "F32",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.int64": "I64",
    "torch.int32": "I32",
    "torch.int16": "I16",
    "torch.int8": "I8",
    "torch.uint8": "U8",
    "torch.bool": "BOOL",
}


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _local(x: Any) -> Any:
    """A DTensor's local shard (FSDP2, tensor parallelism), which holds its
    memory; anything else as it is."""
    if _is_torch(x) and hasattr(x, "to_local") and hasattr(x, "placements"):
        return x.to_local()
    return x


class _Files:
    """The names of a commit's files: ``model.safetensors``,
    ``optimizer.safetensors`` and the pickled rest, under ``rank<K>/`` when
    rank K of a sharded step writes or reads them."""

    def __init__(self, shard: Optional[tuple] = None):
        self.shard = None if shard is None else (int(shard[0]), int(shard[1]))
        if self.shard is not None and not 0 <= self.shard[0] < self.shard[1]:
            raise CkptvcError(f"shard={shard}: give (rank, world_size) with 0 <= rank < world_size")
        prefix = "" if self.shard is None else f"rank{self.shard[0]}/"
        self.model = prefix + MODEL_FILE
        self.optimizer = prefix + OPTIMIZER_FILE
        self.state = prefix + STATE_FILE


# Tensors off the host (CUDA, …) cross to it in pieces of at most this many
# bytes: a copy needs no host memory beyond its destination, whatever the
# tensor's size.
_DEVICE_PIECE_BYTES = 64 << 20


def _on_host(t: Any) -> bool:
    """Whether torch tensor ``t``'s memory is host memory numpy can view."""
    return t.device.type == "cpu"


def _torch_spec(t: Any, what: str) -> tuple[str, np.dtype]:
    """(safetensors dtype, numpy dtype of its host bytes) of a torch tensor."""
    import torch

    name = _TORCH_DTYPES.get(str(t.dtype))
    if name is None:
        raise CkptvcError(f"{what}: dtype {t.dtype} is not supported")
    if t.dtype == torch.bfloat16:
        return name, np.dtype("int16")
    return name, torch.empty(0, dtype=t.dtype).numpy().dtype


def _host_as_torch(array: np.ndarray, like: Any) -> Any:
    """``array``'s memory as a flat torch tensor of ``like``'s dtype."""
    import torch

    flat = torch.from_numpy(array.reshape(-1))
    return flat.view(torch.bfloat16) if like.dtype == torch.bfloat16 else flat


def _copy_from_device(t: Any, host: np.ndarray) -> None:
    """Copies torch tensor ``t`` (any device) into ``host``, piece by piece."""
    src = t.detach().reshape(-1)
    dst = _host_as_torch(host, t)
    per = max(1, _DEVICE_PIECE_BYTES // max(1, src.element_size()))
    for start in range(0, src.numel(), per):
        dst[start:start + per].copy_(src[start:start + per])


def _host_view(x: Any, what: str = "tensor", target: Any = None) -> tuple[str, list[int], np.ndarray]:
    """(safetensors dtype, shape, a C-contiguous numpy array of the bytes).

    Without ``target``, CPU tensors and contiguous arrays are viewed, not
    copied; tensors on a device are copied to new host memory in bounded
    pieces; non-contiguous ones are made contiguous (a copy). With
    ``target``, a function ``(shape, numpy dtype) -> array``, the bytes are
    copied into the array it gives (a snapshot).
    """
    x = _local(x)
    if _is_torch(x):
        t = x.detach()
        name, dtype = _torch_spec(t, what)
        shape = tuple(t.shape)
        if _on_host(t):
            view = _numpy_view(t.contiguous())  # the tensor itself when contiguous
            if target is None:
                return name, list(shape), view
            array = target(shape, dtype)
            np.copyto(array, view)
            return name, list(shape), array
        array = target(shape, dtype) if target is not None else _host_buffer(shape, dtype)
        _copy_from_device(t, array)
        return name, list(shape), array
    array = np.asarray(x)
    name = _NUMPY_DTYPES.get(array.dtype)
    if name is None:
        raise CkptvcError(f"{what}: dtype {array.dtype} is not supported")
    if target is not None:
        copy = target(array.shape, array.dtype)
        np.copyto(copy, array)
        return name, list(array.shape), copy
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    return name, list(array.shape), array


def _numpy_view(t: Any) -> np.ndarray:
    """A contiguous host torch tensor's memory as a numpy array (bf16 as int16)."""
    import torch

    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _buffer(array: np.ndarray) -> np.ndarray:
    """The array as a buffer Python exports with a shape: a 0-d array's
    export has none, so it goes as a 1-element view of the same memory."""
    return array.reshape(1) if array.ndim == 0 else array


def _model_tensors(model: Any) -> dict[str, Any]:
    if model is None:
        return {}
    if hasattr(model, "state_dict") and not isinstance(model, Mapping):
        return dict(model.state_dict())
    return dict(model)


def _optimizer_state(model: Any, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tensors named ``<param>.<key>`` and the non-tensor rest.

    A torch optimizer's state is keyed by parameter objects; pairing each
    with its name through ``model.named_parameters()`` is certain by
    construction. A mapping ``{param: {key: array}}`` is taken as it is.
    """
    if optimizer is None:
        return {}, {}
    if isinstance(optimizer, Mapping):
        tensors = {f"{p}.{k}": v for p, state in optimizer.items() for k, v in state.items()}
        return tensors, {}
    if model is None or not hasattr(model, "named_parameters"):
        raise CkptvcError("a torch optimizer needs its model (to name its parameters)")
    names = {id(p): n for n, p in model.named_parameters()}
    in_optimizer = set()
    groups, scalars, tensors = [], {}, {}
    for group in optimizer.param_groups:
        group_names = []
        for p in group["params"]:
            name = names.get(id(p))
            if name is None:
                raise CkptvcError("the optimizer holds a parameter that is not in the model")
            in_optimizer.add(name)
            group_names.append(name)
            for key, value in optimizer.state.get(p, {}).items():
                if _is_torch(value) or isinstance(value, np.ndarray):
                    tensors[f"{name}.{key}"] = value
                else:
                    scalars.setdefault(name, {})[key] = value
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": group_names})
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in in_optimizer]
    if missing:
        raise CkptvcError(
            f"the model's parameters {missing[:5]} are not in the optimizer "
            f"({len(missing)} in all): pass the optimizer that trains this model"
        )
    return tensors, {"param_groups": groups, "scalars": scalars}


# Below this a snapshot buffer comes from numpy's allocator: a mapping per
# small tensor would cost more than it saves.
_MAPPED_MIN_BYTES = 1 << 20


def _host_buffer(shape: tuple, dtype: np.dtype) -> np.ndarray:
    """A writable C-contiguous array for a snapshot.

    Large ones are private anonymous mappings rather than numpy's memory:
    numpy asks the kernel for transparent huge pages on large arrays
    (madvise), and with the common ``defrag=madvise`` setting the kernel
    then compacts memory synchronously as each 2 MiB is first touched. On a
    machine whose memory is page cache, copying into fresh numpy arrays ran
    at 0.3–0.6 GiB/s, into mappings at 2 GiB/s (two threads).
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < _MAPPED_MIN_BYTES:
        return np.empty(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return np.frombuffer(region, dtype=dtype).reshape(shape)


def _prefault(array: np.ndarray) -> None:
    """Touches every page of ``array`` so that its first real write does
    not fault (what a snapshot into fresh memory spends most time on)."""
    flat = array.reshape(-1).view(np.uint8)
    flat[:: mmap.PAGESIZE] = 0


class _SnapshotPool:
    """Host buffers of the last ``commit_async`` snapshot, reused by the
    next one when shapes and dtypes match: copying into memory already
    mapped skips the page faults of fresh allocations, which cost as much as
    the copy itself. Only touched when no snapshot is in flight;
    ``Repo.reserve_snapshot`` prepares buffers aside and they are adopted
    here (``adopt``) before the next snapshot."""

    def __init__(self) -> None:
        self.buffers: dict = {}

    def _fitting(self, key: tuple, shape: tuple, dtype: np.dtype) -> Optional[np.ndarray]:
        """The pool's buffer for ``key`` if it has this shape and dtype."""
        mine = self.buffers.get(key)
        if mine is None or mine.shape != tuple(shape) or mine.dtype != dtype:
            return None
        return mine

    def buffer(self, key: tuple, shape: tuple, dtype: np.dtype) -> np.ndarray:
        """A buffer for ``key`` of this shape and dtype: the pool's, or a new
        one that replaces it."""
        mine = self._fitting(key, shape, dtype)
        if mine is None:
            mine = _host_buffer(shape, dtype)
            self.buffers[key] = mine
        return mine

    def adopt(self, reserved: dict) -> None:
        """Takes the reserved buffers this pool has no fitting buffer for."""
        for key, buffer in reserved.items():
            if self._fitting(key, buffer.shape, buffer.dtype) is None:
                self.buffers[key] = buffer


def _host_spec(x: Any) -> tuple[tuple, np.dtype]:
    """The shape and numpy dtype ``_host_view`` gives ``x``, without
    copying it (a CUDA tensor stays where it is)."""
    x = _local(x)
    if _is_torch(x):
        return tuple(x.shape), _torch_spec(x, "tensor")[1]
    array = np.asarray(x)
    return array.shape, array.dtype


def _files(model: Any, optimizer: Any, extra: Any, pool: "Optional[_SnapshotPool]" = None,
           names: Optional[_Files] = None) -> list:
    """The native commit's files: tensors as (name, dtype, shape, buffer);
    with a ``pool``, every tensor copied into its buffers (a snapshot)."""
    names = names or _Files()
    files = []
    model_tensors = _model_tensors(model)
    opt_tensors, opt_rest = _optimizer_state(model, optimizer)
    parts = ((names.model, MODEL_FILE, model_tensors),
             (names.optimizer, OPTIMIZER_FILE, opt_tensors))
    for file, base, tensors in parts:
        if not tensors:
            continue
        if pool is None:
            views = [(name, *_host_view(value, what=f"{file}: tensor `{name}`"))
                     for name, value in tensors.items()]
        else:
            # Buffers are keyed by the file's base name, as reserve_snapshot
            # keys them: a process commits as one rank.
            def snapshot(item: tuple, file: str = file, base: str = base) -> tuple:
                name, value = item
                target = lambda shape, dtype: pool.buffer((base, name), shape, dtype)  # noqa: E731
                return (name, *_host_view(value, what=f"{file}: tensor `{name}`", target=target))

            # numpy and torch release the interpreter while they copy: two
            # threads copy two tensors at once.
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as workers:
                views = list(workers.map(snapshot, tensors.items()))
        files.append((file, [(n, d, s, _buffer(a)) for n, d, s, a in views]))
    state = {"extra": extra, "optimizer": opt_rest, "format": 1}
    files.append((names.state, pickle.dumps(state, protocol=4)))
    return files


class CommitHandle:
    """A commit running in the background (``Repo.commit_async``)."""

    def __init__(self, thread: threading.Thread, box: dict):
        self._thread = thread
        self._box = box

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> dict:
        """Waits for the commit; returns its outcome or raises its error."""
        self._thread.join()
        self._box["reported"] = True
        if "error" in self._box:
            raise self._box["error"]
        return self._box["outcome"]

    def _settle(self) -> None:
        """Waits; raises the error unless ``wait()`` already reported it."""
        self._thread.join()
        if "error" in self._box and not self._box.get("reported"):
            self._box["reported"] = True
            raise self._box["error"]


class Repo:
    """A ckptvc store: a directory, or a bucket URL (``s3://bucket/prefix``)."""

    def __init__(self, native: NativeRepo):
        self._native = native
        self._pending: Optional[CommitHandle] = None
        self._pool = _SnapshotPool()
        # (thread, buffers) of a reserve_snapshot still being prepared.
        self._reserving: Optional[tuple] = None

    @staticmethod
    def init(path: str, policy: str = "balanced") -> "Repo":
        """Creates an empty store (``policy``: lossless, excp, compact, balanced, faithful)."""
        return Repo(NativeRepo.init(str(path), policy))

    @staticmethod
    def open(path_or_url: str) -> "Repo":
        """Opens an existing store."""
        return Repo(NativeRepo.open(str(path_or_url)))

    @property
    def location(self) -> str:
        return self._native.location

    def close(self) -> None:
        """Waits for a background commit, then closes (and frees the
        snapshot buffers ``commit_async`` keeps for reuse); later calls raise."""
        self._finish_pending()
        self._take_reserved()
        self._pool = _SnapshotPool()
        self._native.close()

    def __enter__(self) -> "Repo":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- commits -------------------------------------------------------

    def commit(
        self,
        step: int,
        model: Any = None,
        optimizer: Any = None,
        extra: Any = None,
        branch: Optional[str] = None,
        parent: Optional[str] = None,
        message: Optional[str] = None,
        policy: Optional[str] = None,
        wait: float = 0.0,
        shard: Optional[tuple] = None,
        group: Optional[str] = None,
    ) -> dict:
        """Commits the state at ``step``; returns the outcome (as ``--json``).

        ``model``: a torch module or a mapping name → tensor/array;
        ``optimizer``: a torch optimizer (paired with ``model`` by
        parameter) or a mapping param → {"exp_avg": …, "exp_avg_sq": …};
        ``extra``: anything picklable (scheduler state, RNG, counters).

        ``shard=(rank, world_size)``: every rank of a sharded run (FSDP2,
        whose DTensors are committed as their local shards, or any state
        each rank holds a part of) calls ``commit`` with its own part; each
        part is coded on its own, and the step becomes one commit when the
        last rank's part is in: the outcome's ``sealed`` is then set (it is
        ``None`` for the ranks before). A rank's files are
        ``rank<K>/model.safetensors`` and so on. ``group`` names the attempt
        (default: torchrun's run id and restart count, as ``ckptvc commit
        --group``). A run whose ranks hold the same state (DDP) commits from
        one rank, without ``shard``.
        """
        self._finish_pending()
        names = _Files(shard)
        files = _files(model, optimizer, extra, names=names)
        return self._commit_files(step, files, branch, parent, message, policy, wait,
                                  names.shard, group)

    def _commit_files(self, step, files, branch, parent, message, policy, wait,
                      shard=None, group=None) -> dict:
        # Only a sharded commit passes `shard`: A/B runs swap in native
        # libraries from before it (scripts/bench_ab_python.sh).
        sharded = {} if shard is None else {"shard": shard, "group": group}
        text = self._native.commit(
            int(step), files, branch=branch, parent=parent, message=message,
            policy_name=policy, wait=float(wait), **sharded,
        )
        return json.loads(text)

    def commit_async(self, step: int, model: Any = None, optimizer: Any = None,
                     extra: Any = None, **kwargs: Any) -> CommitHandle:
        """Snapshots the state to host memory and commits it in the background.

        Returns at once with a handle (``wait()`` gives the outcome or raises).
        At most one snapshot is in flight: a second call first waits for the
        previous commit, and raises its error if it failed. The snapshot's
        host buffers are kept and reused by the next call (memory: one copy
        of the state, until ``close()``).
        """
        unknown = set(kwargs) - {"branch", "parent", "message", "policy", "wait", "shard", "group"}
        if unknown:
            raise TypeError(f"commit_async() got unexpected keyword arguments {sorted(unknown)}")
        self._finish_pending()
        self._take_reserved()
        names = _Files(kwargs.get("shard"))
        files = _files(model, optimizer, extra, pool=self._pool, names=names)
        box: dict = {}

        def run() -> None:
            try:
                box["outcome"] = self._commit_files(
                    step, files, kwargs.get("branch"), kwargs.get("parent"),
                    kwargs.get("message"), kwargs.get("policy"), kwargs.get("wait", 0.0),
                    names.shard, kwargs.get("group"),
                )
            except BaseException as e:  # surfaced by wait()
                box["error"] = e

        thread = threading.Thread(target=run, name="ckptvc-commit", daemon=True)
        thread.start()
        self._pending = CommitHandle(thread, box)
        return self._pending

    def reserve_snapshot(self, model: Any = None, optimizer: Any = None) -> None:
        """Prepares ``commit_async``'s snapshot buffers for this state in a
        background thread, and returns at once.

        The first ``commit_async`` otherwise allocates them while the
        training loop waits, and first writes to fresh memory cost several
        times a copy into memory already mapped. Call it once the state has
        its final shapes (after the first optimizer step: Adam creates its
        moments there), well before the first ``commit_async``, which waits
        for the preparation if it is still running. Memory: one copy of the
        state, from now on (as after the first ``commit_async``).
        """
        self._take_reserved()
        model_tensors = _model_tensors(model)
        opt_tensors, _ = _optimizer_state(model, optimizer)
        specs = [((file, name), _host_spec(value))
                 for file, tensors in ((MODEL_FILE, model_tensors), (OPTIMIZER_FILE, opt_tensors))
                 for name, value in tensors.items()]
        buffers: dict = {}

        def prepare() -> None:
            for key, (shape, dtype) in specs:
                buffer = _host_buffer(shape, dtype)
                _prefault(buffer)
                buffers[key] = buffer

        thread = threading.Thread(target=prepare, name="ckptvc-reserve", daemon=True)
        thread.start()
        self._reserving = (thread, buffers)

    def _take_reserved(self) -> None:
        """Waits for a reserve_snapshot in progress and adopts its buffers
        (only when no snapshot is in flight)."""
        reserving, self._reserving = self._reserving, None
        if reserving is not None:
            thread, buffers = reserving
            thread.join()
            self._pool.adopt(buffers)

    def _finish_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending._settle()

    # --- reading -------------------------------------------------------

    def log(self, branch: Optional[str] = None, all: bool = False) -> list:
        return json.loads(self._native.log(branch=branch, all=all))

    def show(self, rev: str) -> dict:
        """The commit at ``rev`` as ``ckptvc show --json`` prints it.

        Per tensor: ``rel_error``, the relative L2 error of the stored values
        (what ``load`` restores is within it), and ``update_error``, the
        relative error lossy coding put into Adam's update m/(√v+ε) (for m
        and v each one's share, for a weight both together; ``None`` where
        not measured). ``update_error`` at the top level holds the totals
        ``m``, ``v`` and ``both``: what a resumed run feels of the moments'
        errors.
        """
        return json.loads(self._native.show(rev))

    def checkout(self, rev: str, dir: str, force: bool = False,
                 shard: Optional[tuple] = None) -> dict:
        """Writes the commit's files into ``dir``, as ``ckptvc checkout``.

        ``shard=(rank, world_size)`` writes only that rank's files of a
        sharded step (``__<rank>_*.distcp``, ``zero_pp_rank_<rank>_*``, …).
        """
        return json.loads(self._native.checkout(rev, str(dir), force=force, shard=shard))

    def commit_dir(self, dir: str, step: int, shard: Optional[tuple] = None,
                   group: Optional[str] = None, branch: Optional[str] = None,
                   message: Optional[str] = None, policy: Optional[str] = None,
                   wait: float = 0.0) -> dict:
        """Commits a checkpoint directory (as ``ckptvc commit``).

        With ``shard=(rank, world_size)``, commits only that rank's files of
        a step every rank commits at once (PyTorch DCP, DeepSpeed ZeRO): the
        step becomes one commit when the last shard is in; the outcome's
        ``sealed`` is then set. ``group`` names the attempt (see
        ``ckptvc commit --group``).
        """
        self._finish_pending()
        text = self._native.commit_dir(
            str(dir), int(step), shard=None if shard is None else (int(shard[0]), int(shard[1])),
            group=group, branch=branch, message=message, policy_name=policy, wait=float(wait),
        )
        return json.loads(text)

    def pending(self) -> list:
        """Steps whose shards have not all arrived (as ``ckptvc status``)."""
        return json.loads(self._native.pending())

    def files(self, rev: str) -> list:
        """The commit's files and their tensors (name, dtype, shape, bytes)."""
        return json.loads(self._native.files(rev))

    def _read_layout(self, rev: str, shard: Optional[tuple]) -> tuple[_Files, list]:
        """The names to read ``rev``'s state by, and its files, checked
        against the number of ranks that committed it."""
        names = _Files(shard)
        files = self.files(rev)
        ranks = {int(m.group(1)) for f in files if (m := _RANK_FILE.match(f["name"]))}
        world = max(ranks) + 1 if ranks else 0
        whole = any(f["name"] in (MODEL_FILE, OPTIMIZER_FILE) for f in files)
        if names.shard is None and ranks and not whole:
            raise CkptvcError(
                f"{rev} was committed by {world} ranks: read it with shard=(rank, {world})")
        if names.shard is not None and names.shard[1] != world:
            raise CkptvcError(
                f"{rev} was committed by {world} ranks, not {names.shard[1]}: each rank "
                "reads the part it committed (loading into another number of ranks "
                "is not supported)" if world else
                f"{rev} was not committed by ranks: read it without shard")
        return names, files

    @staticmethod
    def _tensor_index(files: list) -> dict:
        out = {}
        for f in files:
            for t in f.get("tensors") or []:
                out[(f["name"], t["name"])] = t
        return out

    def _state(self, rev: str, names: _Files, files: list) -> dict:
        if names.state not in {f["name"] for f in files}:
            return {"extra": None, "optimizer": {}}
        return pickle.loads(self._native.read_file(rev, names.state))

    def tag(self, name: str, rev: str) -> str:
        """Tags ``rev`` as ``name`` (moving an existing tag); returns the id."""
        return self._native.tag(name, rev)

    def delete_tag(self, name: str) -> None:
        self._native.delete_tag(name)

    def head(self) -> str:
        """The current branch."""
        return self._native.head()

    def state_dict(self, rev: str, torch: bool = False, shard: Optional[tuple] = None) -> dict:
        """``{"model": {name: array}, "optimizer": {param: {key: array}},
        "extra": …}``: numpy arrays (bf16 tensors as uint16 arrays of their
        bits), or with ``torch=True`` torch tensors of the stored dtypes.
        ``shard=(rank, world_size)``: that rank's part of a sharded commit."""
        out = self._state_dict_numpy(rev, shard)
        if torch:
            out["model"] = {k: _to_torch(v, d) for k, (v, d) in out["model"].items()}
            out["optimizer"] = {p: {k: _to_torch(v, d) for k, (v, d) in keys.items()}
                                for p, keys in out["optimizer"].items()}
        else:
            out["model"] = {k: v for k, (v, _) in out["model"].items()}
            out["optimizer"] = {p: {k: v for k, (v, _) in keys.items()}
                                for p, keys in out["optimizer"].items()}
        return out

    def _state_dict_numpy(self, rev: str, shard: Optional[tuple]) -> dict:
        names, files = self._read_layout(rev, shard)
        index = self._tensor_index(files)
        items, model, optimizer = [], {}, {}
        for (file, name), meta in index.items():
            if file not in (names.model, names.optimizer):
                continue
            array = np.empty(meta["shape"], dtype=_FROM_SAFETENSORS[meta["dtype"]])
            items.append((file, name, _buffer(array)))
            if file == names.model:
                model[name] = (array, meta["dtype"])
            else:
                param, _, key = name.rpartition(".")
                optimizer.setdefault(param, {})[key] = (array, meta["dtype"])
        self._native.read_into(rev, items)
        state = self._state(rev, names, files)
        return {"model": model, "optimizer": optimizer, "extra": state.get("extra")}

    def load(self, rev: str, model: Any = None, optimizer: Any = None,
             shard: Optional[tuple] = None) -> Any:
        """Restores ``rev`` into ``model`` (decoded into its tensors' memory)
        and ``optimizer``; returns the ``extra`` given at commit.

        Shapes and dtypes must match the commit's: a mismatch raises
        ``CkptvcError`` before anything is written. ``shard=(rank,
        world_size)``: each rank of a sharded run restores the part it
        committed (DTensors into their local shards), with as many ranks as
        committed it.
        """
        names, files = self._read_layout(rev, shard)
        plan = _ReadPlan(self._tensor_index(files))
        for name, tensor in _model_tensors(model).items():
            plan.add(tensor, names.model, name)
        plan.run(self._native, rev)
        state = self._state(rev, names, files)
        if optimizer is not None:
            self._load_optimizer(rev, plan.index, model, optimizer,
                                 state.get("optimizer") or {}, names.optimizer)
        return state.get("extra")

    def _load_optimizer(self, rev, index, model, optimizer, rest, opt_file) -> None:
        if isinstance(optimizer, Mapping):
            plan = _ReadPlan(index)
            for param, keys in optimizer.items():
                for key, array in keys.items():
                    plan.add(array, opt_file, f"{param}.{key}")
            plan.run(self._native, rev)
            return
        import torch

        params = dict(model.named_parameters())
        order = [n for g in rest.get("param_groups", []) for n in g["params"]]
        position = {n: i for i, n in enumerate(order)}
        state, plan = {}, _ReadPlan(index)
        for (file, tname), meta in index.items():
            if file != opt_file:
                continue
            pname, _, key = tname.rpartition(".")
            if pname not in position or pname not in params:
                raise CkptvcError(f"optimizer state `{tname}` names no parameter of the model")
            like = params[pname]
            # Decode into the optimizer's own state tensor when it has one of
            # the same shape and dtype: load_state_dict then keeps it (no
            # second copy of the state in memory).
            t = optimizer.state.get(like, {}).get(key)
            if not (_is_torch(t) and list(_local(t).shape) == meta["shape"]
                    and _TORCH_DTYPES.get(str(t.dtype)) == meta["dtype"]):
                # Where load_state_dict would move it (Adam keeps `step` on
                # the host), so that it is decoded there in bounded pieces.
                device = _local(like).device if key != "step" else "cpu"
                t = torch.empty(meta["shape"], dtype=_torch_dtype(meta["dtype"]), device=device)
                if key != "step":
                    t = _like_sharded(t, like)
            plan.add(t, opt_file, tname)
            state.setdefault(position[pname], {})[key] = (t, like.device)
        plan.run(self._native, rev)
        full_state = {}
        for i, keys in state.items():
            full_state[i] = {k: (t.to(dev) if k != "step" else t) for k, (t, dev) in keys.items()}
        for name, scalars in (rest.get("scalars") or {}).items():
            full_state.setdefault(position[name], {}).update(scalars)
        groups = []
        for g in rest.get("param_groups", []):
            groups.append({**g, "params": [position[n] for n in g["params"]]})
        optimizer.load_state_dict({"state": full_state, "param_groups": groups})


def _like_sharded(t: Any, like: Any) -> Any:
    """Local tensor ``t`` as a DTensor sharded as parameter ``like`` is
    (an optimizer's state of a DTensor parameter must be one); ``t`` itself
    when ``like`` is a plain tensor."""
    if not hasattr(like, "placements"):
        return t
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def _to_torch(array: np.ndarray, dtype: str):
    import torch

    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype == "BF16" else t


def _torch_dtype(name: str):
    import torch

    return {v: getattr(torch, k.split(".")[1]) for k, v in _TORCH_DTYPES.items()}[name]


class _ReadPlan:
    """Where a load decodes each tensor, checked against the commit before
    anything is written: straight into its memory (host tensors and
    writable arrays), into a contiguous host copy that is copied back (a
    non-contiguous host tensor), or piece by piece through one bounded host
    buffer (a tensor on a device: no host copy of it whole)."""

    def __init__(self, index: dict):
        self.index = index
        self.items: list = []
        self.copies: list = []
        self.on_device: list = []

    def add(self, tensor: Any, file: str, name: str) -> None:
        what = f"{file}: tensor `{name}`"
        tensor = _local(tensor)
        meta = self.index.get((file, name))
        if meta is None:
            raise CkptvcError(f"the commit has no tensor `{name}` in {file}")
        if _is_torch(tensor):
            dtype, shape = _torch_spec(tensor, what)[0], list(tensor.shape)
        else:
            array = np.asarray(tensor)
            dtype, shape = _NUMPY_DTYPES.get(array.dtype, str(array.dtype)), list(array.shape)
        if (dtype, shape) != (meta["dtype"], meta["shape"]):
            raise CkptvcError(
                f"{what} is {meta['dtype']} {meta['shape']} in the commit, but {dtype} {shape} here"
            )
        if not _is_torch(tensor):
            if not (isinstance(tensor, np.ndarray) and tensor.flags.c_contiguous
                    and tensor.flags.writeable):
                raise CkptvcError(f"{what}: load needs writable C-contiguous arrays")
            self.items.append((file, name, _buffer(tensor)))
            return
        t = tensor.detach()
        if not _on_host(t):
            self.on_device.append((file, name, t))
            return
        if t.is_contiguous():
            self.items.append((file, name, _buffer(_numpy_view(t))))
            return
        host = _numpy_view(t.contiguous())
        self.items.append((file, name, _buffer(host)))
        self.copies.append(lambda t=t, host=host: t.copy_(_host_as_torch(host, t).reshape(t.shape)))

    def run(self, native: Any, rev: str) -> None:
        native.read_into(rev, self.items)
        for copy_back in self.copies:
            copy_back()
        staging = None
        for file, name, t in self.on_device:
            if staging is None:
                staging = _host_buffer((_DEVICE_PIECE_BYTES,), np.dtype("uint8"))
            _read_to_device(native, rev, file, name, t, staging)


def _read_to_device(native: Any, rev: str, file: str, name: str, t: Any, staging: np.ndarray) -> None:
    """Decodes tensor ``name`` of ``rev`` into device tensor ``t`` through
    the host buffer ``staging``, one piece of it at a time."""
    import torch

    dst = t if t.is_contiguous() else torch.empty(t.shape, dtype=t.dtype, device=t.device)
    flat = dst.view(-1)
    size = t.element_size()
    total = flat.numel() * size
    host_dtype = _torch_spec(t, name)[1]
    for offset in range(0, total, len(staging)):
        piece = staging[:min(len(staging), total - offset)]
        native.read_range_into(rev, file, name, offset, piece)
        start = offset // size
        flat[start:start + len(piece) // size].copy_(_host_as_torch(piece.view(host_dtype), t))
    if dst is not t:
        t.copy_(dst)
