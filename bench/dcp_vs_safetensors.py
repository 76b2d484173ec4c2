#!/usr/bin/env python3
"""One FSDP2 training run saved two ways: a PyTorch Distributed Checkpoint and one safetensors folder.

Trains a byte-level GPT (vocabulary 256, 3 layers, width 256, 4 heads, context 64;
about 2.5 M parameters) from scratch, sharded with FSDP2 `fully_shard` over a CPU
device mesh (gloo), with torch.optim.AdamW (lr 1e-3, linear warmup then cosine to
10%, weight decay 0.1), on the .py sources of the installed torch package read as
bytes (fixed seeds, one thread per rank). Every --every steps it writes

    OUT/dcp/step-NNNNNN/   dcp.save({"model": get_model_state_dict(model),
                                      "optim": get_optimizer_state_dict(model, opt)})
    OUT/st/step-NNNNNN/    model.safetensors      <fqn> -> fp32 (the DCP "model." keys unprefixed)
                           optimizer.safetensors  <fqn>.exp_avg, <fqn>.exp_avg_sq (fp32)
                           meta.json              step, loss, lr, Adam step count, ...

The safetensors folder holds the same state, gathered on rank 0 with
StateDictOptions(full_state_dict=True, cpu_offload=True), in the layout of
fixtures/series. Used by scripts/bench_dcp.sh.

Usage:
    torchrun --nproc-per-node=2 bench/dcp_vs_safetensors.py --out DIR --steps 240 --every 20
"""

import argparse
import glob
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    from torch.distributed._composable.fsdp import fully_shard
from torch.distributed.device_mesh import init_device_mesh

VOCAB, WIDTH, HEADS, LAYERS, CONTEXT = 256, 256, 4, 3, 64
BATCH = 32  # global; each rank takes BATCH // world
BASE_LR, WARMUP = 1e-3, 20


def load_text(limit_bytes=4_000_000):
    """The torch package's own .py files, sorted by path, as a byte stream."""
    root = os.path.dirname(torch.__file__)
    data = bytearray()
    for p in sorted(glob.glob(f"{root}/**/*.py", recursive=True)):
        with open(p, "rb") as f:
            data += f.read()
        if len(data) >= limit_bytes:
            break
    return torch.frombuffer(bytearray(data[:limit_bytes]), dtype=torch.uint8).long()


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Embedding(CONTEXT, WIDTH)
        self.blocks = nn.ModuleList(Block(WIDTH, HEADS) for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def lr_at(step, total):
    if step <= WARMUP:
        return BASE_LR * step / WARMUP
    t = (step - WARMUP) / max(1, total - WARMUP)
    return BASE_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--every", type=int, default=20)
    args = ap.parse_args()

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # identical init on every rank
    model = TinyGPT()
    n_params = sum(p.numel() for p in model.parameters())
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # root: tok, pos, ln_f, head
    opt = torch.optim.AdamW(model.parameters(), lr=BASE_LR, betas=(0.9, 0.999), weight_decay=0.1)
    text = load_text()
    if rank == 0:
        print(f"parameters: {n_params}, text bytes: {len(text)}, world {world}", flush=True)

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    per = BATCH // world
    t0 = time.time()
    save_s = 0.0
    for step in range(1, args.steps + 1):
        lr = lr_at(step, args.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        gen = torch.Generator().manual_seed(1000 + step)  # the global batch is fixed by the step
        ix = torch.randint(len(text) - CONTEXT - 1, (BATCH,), generator=gen)[rank * per:(rank + 1) * per]
        x = torch.stack([text[i:i + CONTEXT] for i in ix])
        y = torch.stack([text[i + 1:i + CONTEXT + 1] for i in ix])
        loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        g = loss.detach().clone()
        dist.all_reduce(g)
        loss_v = g.item() / world
        if step % args.every:
            continue

        ts = time.time()
        # 1. Distributed Checkpoint: sharded DTensors, one __<rank>_0.distcp per rank.
        path = f"{args.out}/dcp/step-{step:06d}"
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=path)
        # 2. The same state gathered to rank 0 (collective: every rank calls), one safetensors folder.
        msd = get_model_state_dict(model, options=full)
        osd = get_optimizer_state_dict(model, opt, options=full)
        if rank == 0:
            d = f"{args.out}/st/step-{step:06d}"
            os.makedirs(d, exist_ok=True)
            save_file({k: v.detach().contiguous() for k, v in msd.items()}, f"{d}/model.safetensors",
                      metadata={"format": "pt"})
            ost, adam_step = {}, 0
            for name in msd:  # model order
                s = osd["state"].get(name)
                if not s:
                    continue
                ost[f"{name}.exp_avg"] = s["exp_avg"].detach().contiguous()
                ost[f"{name}.exp_avg_sq"] = s["exp_avg_sq"].detach().contiguous()
                adam_step = int(s["step"])
            save_file(ost, f"{d}/optimizer.safetensors")
            pg = osd["param_groups"][0]
            meta = {"step": step, "loss": round(loss_v, 6), "lr": lr, "adam_step": adam_step,
                    "betas": list(pg["betas"]), "eps": pg["eps"], "weight_decay": pg["weight_decay"]}
            with open(f"{d}/meta.json", "w") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
                f.write("\n")
        dist.barrier()
        save_s += time.time() - ts
        if rank == 0:
            print(f"step {step} loss {loss_v:.4f} lr {lr:.2e} saved ({time.time() - t0:.0f} s, "
                  f"{save_s:.0f} s saving)", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
