"""ckptvc_torch: PyTorch checkpoints in the layout ckptvc stores best.

One file, no dependencies beyond torch and safetensors (the Trainer callback
also needs transformers, imported only when used).

    save(dir, model, optimizer, step, extra=None)
        model.safetensors      the model's state dict (shared tensors once)
        optimizer.safetensors  every tensor of the optimizer state, named by
                               parameter: <param>.exp_avg, <param>.exp_avg_sq, ...
        optimizer.json         param_groups (hyperparameters, params by name)
                               and non-tensor state
        meta.json              step and `extra`
    load(dir, model, optimizer=None) -> meta
        restores all of it; returns meta.json's content.
    commit(dir, step, repo=".ckptvc", **flags)
        runs `ckptvc commit` and returns the commit id.
    CkptvcCallback(repo=".ckptvc", policy=None, branch=None)
        a transformers.TrainerCallback: after the Trainer saves checkpoint-N,
        writes ckptvc-params.json (the optimizer's parameter names by index,
        which optimizer.pt does not record) and commits the folder.

A training loop that commits every 100 steps, and a restart from a fork:

    import ckptvc_torch as ck
    for step, batch in enumerate(loader, 1):
        loss = model(batch).loss
        loss.backward(); opt.step(); opt.zero_grad()
        if step % 100 == 0:
            ck.save(f"ckpt/{step}", model, opt, step)
            ck.commit(f"ckpt/{step}", step, repo="runs.ckptvc")
            shutil.rmtree(f"ckpt/{step}")      # the store has it now
    # later: restart from step 500 on a new branch
    #   ckptvc --repo runs.ckptvc checkout main@500 --output restart
    #   meta = ck.load("restart", model, opt)   # then train on, committing
    #   with ck.commit(..., branch="lr-sweep", parent="main@500")
"""

import json
import os
import subprocess

import torch
from safetensors.torch import load_file, save_file

NAMES_FILE = "ckptvc-params.json"


def param_names(model, optimizer):
    """The parameter names of `optimizer`'s state-dict indices, in index order.

    The indices are read from optimizer.state_dict() itself, so they are the
    ones optimizer.pt is keyed by; a parameter the model does not own is None.
    """
    by_id = {id(p): n for n, p in model.named_parameters()}
    packed = optimizer.state_dict()["param_groups"]
    names = {}
    for group, packed_group in zip(optimizer.param_groups, packed):
        for p, index in zip(group["params"], packed_group["params"]):
            names[index] = by_id.get(id(p))
    return [names.get(i) for i in range(max(names, default=-1) + 1)]


def write_param_names(directory, model, optimizer):
    """Writes ckptvc-params.json, which lets ckptvc pair optimizer.pt's state
    with the model's parameters for certain."""
    with open(os.path.join(directory, NAMES_FILE), "w") as f:
        json.dump({"version": 1, "params": param_names(model, optimizer)}, f)


def _model_tensors(model):
    """The state dict with each shared storage once (safetensors refuses
    aliases); returns (tensors, {dropped name: kept name})."""
    seen, tensors, aliases = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, aliases


def save(directory, model, optimizer, step, extra=None):
    os.makedirs(directory, exist_ok=True)
    tensors, aliases = _model_tensors(model)
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    names = param_names(model, optimizer)
    state = optimizer.state_dict()
    moments, scalars = {}, {}
    for index, entries in state["state"].items():
        name = names[index] if index < len(names) and names[index] else f"param.{index}"
        for key, value in entries.items():
            if torch.is_tensor(value):
                moments[f"{name}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(name, {})[key] = value
    save_file(moments, os.path.join(directory, "optimizer.safetensors"))
    groups = []
    for group in state["param_groups"]:
        group = dict(group)
        group["params"] = [names[i] or f"param.{i}" for i in group["params"]]
        groups.append(group)
    with open(os.path.join(directory, "optimizer.json"), "w") as f:
        json.dump({"param_groups": groups, "scalars": scalars, "aliases": aliases}, f, indent=1)
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump({"step": step, **(extra or {})}, f, indent=1)


def load(directory, model, optimizer=None):
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "optimizer.json")) as f:
        saved = json.load(f)
    for dropped, kept in saved.get("aliases", {}).items():
        tensors[dropped] = tensors[kept]
    model.load_state_dict(tensors)
    if optimizer is not None:
        moments = load_file(os.path.join(directory, "optimizer.safetensors"))
        names = param_names(model, optimizer)
        index_of = {n: i for i, n in enumerate(names) if n}
        state = {}
        for key, value in moments.items():
            name, entry = key.rsplit(".", 1)
            index = index_of[name] if name in index_of else int(name.split(".", 1)[1])
            state.setdefault(index, {})[entry] = value
        for name, values in saved["scalars"].items():
            index = index_of[name] if name in index_of else int(name.split(".", 1)[1])
            state.setdefault(index, {}).update(values)
        groups = []
        for group, live in zip(saved["param_groups"], optimizer.param_groups):
            group = dict(group)
            group["params"] = [
                index_of[n] if n in index_of else int(n.split(".", 1)[1]) for n in group["params"]
            ]
            # JSON has no tuples: give back the types the optimizer uses (betas).
            for key, value in group.items():
                if isinstance(live.get(key), tuple) and isinstance(value, list):
                    group[key] = tuple(value)
            groups.append(group)
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    with open(os.path.join(directory, "meta.json")) as f:
        return json.load(f)


def commit(directory, step, repo=".ckptvc", ckptvc="ckptvc", **flags):
    """`ckptvc commit DIR --step STEP` plus flags (branch="x" → --branch x);
    returns the commit id. Raises CalledProcessError with ckptvc's message."""
    cmd = [ckptvc, "--repo", repo, "commit", directory, "--step", str(step)]
    for key, value in flags.items():
        if value is True:
            cmd.append("--" + key.replace("_", "-"))
        elif value not in (None, False):
            cmd += ["--" + key.replace("_", "-"), str(value)]
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return done.stdout.strip()


def CkptvcCallback(repo=".ckptvc", ckptvc="ckptvc", **flags):
    """A transformers.TrainerCallback committing every checkpoint the Trainer
    saves. repo=None only writes ckptvc-params.json (for `ckptvc import` or
    `ckptvc watch` to pick up)."""
    from transformers import TrainerCallback

    class _Callback(TrainerCallback):
        def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
            if not state.is_world_process_zero:
                return
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if model is not None and optimizer is not None:
                write_param_names(folder, model, optimizer)
            if repo is not None:
                commit(folder, state.global_step, repo=repo, ckptvc=ckptvc, **flags)

    return _Callback()
