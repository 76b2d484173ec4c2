"""One rank of an FSDP2 run (torchrun, gloo, CPU) that commits its shards
from memory and restores them into a fresh model; `test_distributed.py`
starts it. Rank 0 writes what it measured to ``OUT`` as JSON.

    torchrun --nproc_per_node N fsdp_worker.py STORE POLICY OUT
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import ckptvc

STORE, POLICY, OUT = sys.argv[1], sys.argv[2], sys.argv[3]


def make(seed):
    torch.manual_seed(seed)
    # Odd sizes: the shards are uneven, and the last bias (1 element) leaves
    # rank 1 an empty shard.
    model = torch.nn.Sequential(
        torch.nn.Linear(96, 257), torch.nn.GELU(), torch.nn.Linear(257, 130),
        torch.nn.GELU(), torch.nn.Linear(130, 1),
    )
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    return model, opt


def train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed * 100 + dist.get_rank())
    for _ in range(steps):
        x = torch.randn(32, 96, generator=g)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def local_params(model):
    return {n: p.to_local().detach().clone() for n, p in model.named_parameters()}


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        ckptvc.Repo.init(STORE, policy=POLICY).close()
    dist.barrier()
    repo = ckptvc.Repo.open(STORE)
    model, opt = make(seed=0)
    sealed = []
    for k, step in enumerate((10, 20, 30)):
        train(model, opt, 10, seed=k)
        if k == 1:
            out = repo.commit_async(step, model=model, optimizer=opt, extra={"rank": rank},
                                    shard=(rank, world)).wait()
        else:
            out = repo.commit(step, model=model, optimizer=opt, extra={"rank": rank},
                              shard=(rank, world))
        sealed.append(out["sealed"] is not None)
        dist.barrier()
    committed = local_params(model)
    moments = {n: opt.state[p]["exp_avg"].to_local().clone() for n, p in model.named_parameters()}
    train(model, opt, 5, seed=7)
    reference = local_params(model)

    fresh, fresh_opt = make(seed=1)
    extra = repo.load("30", fresh, fresh_opt, shard=(rank, world))
    restored = local_params(fresh)
    show = repo.show("30")
    errors = {e["tensor"]: e["rel_error"] for e in show["entries"]
              if e["file"] == f"rank{rank}/model.safetensors"}
    report = {
        "extra": extra,
        "sealed": sealed,
        "log_steps": [e["step"] for e in repo.log()],
        "files": sorted(f["name"] for f in repo.files("30")),
        "shapes": {n: list(t.shape) for n, t in restored.items()},
        "state_is_dtensor": all(type(opt_state["exp_avg"]).__name__ == "DTensor"
                                for opt_state in fresh_opt.state.values()),
        "moments_equal": all(torch.equal(fresh_opt.state[p]["exp_avg"].to_local(), moments[n])
                             for n, p in fresh.named_parameters()),
        # The relative L2 error of each restored weight shard, against what
        # `show` reports for it.
        "errors": {n: [float((restored[n] - committed[n]).norm() / committed[n].norm())
                       if committed[n].numel() else 0.0, errors.get(n)]
                   for n in committed},
    }
    train(fresh, fresh_opt, 5, seed=7)
    report["continues_identically"] = all(
        torch.equal(a, b) for a, b in zip(reference.values(), local_params(fresh).values()))
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        with open(OUT, "w") as f:
            json.dump(reports, f)
    repo.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
