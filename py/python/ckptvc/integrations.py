"""Training-framework integrations, all committing from memory.

- ``TrainerCallback``: a ``transformers.TrainerCallback`` that commits the
  model, the optimizer (moments paired with parameters by name) and the
  scheduler and trainer state each time the Trainer saves.
- ``CheckpointIO``: a PyTorch Lightning ``CheckpointIO`` plugin that keeps
  Lightning's checkpoints in a ckptvc store instead of ``.ckpt`` files.

Each framework is imported only when its integration is used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Optional

from . import CkptvcError, Repo


def _open(repo: "Repo | str", policy: Optional[str]) -> Repo:
    if isinstance(repo, Repo):
        return repo
    if "://" in str(repo) or os.path.exists(os.path.join(str(repo), "FORMAT")):
        return Repo.open(str(repo))
    return Repo.init(str(repo), policy=policy or "balanced")


def TrainerCallback(repo: "Repo | str" = ".ckptvc", policy: Optional[str] = None,
                    branch: Optional[str] = None, delete_saved: bool = False,
                    asynchronous: bool = False):
    """A ``transformers.TrainerCallback`` committing every save from memory.

    ``delete_saved`` removes the ``checkpoint-N`` folder the Trainer wrote
    once its commit is in the store; ``asynchronous`` uses ``commit_async``
    (training goes on while the commit encodes; its snapshot buffers are
    reserved after the first step, see ``Repo.reserve_snapshot``). Restore with
    ``restore_trainer(repo, rev, model, optimizer, lr_scheduler)``.
    """
    from transformers import TrainerCallback as Base

    store = _open(repo, policy)

    class _Callback(Base):
        _reserved = False

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            # Once, after the first optimizer step (Adam's moments exist from
            # there): the first save's snapshot then copies into memory
            # already mapped instead of blocking on fresh pages.
            if asynchronous and not self._reserved and state.is_world_process_zero \
                    and model is not None:
                self._reserved = True
                store.reserve_snapshot(model=model, optimizer=optimizer)

        def on_save(self, args, state, control, model=None, optimizer=None,
                    lr_scheduler=None, **kwargs):
            if not state.is_world_process_zero or model is None:
                return
            extra = {
                "trainer_state": _trainer_state_json(state),
                "scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
            }
            commit = store.commit_async if asynchronous else store.commit
            commit(state.global_step, model=model, optimizer=optimizer, extra=extra,
                   branch=branch, policy=policy)
            if delete_saved:
                if asynchronous:
                    store._finish_pending()
                folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                shutil.rmtree(folder, ignore_errors=True)

        def on_train_end(self, args, state, control, **kwargs):
            store._finish_pending()

    return _Callback()


def _trainer_state_json(state) -> str:
    """The Trainer's state as JSON (what it writes as trainer_state.json)."""
    import dataclasses

    if hasattr(state, "to_json_string"):
        return state.to_json_string()
    return json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True, default=repr)


def restore_trainer(repo: "Repo | str", rev: str, model, optimizer=None,
                    lr_scheduler=None) -> dict:
    """Loads what ``TrainerCallback`` committed; returns the trainer state."""
    store = _open(repo, None)
    extra = store.load(rev, model, optimizer) or {}
    if lr_scheduler is not None and extra.get("scheduler") is not None:
        lr_scheduler.load_state_dict(extra["scheduler"])
    return json.loads(extra.get("trainer_state") or "{}")


def _tag_for(path: Any) -> str:
    """A tag name for a Lightning checkpoint path (its file name, with the
    characters tags do not allow replaced)."""
    base = os.path.basename(str(path).rstrip("/")) or "checkpoint"
    tag = re.sub(r"[^A-Za-z0-9._-]", "_", base)
    return "lightning/" + tag.lstrip("-.") or "lightning/checkpoint"


def CheckpointIO(repo: "Repo | str" = ".ckptvc", policy: Optional[str] = None,
                 branch: Optional[str] = None):
    """A Lightning ``CheckpointIO`` storing checkpoints in a ckptvc store.

    ``trainer = Trainer(plugins=[ckptvc.integrations.CheckpointIO("runs/.ckptvc")])``.
    Each saved checkpoint becomes a commit at its ``global_step``, tagged
    ``lightning/<file name>`` so that Lightning's paths still name it.
    Lightning hands over optimizer state keyed by index, not by parameter
    name, so moments are stored losslessly here (the model is coded by
    ``policy``); use ``Repo.commit(model=..., optimizer=...)`` for paired,
    lossy moments.
    """
    try:
        from lightning.pytorch.plugins.io import CheckpointIO as Base
    except ImportError:  # the older package name
        from pytorch_lightning.plugins.io import CheckpointIO as Base

    store = _open(repo, policy)

    class _IO(Base):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            step = int(checkpoint.get("global_step", 0))
            rest = {k: v for k, v in checkpoint.items()
                    if k not in ("state_dict", "optimizer_states")}
            optimizer_tensors = {}
            optimizer_rest = []
            for i, opt in enumerate(checkpoint.get("optimizer_states", [])):
                kept = {k: v for k, v in opt.items() if k != "state"}
                scalars = {}
                for idx, keys in opt.get("state", {}).items():
                    for key, value in keys.items():
                        if type(value).__module__.startswith("torch"):
                            optimizer_tensors[f"optimizer{i}/{idx}/{key}"] = value
                        else:
                            scalars.setdefault(idx, {})[key] = value
                optimizer_rest.append({"rest": kept, "scalars": scalars,
                                       "indices": list(opt.get("state", {}).keys())})
            extra = {"lightning": rest, "optimizers": optimizer_rest, "path": str(path)}
            model = dict(checkpoint.get("state_dict", {}))
            model.update(optimizer_tensors)
            try:
                store.commit(step, model=model, extra=extra, branch=branch, policy=policy,
                             message=os.path.basename(str(path)))
            except CkptvcError as e:
                if getattr(e, "kind", "") != "step_exists":
                    raise
            store.tag(_tag_for(path), f"{branch or store.head()}@{step}")

        def load_checkpoint(self, path, map_location=None):
            state = store.state_dict(_tag_for(path), torch=True)
            tensors = state["model"]
            extra = state["extra"]
            checkpoint = dict(extra["lightning"])
            checkpoint["state_dict"] = {k: v for k, v in tensors.items()
                                        if not k.startswith("optimizer")}
            optimizers = []
            for i, saved in enumerate(extra["optimizers"]):
                opt = dict(saved["rest"])
                opt["state"] = {}
                for idx in saved["indices"]:
                    keys = dict(saved["scalars"].get(idx, {}))
                    prefix = f"optimizer{i}/{idx}/"
                    keys.update({k[len(prefix):]: v for k, v in tensors.items()
                                 if k.startswith(prefix)})
                    opt["state"][idx] = keys
                optimizers.append(opt)
            checkpoint["optimizer_states"] = optimizers
            if map_location is not None:
                checkpoint["state_dict"] = {k: v.to(map_location)
                                            for k, v in checkpoint["state_dict"].items()}
            return checkpoint

        def remove_checkpoint(self, path):
            store.delete_tag(_tag_for(path))

    return _IO()


def _default_group() -> str:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if run_id is None:
        return ""
    return run_id if restart is None else f"{run_id}.{restart}"


def commit_distributed(repo: "Repo | str", checkpoint_dir: str, step: int,
                       policy: Optional[str] = None, message: Optional[str] = None,
                       branch: Optional[str] = None, group: Optional[str] = None,
                       wait: float = 600.0) -> dict:
    """Commits this rank's part of a sharded checkpoint, on every rank.

    Call it on every rank after ``torch.distributed.checkpoint.save`` (or
    DeepSpeed's ``save_checkpoint``) has written ``checkpoint_dir``: each
    rank commits its own files (``--shard rank/world_size``) with no lock
    held while it encodes, and the step becomes one commit when the last
    rank is in. Outside ``torch.distributed`` the whole folder is committed.
    ``group`` defaults to torchrun's run id and restart count.
    """
    store = _open(repo, policy)
    shard = None
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            shard = (dist.get_rank(), dist.get_world_size())
    except ImportError:
        pass
    return store.commit_dir(
        checkpoint_dir, step, shard=shard,
        group=_default_group() if group is None else group,
        branch=branch, message=message, policy=policy, wait=wait,
    )
