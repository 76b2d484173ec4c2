"""Sharded commits from memory against the sharded path through files, on a
real FSDP2 run (torchrun, gloo, CPU), every path timed in the same run.

Per checkpoint, with a barrier before and after each phase (the time is the
slowest rank's):
- `dcp.save` of the model's and AdamW's sharded state dicts (the baseline:
  what an FSDP2 run writes);
- today's path: that folder committed by every rank (`commit_dir(...,
  shard=(rank, world))`), the step sealed by the last;
- `commit(..., shard=(rank, world))` from memory into another store;
- `commit_async(..., shard=...)` into a third store: the time the loop is
  blocked (then waited for, outside the timing), its buffers prepared by
  `reserve_snapshot` after the first step.

    torchrun --nproc_per_node 2 bench/fsdp_commit.py [--model-bytes B] [--checkpoints K]

Rank 0 prints a table (markdown) and the ratios.
"""

import argparse
import os
import shutil
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.fsdp import fully_shard

import ckptvc


def make_model(model_bytes):
    d = 1024
    layers = max(1, round(model_bytes / 4 / (8 * d * d)))
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d), torch.nn.LayerNorm(d)]
    model = torch.nn.Sequential(*blocks)
    for block in model:
        fully_shard(block)
    fully_shard(model)
    return model


def train(model, opt, steps):
    """AdamW steps on random gradients: the state moves as in training, at
    a fraction of a forward and backward pass's cost."""
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()
        opt.zero_grad(set_to_none=True)


def phase(fn):
    """Runs ``fn`` on every rank between barriers; the wall time of the
    slowest rank, and ``fn``'s result."""
    dist.barrier()
    start = time.perf_counter()
    out = fn()
    dist.barrier()
    return time.perf_counter() - start, out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-bytes", type=int, default=256 << 20)
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--steps-between", type=int, default=5)
    parser.add_argument("--policy", default="balanced")
    parser.add_argument("--dir", default=os.path.expanduser("~/.cache/ckptvc-bench/fsdp"))
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    stores = {k: os.path.join(args.dir, f"{k}.ckptvc") for k in ("files", "memory", "async")}
    if rank == 0:
        shutil.rmtree(args.dir, ignore_errors=True)
        os.makedirs(args.dir)
        for path in stores.values():
            ckptvc.Repo.init(path, policy=args.policy).close()
    dist.barrier()
    repos = {k: ckptvc.Repo.open(p) for k, p in stores.items()}
    torch.manual_seed(0)
    model = make_model(args.model_bytes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train(model, opt, 1)
    # As a training loop should, once the state has its shapes: the first
    # commit_async then only copies (python_commit.py's --no-reserve shows
    # the difference).
    repos["async"].reserve_snapshot(model, opt)
    numel = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"{world} ranks, {numel / 1e6:.1f}M parameters; state with AdamW "
              f"{numel * 12 / 2**30:.2f} GiB, {numel * 12 / world / 2**30:.2f} GiB per rank")
        print("| step | dcp.save | + commit_dir (today's path) | commit from memory | "
              "÷ dcp.save | ÷ today's path | commit_async blocks | ÷ dcp.save | "
              "ratio from memory | ratio from files |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    shard = (rank, world)
    for k in range(1, args.checkpoints + 1):
        step = k * args.steps_between
        train(model, opt, args.steps_between)
        folder = os.path.join(args.dir, f"dcp-{step}")

        def save():
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=folder)

        t_save, _ = phase(save)
        t_dir, _ = phase(lambda: repos["files"].commit_dir(folder, step, shard=shard))
        if rank == 0:
            shutil.rmtree(folder)
        t_mem, out = phase(lambda: repos["memory"].commit(step, model=model, optimizer=opt,
                                                          shard=shard))
        t_async, handle = phase(lambda: repos["async"].commit_async(
            step, model=model, optimizer=opt, shard=shard))
        phase(handle.wait)
        if rank == 0:
            entry, from_files = repos["memory"].log()[0], repos["files"].log()[0]
            assert entry["step"] == step == from_files["step"], (entry, from_files)
            path = t_save + t_dir
            kind = "keyframe" if entry["keyframe"] else "residual"
            print(f"| {step} ({kind}) | {t_save:.2f} s | {path:.2f} s | {t_mem:.2f} s | "
                  f"{t_mem / t_save:.2f} | {t_mem / path:.2f} | {t_async:.2f} s | "
                  f"{t_async / t_save:.2f} | {entry['ratio']:.1f} | {from_files['ratio']:.1f} |",
                  flush=True)
    for repo in repos.values():
        repo.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
