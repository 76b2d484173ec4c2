#!/usr/bin/env python3
"""Resumed-training quality of ckptvc's lossy policies.

Trains a small GPT (about 2.3M parameters, byte-level, 5 layers, width 192)
from scratch with AdamW on real text (the Python documentation sources from
Debian's python3.11-doc), writing a checkpoint every 20 steps. The batch of
step s depends only on (seed, s), so a resumed run sees exactly the batches
the original run saw. Then, per policy:

  * commits the whole series to a fresh ckptvc store with that policy,
  * reports the ratio per residual commit, the total ratio including
    keyframes, and bits per parameter for W, m and v,
  * checks out two points (middle and late), measures the relative L2 error
    of W, m, v at checkout and the fraction of v entries zeroed,
  * resumes 50 steps from each checked-out point and reports the drift: the
    relative L2 distance between the resumed weights and those of resuming
    from the original checkpoint, plus the held-out loss there.

Reference damages measured in the same run: everything rounded to bf16, and
m and v zeroed. Writes docs/resume_quality.png (ratio against drift) and
prints the markdown table for docs/benchmarks.md; the raw numbers go to
<work>/results.json.

Usage: python3 bench/resume_quality.py [--work DIR] [--steps 300]
Needs: torch, safetensors, numpy, matplotlib, zstandard (pip);
python3.11-doc (apt); a release build of ckptvc (./scripts/demo.sh builds it).
Not run by CI.
"""

import argparse
import glob
import json
import math
import os
import shutil
import subprocess
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import zstandard
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DOC_SOURCES = "/usr/share/doc/python3.11/html/_sources"
CONTEXT, BATCH, EVERY, RESUME = 128, 12, 20, 50
BASE_LR, WARMUP = 1e-3, 20


def ckptvc_binary():
    """A private copy of the release binary, so that a rebuild during the run
    cannot mix two versions in one store."""
    private = os.path.join(WORK, "bin", "ckptvc")
    if not os.path.exists(private):
        target = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/ckptvc-target"))
        os.makedirs(os.path.dirname(private), exist_ok=True)
        shutil.copy2(os.path.join(target, "release", "ckptvc"), private)
    return private


def load_text():
    paths = sorted(glob.glob(f"{DOC_SOURCES}/library/*.txt") + glob.glob(f"{DOC_SOURCES}/tutorial/*.txt"))
    if not paths:
        raise SystemExit("apt-get install python3.11-doc")
    data = b"".join(open(p, "rb").read() for p in paths)
    t = torch.tensor(list(data), dtype=torch.uint8).long()
    split = int(len(t) * 0.95)
    return t[:split], t[split:]


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, d=192, heads=6, layers=5):
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, d), nn.Embedding(CONTEXT, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, 256, bias=False)
        mask = torch.triu(torch.ones(CONTEXT, CONTEXT, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos.weight[: idx.shape[1]]
        for b in self.blocks:
            x = b(x, self.mask)
        return self.head(self.ln_f(x))


def lr_at(step, total):
    if step <= WARMUP:
        return BASE_LR * step / WARMUP
    return BASE_LR * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (total + RESUME - WARMUP)))


def batch(text, seed, step):
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    ix = torch.randint(len(text) - CONTEXT - 1, (BATCH,), generator=g)
    return (torch.stack([text[i:i + CONTEXT] for i in ix]),
            torch.stack([text[i + 1:i + CONTEXT + 1] for i in ix]))


def train_steps(model, opt, text, seed, first, last, total):
    for step in range(first, last + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total)
        x, y = batch(text, seed, step)
        loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()


def new_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=BASE_LR, betas=(0.9, 0.999), weight_decay=0.1)


def save(model, opt, step, loss, out):
    os.makedirs(out, exist_ok=True)
    save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, f"{out}/model.safetensors")
    state = {}
    for name, p in model.named_parameters():
        s = opt.state[p]
        state[f"{name}.exp_avg"] = s["exp_avg"].clone()
        state[f"{name}.exp_avg_sq"] = s["exp_avg_sq"].clone()
    save_file(state, f"{out}/optimizer.safetensors")
    with open(f"{out}/meta.json", "w") as f:
        json.dump({"step": step, "loss": loss}, f)


def load(path, step):
    model = GPT()
    model.load_state_dict(load_file(f"{path}/model.safetensors"))
    opt = new_optimizer(model)
    state = load_file(f"{path}/optimizer.safetensors")
    for name, p in model.named_parameters():
        opt.state[p] = {"step": torch.tensor(float(step)),
                        "exp_avg": state[f"{name}.exp_avg"].clone(),
                        "exp_avg_sq": state[f"{name}.exp_avg_sq"].clone()}
    return model, opt


def flat_weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@torch.no_grad()
def held_out_loss(model, held, seed):
    losses = []
    for i in range(8):
        x, y = batch(held, seed + 7, 10_000 + i)
        losses.append(F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1)).item())
    return float(np.mean(losses))


def ckpt_dir(work, step):
    return f"{work}/ckpt/step-{step:06d}"


def resume(path, step, text, held, args):
    model, opt = load(path, step)
    train_steps(model, opt, text, args.seed, step + 1, step + RESUME, args.steps)
    return flat_weights(model), held_out_loss(model, held, args.seed)


def rel(a, b):
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else 0.0


def checkout_errors(orig, recon):
    """Relative L2 error of W, m, v (all tensors of each role together), and
    the fraction of v entries zeroed."""
    out = {}
    o_m, r_m = load_file(f"{orig}/model.safetensors"), load_file(f"{recon}/model.safetensors")
    o_o, r_o = load_file(f"{orig}/optimizer.safetensors"), load_file(f"{recon}/optimizer.safetensors")
    cat = lambda d, keys: torch.cat([d[k].flatten() for k in keys])
    w = sorted(o_m)
    m = sorted(k for k in o_o if k.endswith(".exp_avg"))
    v = sorted(k for k in o_o if k.endswith(".exp_avg_sq"))
    out["err_w"] = rel(cat(r_m, w), cat(o_m, w))
    out["err_m"] = rel(cat(r_o, m), cat(o_o, m))
    out["err_v"] = rel(cat(r_o, v), cat(o_o, v))
    vo, vr = cat(o_o, v), cat(r_o, v)
    out["v_zeroed"] = float(((vr == 0) & (vo > 0)).sum() / max(1, int((vo > 0).sum())))
    return out


def run_ckptvc(*args, json_out=False):
    cmd = [ckptvc_binary(), *args]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout) if json_out else res.stdout


def commit_series(store, policy_args, steps):
    run_ckptvc("--repo", store, "init", "--quiet")
    t0 = time.time()
    raw = 0
    for s in steps:
        run_ckptvc("--repo", store, "--quiet", "commit", ckpt_dir(WORK, s), "--step", str(s), *policy_args)
        raw += sum(os.path.getsize(f) for f in glob.glob(f"{ckpt_dir(WORK, s)}/*"))
    return raw / (time.time() - t0)


def size_metrics(store):
    log = run_ckptvc("--repo", store, "--json", "log", json_out=True)
    residual = [e for e in log if not e["keyframe"]]
    ratio_residual = float(np.mean([e["input_bytes"] / max(1, e["stored_bytes"]) for e in residual]))
    total = sum(e["input_bytes"] for e in log) / sum(e["stored_bytes"] for e in log)
    bits = {"W": [0, 0], "m": [0, 0], "v": [0, 0]}
    for e in residual:
        show = run_ckptvc("--repo", store, "--json", "show", e["id"][:16], json_out=True)
        for t in show["entries"]:
            if not t["tensor"] or t["dtype"] != "F32":
                continue
            role = "m" if t["tensor"].endswith(".exp_avg") else "v" if t["tensor"].endswith(".exp_avg_sq") else "W"
            bits[role][0] += 8 * t["bytes_out"]
            bits[role][1] += t["bytes_in"] // 4
    return {"ratio_residual": ratio_residual, "ratio_total": total,
            **{f"bits_{r}": b[0] / max(1, b[1]) for r, b in bits.items()}}


def damaged(src, dst, how):
    os.makedirs(dst, exist_ok=True)
    shutil.copy(f"{src}/meta.json", dst)
    for f in ("model.safetensors", "optimizer.safetensors"):
        t = load_file(f"{src}/{f}")
        if how == "bf16":
            t = {k: v.to(torch.bfloat16).to(torch.float32) for k, v in t.items()}
        elif how == "zero_mv" and f == "optimizer.safetensors":
            t = {k: torch.zeros_like(v) for k, v in t.items()}
        save_file(t, f"{dst}/{f}")


def bf16_zstd_ratio(step):
    raw, packed = 0, 0
    for f in ("model.safetensors", "optimizer.safetensors"):
        for v in load_file(f"{ckpt_dir(WORK, step)}/{f}").values():
            raw += v.numel() * 4
            b = v.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
            packed += len(zstandard.ZstdCompressor(level=3).compress(b))
    return raw / packed


POLICIES = [
    ("excp", ["--policy", "excp"]),
    ("compact", ["--policy", "compact"]),
    ("balanced", ["--policy", "balanced"]),
    ("faithful", ["--policy", "faithful"]),
]
SWEEP = [
    ("excp α=1e-5", ["--policy", "excp", "--alpha", "1e-5"]),
    ("excp α=2e-4", ["--policy", "excp", "--alpha", "2e-4"]),
    ("tuned 0.0025/0.25/0.1", ["--policy", "balanced", "--w-step", "0.0025", "--m-step", "0.25", "--v-log-step", "0.1"]),
    ("tuned 0.006/1.5/0.4", ["--policy", "balanced", "--w-step", "0.006", "--m-step", "1.5", "--v-log-step", "0.4"]),
    ("tuned 0.035/4/1", ["--policy", "balanced", "--w-step", "0.035", "--m-step", "4", "--v-log-step", "1.0"]),
    ("tuned 0.1/8/2", ["--policy", "balanced", "--w-step", "0.1", "--m-step", "8", "--v-log-step", "2.0"]),
]


def main():
    global WORK
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/ckptvc-resume")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                    help="evaluate only these variants, e.g. 'x=--policy balanced --w-step 0.01' (repeatable)")
    args = ap.parse_args()
    WORK = args.work
    shutil.rmtree(os.path.join(WORK, "bin"), ignore_errors=True)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    text, held = load_text()
    steps = list(range(EVERY, args.steps + 1, EVERY))
    points = [steps[len(steps) // 2 - 1], steps[-2]]  # middle and late, both resumable

    if not os.path.exists(f"{ckpt_dir(WORK, steps[-1])}/meta.json"):
        model = GPT()
        print(f"parameters: {sum(p.numel() for p in model.parameters())}", flush=True)
        opt = new_optimizer(model)
        t0 = time.time()
        for s in steps:
            loss = train_steps(model, opt, text, args.seed, s - EVERY + 1, s, args.steps)
            save(model, opt, s, loss, ckpt_dir(WORK, s))
            print(f"step {s}: loss {loss:.4f} ({time.time() - t0:.0f} s)", flush=True)

    results = {"points": points, "variants": {}}
    reference = {p: resume(ckpt_dir(WORK, p), p, text, held, args) for p in points}
    results["reference_loss"] = {p: reference[p][1] for p in points}

    def evaluate(name, dirs, extra):
        entry = dict(extra)
        for p in points:
            w, loss = resume(dirs[p], p, text, held, args)
            entry[f"drift@{p}"] = rel(w, reference[p][0])
            entry[f"loss@{p}"] = loss
            entry.update({f"{k}@{p}": v for k, v in checkout_errors(ckpt_dir(WORK, p), dirs[p]).items()})
        entry["drift"] = float(np.mean([entry[f"drift@{p}"] for p in points]))
        results["variants"][name] = entry
        print(name, json.dumps(entry), flush=True)

    only = [(v.split("=", 1)[0], v.split("=", 1)[1].split()) for v in args.variant]
    for how in () if only else ("bf16", "zero_mv"):
        dirs = {}
        for p in points:
            dirs[p] = f"{WORK}/damage-{how}/step-{p}"
            damaged(ckpt_dir(WORK, p), dirs[p], how)
        extra = {"ratio_residual": bf16_zstd_ratio(points[-1]), "ratio_total": bf16_zstd_ratio(points[-1])} if how == "bf16" else {}
        evaluate(f"damage: {how}", dirs, extra)

    for name, policy_args in only or POLICIES + ([] if args.no_sweep else SWEEP):
        store = f"{WORK}/store-{name.replace(' ', '_')}"
        shutil.rmtree(store, ignore_errors=True)
        speed = commit_series(store, policy_args, steps)
        dirs = {}
        for p in points:
            dirs[p] = f"{store}-out/step-{p}"
            shutil.rmtree(dirs[p], ignore_errors=True)
            run_ckptvc("--repo", store, "--quiet", "checkout", str(p), "--output", dirs[p])
        evaluate(name, dirs, {**size_metrics(store), "commit_mb_per_s": speed / 1e6, "sweep": name not in dict(POLICIES)})

    with open(f"{WORK}/results{'-variants' if only else ''}.json", "w") as f:
        json.dump(results, f, indent=2)
    report(results)


def report(results):
    points = results["points"]
    ref = results["reference_loss"]
    print(f"\nreference held-out loss after resuming: " + ", ".join(f"step {p}: {ref[p]:.4f}" for p in points))
    head = ("| variant | ratio/residual commit | total ratio | bits W | bits m | bits v | err W | err m | err v "
            "| v zeroed | drift (mean) | " + " | ".join(f"drift@{p} | loss@{p}" for p in points) + " |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, e in results["variants"].items():
        g = lambda k, fmt="{:.3g}": fmt.format(e[k]) if k in e else "—"
        p = points[-1]
        print(f"| {name} | {g('ratio_residual', '{:.1f}')} | {g('ratio_total', '{:.1f}')} | {g('bits_W', '{:.2f}')} "
              f"| {g('bits_m', '{:.2f}')} | {g('bits_v', '{:.2f}')} | {g(f'err_w@{p}')} | {g(f'err_m@{p}')} "
              f"| {g(f'err_v@{p}')} | {g(f'v_zeroed@{p}', '{:.3f}')} | {g('drift')} | "
              + " | ".join(f"{e[f'drift@{q}']:.3g} | {e[f'loss@{q}']:.4f}" for q in points) + " |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 5))
        for name, e in results["variants"].items():
            if "ratio_residual" not in e:
                ax.axvline(e["drift"], ls=":", color="grey")
                ax.text(e["drift"], ax.get_ylim()[1] if ax.get_ylim()[1] > 1 else 10, name, rotation=90, va="top", fontsize=8)
                continue
            marker = "x" if e.get("sweep") else "o"
            color = "tab:red" if name.startswith("excp") else "tab:grey" if name.startswith("damage") else "tab:blue"
            ax.scatter(e["drift"], e["ratio_residual"], marker=marker, color=color)
            ax.annotate(name, (e["drift"], e["ratio_residual"]), fontsize=8, xytext=(4, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("drift after resuming 50 steps (relative L2 vs original, mean of 2 points)")
        ax.set_ylabel("ratio per residual commit")
        ax.set_title("ckptvc policies: size against resumed-training drift")
        fig.tight_layout()
        fig.savefig(os.path.join(ROOT, "docs", "resume_quality.png"), dpi=110)
        print("wrote docs/resume_quality.png")
    except ImportError:
        print("matplotlib missing: no plot")


WORK = None
if __name__ == "__main__":
    main()
