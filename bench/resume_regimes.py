#!/usr/bin/env python3
"""Resumed-training quality of ckptvc's lossy policies across kinds of run (issue 17).

Sibling of bench/resume_quality.py (same model, checkpoint layout, ckptvc
calls and drift measure; its helpers are imported where they fit). Each
regime is its own small run made here:

  finetune  a byte-level GPT pretrained briefly on the Python docs, then
            fine-tuned at lr 1e-4 on different text (the Python standard
            library's source), a checkpoint every 10 steps;
  warmup    from scratch at lr 6e-4 through a 100-step warmup, a checkpoint
            every 20 steps (one resume point inside the warmup);
  long      from scratch, a checkpoint every 100 steps;
  bf16      pure-bf16 training: parameters in bf16, AdamW's m and v in bf16
            (what torch does with bf16 parameters), updates rounded to bf16.
            Matmuls run on fp32 copies of the bf16 weights (bf16 matmul on
            this CPU is ~7x slower); gradients reach the parameters in bf16.

Per regime: the series is committed to a fresh store per policy (excp,
compact, balanced, faithful); two points are checked out and resumed
RESUME steps; drift = relative L2 of the resumed weights against resuming
from the original checkpoint. Reference damages on the same run: bf16
rounding of W, m, v (fp32 runs; its ratio is bf16 + zstd -3), or on the bf16
run one ulp up or down at random on every nonzero element of W, m and v
(the yardstick there; its ratio is zstd -3 of the checkpoint). Diagnostic:
faithful's checkout with only W (or only m, or only v) taken from the lossy
checkout and the rest from the original, to see which error drives drift.

Marks per regime (issue 17), checked at each resume point:
  faithful  drift <= 2x yardstick, ratio per residual commit >= 10
  balanced  ratio >= excp's, drift <= excp's / 10
  compact   drift <= excp's, ratio >= 2x excp's

Usage: python3 bench/resume_regimes.py --work DIR [--regimes finetune,warmup,long,bf16]
                                       [--quick] [--bin PATH]
Writes DIR/results.json and prints a markdown table and the marks per regime.
Needs torch, safetensors, numpy, zstandard (or the zstd CLI); python3.11-doc
(apt) for the text, else falls back to local .py sources. Not run by CI.
"""

import argparse
import resource
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
try:
    import zstandard
except ImportError:  # resume_quality imports it; the zstd CLI does the same job
    zstandard = None
    sys.modules["zstandard"] = type(sys)("zstandard")
import resume_quality as rq  # noqa: E402  (GPT, DOC_SOURCES; not modified)

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)
try:  # deterministic mode NaN-fills every new tensor; everything we read is written
    torch.utils.deterministic.fill_uninitialized_memory = False
except AttributeError:
    pass

CONTEXT, BATCH = rq.CONTEXT, rq.BATCH
BIN = None

REGIMES = {
    "finetune": dict(
        what="fine-tune of a pretrained GPT at lr 1e-4 on different text, ckpt every 10",
        d=192, heads=6, layers=5, dtype="fp32", text="B",
        pretrain=dict(steps=300, lr=1e-3, warmup=20),
        lr=1e-4, warmup=10, every=10, steps=150, resume=40),
    "warmup": dict(
        what="from scratch, lr 6e-4 through a 100-step warmup, ckpt every 20",
        d=256, heads=8, layers=5, dtype="fp32", text="A",
        lr=6e-4, warmup=100, every=20, steps=240, resume=60, points=[80, 220]),
    "long": dict(
        what="from scratch, lr 1e-3, ckpt every 100 steps",
        d=160, heads=5, layers=4, dtype="fp32", text="A",
        lr=1e-3, warmup=50, every=100, steps=800, resume=40),
    "bf16": dict(
        what="pure bf16 (W, m, v in bf16) from scratch, lr 1e-3, ckpt every 20",
        d=192, heads=6, layers=5, dtype="bf16", text="A",
        lr=1e-3, warmup=20, every=20, steps=200, resume=40),
}
QUICK = dict(d=64, heads=2, layers=2, steps_ckpts=4, resume=8, pretrain_steps=30)

POLICIES = ["excp", "compact", "balanced", "faithful"]


def cpu_seconds():
    """CPU time of this process and its finished children (ckptvc)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# ---------------------------------------------------------------- data

def _bytes_tensor(paths, limit=None):
    data = b"".join(open(p, "rb").read() for p in paths)
    if limit:
        data = data[:limit]
    return torch.tensor(list(data), dtype=torch.uint8).long()


def load_texts():
    """A: the Python docs (as resume_quality.py), else torch's .py sources.
    B (fine-tuning): the Python standard library's .py sources, else numpy's."""
    docs = sorted(glob.glob(f"{rq.DOC_SOURCES}/library/*.txt") + glob.glob(f"{rq.DOC_SOURCES}/tutorial/*.txt"))
    a_src = "python3.11-doc sources"
    if not docs:
        docs = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "**", "*.py"), recursive=True))
        a_src = "torch package .py files"
    b_paths = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    b_src = "Python stdlib .py files"
    if not b_paths:
        b_paths = sorted(glob.glob(os.path.join(os.path.dirname(np.__file__), "**", "*.py"), recursive=True))
        b_src = "numpy package .py files"
    out = {}
    for key, paths in (("A", docs), ("B", b_paths)):
        t = _bytes_tensor(paths, limit=8_000_000)
        split = int(len(t) * 0.95)
        out[key] = (t[:split], t[split:])
    return out, {"A": a_src, "B": b_src}


def batch(text, seed, step):
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    ix = torch.randint(len(text) - CONTEXT - 1, (BATCH,), generator=g)
    return (torch.stack([text[i:i + CONTEXT] for i in ix]),
            torch.stack([text[i + 1:i + CONTEXT + 1] for i in ix]))


# ---------------------------------------------------------------- training

def new_model(cfg):
    model = rq.GPT(cfg["d"], cfg["heads"], cfg["layers"])
    return model.to(torch.bfloat16) if cfg["dtype"] == "bf16" else model


def forward(model, x, cfg):
    if cfg["dtype"] != "bf16":
        return model(x)
    # Pure bf16: the parameters (and so AdamW's m, v and the update) are bf16;
    # the matmuls use exact fp32 copies, gradients flow back to bf16.
    params = {n: p.float() for n, p in model.named_parameters()}
    return torch.func.functional_call(model, params, (x,))


def lr_at(step, lr, warmup, horizon):
    if step <= warmup:
        return lr * step / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, horizon - warmup)))


def train_steps(model, opt, text, seed, first, last, sched, cfg):
    loss = None
    for step in range(first, last + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, *sched)
        x, y = batch(text, seed, step)
        loss = F.cross_entropy(forward(model, x, cfg).float().reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()


def new_optimizer(model, lr):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.1)


def save(model, opt, step, loss, out):
    rq.save(model, opt, step, loss, out)  # model/optimizer.safetensors + meta.json


def load(path, step, cfg):
    model = new_model(cfg)
    model.load_state_dict(load_file(f"{path}/model.safetensors"))
    opt = new_optimizer(model, cfg["lr"])
    state = load_file(f"{path}/optimizer.safetensors")
    for name, p in model.named_parameters():
        opt.state[p] = {"step": torch.tensor(float(step)),
                        "exp_avg": state[f"{name}.exp_avg"].clone(),
                        "exp_avg_sq": state[f"{name}.exp_avg_sq"].clone()}
    return model, opt


@torch.no_grad()
def held_out_loss(model, held, seed, cfg):
    losses = []
    for i in range(4):
        x, y = batch(held, seed + 7, 10_000 + i)
        losses.append(F.cross_entropy(forward(model, x, cfg).float().reshape(-1, 256), y.reshape(-1)).item())
    return float(np.mean(losses))


def flat_weights(model):
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else 0.0


# ---------------------------------------------------------------- ckptvc

def run_ckptvc(*args, json_out=False):
    res = subprocess.run([BIN, *args], check=True, capture_output=True, text=True)
    return json.loads(res.stdout) if json_out else res.stdout


def commit_series(store, policy, dirs_by_step):
    shutil.rmtree(store, ignore_errors=True)
    run_ckptvc("--repo", store, "init", "--quiet")
    t0, raw = time.time(), 0
    for s, d in dirs_by_step:
        run_ckptvc("--repo", store, "--quiet", "commit", d, "--step", str(s), "--policy", policy)
        raw += sum(os.path.getsize(f) for f in glob.glob(f"{d}/*"))
    return raw / (time.time() - t0)


def size_metrics(store):
    log = run_ckptvc("--repo", store, "--json", "log", json_out=True)
    residual = [e for e in log if not e["keyframe"]]
    out = {"ratio_residual": float(np.mean([e["input_bytes"] / max(1, e["stored_bytes"]) for e in residual])),
           "ratio_total": sum(e["input_bytes"] for e in log) / sum(e["stored_bytes"] for e in log)}
    bits = {"W": [0, 0], "m": [0, 0], "v": [0, 0]}
    size = {"F32": 4, "BF16": 2, "F16": 2}
    for e in residual:
        show = run_ckptvc("--repo", store, "--json", "show", e["id"][:16], json_out=True)
        for t in show["entries"]:
            if not t["tensor"] or t["dtype"] not in size:
                continue
            role = "m" if t["tensor"].endswith(".exp_avg") else "v" if t["tensor"].endswith(".exp_avg_sq") else "W"
            bits[role][0] += 8 * t["bytes_out"]
            bits[role][1] += t["bytes_in"] // size[t["dtype"]]
    out.update({f"bits_{r}": b[0] / max(1, b[1]) for r, b in bits.items()})
    return out


def update_errors(store, points):
    """What `show` reports of the error put into Adam's update m/(√v+ε) at
    each point: m's share, v's, both (absent from stores before record
    version 6)."""
    out = {}
    for p in points:
        u = run_ckptvc("--repo", store, "--json", "show", str(p), json_out=True).get("update_error")
        out.update({f"upd_{k}@{p}": float(u[k]) for k in ("m", "v", "both")} if u else {})
    return out


# ---------------------------------------------------------------- damages

def checkout_errors(orig, recon):
    o_m, r_m = load_file(f"{orig}/model.safetensors"), load_file(f"{recon}/model.safetensors")
    o_o, r_o = load_file(f"{orig}/optimizer.safetensors"), load_file(f"{recon}/optimizer.safetensors")
    cat = lambda d, keys: torch.cat([d[k].double().flatten() for k in keys])
    m = sorted(k for k in o_o if k.endswith(".exp_avg"))
    v = sorted(k for k in o_o if k.endswith(".exp_avg_sq"))
    vo, vr = cat(o_o, v), cat(r_o, v)
    return {"err_w": rel(cat(r_m, sorted(o_m)), cat(o_m, sorted(o_m))),
            "err_m": rel(cat(r_o, m), cat(o_o, m)),
            "err_v": rel(vr, vo),
            "v_zeroed": float(((vr == 0) & (vo > 0)).sum() / max(1, int((vo > 0).sum())))}


def ulp_jitter(t, gen):
    """Every nonzero finite element one ulp up or down in magnitude, at random
    (bf16 is sign-magnitude, so +-1 on the int16 pattern is +-1 ulp)."""
    bits = t.contiguous().view(torch.int16).clone()
    step = torch.randint(0, 2, t.shape, generator=gen, dtype=torch.int16) * 2 - 1
    ok = (t != 0) & torch.isfinite(t.float())
    bits[ok] += step[ok]
    return bits.view(torch.bfloat16)


def write_damaged(src, dst, how, seed=0):
    os.makedirs(dst, exist_ok=True)
    shutil.copy(f"{src}/meta.json", dst)
    gen = torch.Generator().manual_seed(seed)
    for f in ("model.safetensors", "optimizer.safetensors"):
        t = load_file(f"{src}/{f}")
        if how == "bf16":
            t = {k: v.to(torch.bfloat16).to(v.dtype) for k, v in t.items()}
        elif how == "ulp":
            t = {k: ulp_jitter(v, gen) for k, v in sorted(t.items())}
        save_file(t, f"{dst}/{f}")


def write_hybrid(orig, lossy, dst, lossy_roles):
    """Original checkpoint with only the roles in lossy_roles ('W', 'm', 'v')
    taken from the lossy checkout."""
    os.makedirs(dst, exist_ok=True)
    shutil.copy(f"{orig}/meta.json", dst)
    src = lambda role: lossy if role in lossy_roles else orig
    save_file(load_file(f"{src('W')}/model.safetensors"), f"{dst}/model.safetensors")
    om, lm = load_file(f"{src('m')}/optimizer.safetensors"), load_file(f"{src('v')}/optimizer.safetensors")
    opt = {k: (om[k] if k.endswith(".exp_avg") else lm[k]) for k in om}
    save_file(opt, f"{dst}/optimizer.safetensors")


def zstd3(b):
    if zstandard is not None:
        return len(zstandard.ZstdCompressor(level=3).compress(b))
    return len(subprocess.run(["zstd", "-3", "-c", "-q"], input=b, capture_output=True, check=True).stdout)


def bf16_zstd_ratio(path):
    """Raw checkpoint bytes over zstd -3 of it rounded to bf16 (lossless
    zstd -3 when the run is already bf16), per tensor as resume_quality.py."""
    raw, packed = 0, 0
    for f in ("model.safetensors", "optimizer.safetensors"):
        for v in load_file(f"{path}/{f}").values():
            raw += v.numel() * v.element_size()
            packed += zstd3(v.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return raw / packed


# ---------------------------------------------------------------- one regime

def layout(cfg):
    """A regime's checkpoint steps, its two resume points and its learning-rate
    schedule (what bench/m_units.py and bench/rate_drift.py reuse too)."""
    every, total = cfg["every"], cfg["steps"]
    steps = list(range(every, total + 1, every))
    points = cfg.get("points") or [steps[len(steps) // 2 - 1], steps[-2]]
    return steps, points, (cfg["lr"], cfg["warmup"], total + cfg["resume"])


def ckpt_dir(work, name, step):
    """Where `--work WORK` keeps regime `name`'s checkpoint of `step`."""
    return f"{work}/{name}/ckpt/step-{step:06d}"


def resumed(path, p, cfg, text, sched, seed):
    """The model after resuming the regime's run from checkpoint `path` (at
    step p) for the regime's resume steps."""
    model, opt = load(path, p, cfg)
    train_steps(model, opt, text, seed, p + 1, p + cfg["resume"], sched, cfg)
    return model


def run_regime(name, cfg, texts, args):
    t_start, c_start = time.time(), cpu_seconds()
    work = os.path.join(args.work, name)
    text, held = texts[cfg["text"]]
    every, total, R = cfg["every"], cfg["steps"], cfg["resume"]
    steps, points, sched = layout(cfg)
    ckpt = lambda s: ckpt_dir(args.work, name, s)
    seed = args.seed
    torch.manual_seed(seed)
    n_params = sum(p.numel() for p in new_model(cfg).parameters())
    print(f"\n=== regime {name}: {cfg['what']} ({n_params:,} parameters, {len(steps)} checkpoints, "
          f"points {points}, resume {R})", flush=True)

    if not os.path.exists(f"{ckpt(steps[-1])}/meta.json"):
        t0 = time.time()
        model = new_model(cfg)
        if "pretrain" in cfg:
            pt = cfg["pretrain"]
            popt = new_optimizer(model, pt["lr"])
            ptext, _ = texts["A"]
            loss = train_steps(model, popt, ptext, seed + 100, 1, pt["steps"], (pt["lr"], pt["warmup"], pt["steps"]), cfg)
            print(f"  pretrained {pt['steps']} steps on text A: loss {loss:.4f} ({time.time() - t0:.0f} s)", flush=True)
            del popt  # fine-tuning starts a fresh AdamW from the pretrained weights
        opt = new_optimizer(model, cfg["lr"])
        for s in steps:
            loss = train_steps(model, opt, text, seed, s - every + 1, s, sched, cfg)
            save(model, opt, s, loss, ckpt(s))
        print(f"  trained {total} steps: loss {loss:.4f} ({time.time() - t0:.0f} s)", flush=True)
    if args.train_only:
        return {"what": cfg["what"], "parameters": n_params, "checkpoints": len(steps), "trained_only": True}

    def resume(path, p):
        model = resumed(path, p, cfg, text, sched, seed)
        return flat_weights(model), held_out_loss(model, held, seed, cfg)

    res = {"what": cfg["what"], "parameters": n_params, "checkpoints": len(steps), "every": every,
           "points": points, "resume_steps": R, "config": {k: v for k, v in cfg.items() if k != "what"},
           "variants": {}}
    t0 = time.time()
    reference = {p: resume(ckpt(p), p) for p in points}
    res["reference_loss"] = {str(p): reference[p][1] for p in points}
    res["seconds_per_resume_step"] = (time.time() - t0) / (len(points) * R)
    # Resuming twice from the same checkpoint must give the same weights, or drift means nothing.
    res["resume_repeat_drift"] = rel(resume(ckpt(points[0]), points[0])[0], reference[points[0]][0])
    print(f"  repeat of the reference resume: drift {res['resume_repeat_drift']:.3g}", flush=True)

    def evaluate(vname, dirs, extra):
        e = dict(extra)
        for p in points:
            w, loss = resume(dirs[p], p)
            e[f"drift@{p}"] = rel(w, reference[p][0])
            e[f"loss@{p}"] = loss
            e.update({f"{k}@{p}": v for k, v in checkout_errors(ckpt(p), dirs[p]).items()})
        e["drift"] = float(np.mean([e[f"drift@{p}"] for p in points]))
        res["variants"][vname] = e
        print(f"  {vname}: " + ", ".join(f"{k} {v:.4g}" for k, v in e.items()
                                          if isinstance(v, float) and (k.startswith(("drift", "err", "ratio", "upd")))),
              flush=True)

    how = "ulp" if cfg["dtype"] == "bf16" else "bf16"
    yard = "damage: ±1 ulp of W, m, v (ratio: zstd -3)" if how == "ulp" else "damage: bf16 (ratio: bf16 + zstd -3)"
    dirs = {}
    for p in points:
        dirs[p] = f"{work}/damage-{how}/step-{p}"
        write_damaged(ckpt(p), dirs[p], how, seed=p)
    ratio = bf16_zstd_ratio(ckpt(points[-1]))
    evaluate(yard, dirs, {"ratio_residual": ratio, "ratio_total": ratio, "yardstick": True})

    for pol in POLICIES:
        store = f"{work}/store-{pol}"
        speed = commit_series(store, pol, [(s, ckpt(s)) for s in steps])
        dirs = {}
        for p in points:
            dirs[p] = f"{store}-out/step-{p}"
            shutil.rmtree(dirs[p], ignore_errors=True)
            run_ckptvc("--repo", store, "--quiet", "checkout", str(p), "--output", dirs[p])
        evaluate(pol, dirs, {**size_metrics(store), **update_errors(store, points),
                             "commit_mb_per_s": speed / 1e6})

    # Diagnostic: which of faithful's errors (W, m, v) carries into the resumed weights.
    for roles in ("W", "m", "v"):
        dirs = {}
        for p in points:
            dirs[p] = f"{work}/hybrid-{roles}/step-{p}"
            write_hybrid(ckpt(p), f"{work}/store-faithful-out/step-{p}", dirs[p], roles)
        evaluate(f"faithful, only {roles} lossy", dirs, {"diagnostic": True})

    res["marks"] = marks(res)
    res["seconds"] = time.time() - t_start
    res["cpu_seconds"] = cpu_seconds() - c_start
    return res


def marks(res):
    v, pts = res["variants"], res["points"]
    yard = next(e for e in v.values() if e.get("yardstick"))
    ex = v["excp"]
    out = {}

    def mark(name, ratio_need, ratio_ok, drift_conds):
        drift_ok = all(c for c, _ in drift_conds)
        out[name] = {"pass": ratio_ok and drift_ok, "ratio_ok": ratio_ok, "drift_ok": drift_ok,
                     "ratio": v[name.split(":")[0]]["ratio_residual"], "ratio_needed": ratio_need, "drift_detail": [d for _, d in drift_conds]}

    f = v["faithful"]
    mark("faithful: drift ≤ 2× yardstick, ratio ≥ 10", 10.0, f["ratio_residual"] >= 10,
         [(f[f"drift@{p}"] <= 2 * yard[f"drift@{p}"],
           f"@{p}: {f[f'drift@{p}']:.3g} vs ≤ {2 * yard[f'drift@{p}']:.3g} ({f[f'drift@{p}'] / yard[f'drift@{p}']:.1f}× yardstick)")
          for p in pts])
    b = v["balanced"]
    mark("balanced: ratio ≥ excp, drift ≤ excp/10", ex["ratio_residual"], b["ratio_residual"] >= ex["ratio_residual"],
         [(b[f"drift@{p}"] <= ex[f"drift@{p}"] / 10,
           f"@{p}: {b[f'drift@{p}']:.3g} vs ≤ {ex[f'drift@{p}'] / 10:.3g} (excp/{ex[f'drift@{p}'] / b[f'drift@{p}']:.1f})")
          for p in pts])
    c = v["compact"]
    mark("compact: drift ≤ excp, ratio ≥ 2× excp", 2 * ex["ratio_residual"], c["ratio_residual"] >= 2 * ex["ratio_residual"],
         [(c[f"drift@{p}"] <= ex[f"drift@{p}"],
           f"@{p}: {c[f'drift@{p}']:.3g} vs ≤ {ex[f'drift@{p}']:.3g}") for p in pts])
    return out


# ---------------------------------------------------------------- report

def report(name, res):
    pts = res["points"]
    print(f"\n### {name}: {res['what']}\n")
    print(f"{res['parameters']:,} parameters, {res['checkpoints']} checkpoints every {res['every']} steps, "
          f"resumed {res['resume_steps']} steps from steps {pts[0]} and {pts[1]}; "
          f"reference held-out loss " + ", ".join(f"{res['reference_loss'][str(p)]:.4f}" for p in pts)
          + f"; repeat-resume drift {res['resume_repeat_drift']:.2g}; {res['seconds']:.0f} s wall, {res['cpu_seconds']:.0f} s CPU\n")
    head = ("| variant | ratio/residual | total ratio | bits W | bits m | bits v | "
            + " | ".join(f"err W@{p} | err m@{p} | err v@{p}" for p in pts)
            + f" | v zeroed@{pts[-1]} | " + " | ".join(f"drift@{p}" for p in pts) + " | drift/yardstick |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    yard = next(e for e in res["variants"].values() if e.get("yardstick"))
    for vname, e in res["variants"].items():
        g = lambda k, fmt="{:.3g}": fmt.format(e[k]) if k in e else "—"
        label = f"**{vname}**" if vname in POLICIES else vname
        print(f"| {label} | {g('ratio_residual', '{:.1f}')} | {g('ratio_total', '{:.1f}')} | {g('bits_W', '{:.2f}')} "
              f"| {g('bits_m', '{:.2f}')} | {g('bits_v', '{:.2f}')} | "
              + " | ".join(f"{g(f'err_w@{p}')} | {g(f'err_m@{p}')} | {g(f'err_v@{p}')}" for p in pts)
              + f" | {g(f'v_zeroed@{pts[-1]}', '{:.3f}')} | " + " | ".join(g(f"drift@{p}") for p in pts)
              + " | " + " / ".join(f"{e[f'drift@{p}'] / yard[f'drift@{p}']:.1f}" for p in pts) + " |")
    print()
    for mname, m in res["marks"].items():
        print(f"- {'PASS' if m['pass'] else 'FAIL'} {mname} — ratio {m['ratio']:.1f} "
              f"{'ok' if m['ratio_ok'] else 'FAIL'} (need ≥ {m['ratio_needed']:.1f}); "
              f"drift {'ok' if m['drift_ok'] else 'FAIL'}: " + "; ".join(m["drift_detail"]))


def main():
    global BIN
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--regimes", default=",".join(REGIMES))
    ap.add_argument("--quick", action="store_true", help="tiny models and runs: a smoke test, not a measurement")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--train-only", action="store_true", help="make (or keep) the runs' checkpoints, measure nothing")
    ap.add_argument("--bin", help="ckptvc binary to copy (default: $CARGO_TARGET_DIR or ~/.cache/ckptvc-target, release)")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    # A private copy, so that a rebuild during the run cannot mix two versions.
    src = args.bin or os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/ckptvc-target")),
                                   "release", "ckptvc")
    BIN = os.path.join(args.work, "bin", "ckptvc")
    os.makedirs(os.path.dirname(BIN), exist_ok=True)
    shutil.copy2(src, BIN)
    version = run_ckptvc("--version").strip()

    texts, sources = load_texts()
    t0 = time.time()
    out_path = os.path.join(args.work, "results.json")
    results = {"ckptvc": version, "threads": torch.get_num_threads(), "quick": args.quick,
               "text": sources, "regimes": {}}
    for name in args.regimes.split(","):
        cfg = dict(REGIMES[name])
        if args.quick:
            pre = cfg.get("pretrain")
            cfg.update(d=QUICK["d"], heads=QUICK["heads"], layers=QUICK["layers"], resume=QUICK["resume"],
                       steps=cfg["every"] * QUICK["steps_ckpts"], warmup=min(cfg["warmup"], cfg["every"]))
            cfg.pop("points", None)
            if pre:
                cfg["pretrain"] = dict(pre, steps=QUICK["pretrain_steps"])
        results["regimes"][name] = run_regime(name, cfg, texts, args)
        results["seconds"] = time.time() - t0
        results["cpu_seconds"] = cpu_seconds()
        with open(out_path, "w") as f:
            json.dump(results, f, indent=2)
    print(f"\n## Results ({version}, {torch.get_num_threads()} threads, text A: {sources['A']}, B: {sources['B']})")
    for name, res in results["regimes"].items():
        if not res.get("trained_only"):
            report(name, res)
    print(f"\ntotal {results['seconds']:.0f} s wall, {results['cpu_seconds']:.0f} s CPU; raw numbers in {out_path}")


if __name__ == "__main__":
    main()
