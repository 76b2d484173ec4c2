#!/usr/bin/env python3
"""What coding Adam's m in units of its update buys (issue 17): m alone damaged.

For each resume point of a regime of bench/resume_regimes.py (its
checkpoints, made by `resume_regimes.py --train-only`), m is quantized
against the previous checkpoint's m (open loop) in two ways:
  uniform  step k * RMS(m), the same for every element (the tuned presets);
  scaled   step k * RMS(u) * (sqrt(v_parent) + 1e-8), u = m / (sqrt(v_parent) + 1e-8):
           every element's update m/sqrt(v) gets the same precision (the
           guided presets scale by the commit's own reconstructed v).
Each variant is written with the original W and v, resumed, and its drift
(relative L2 of the resumed weights against resuming from the original)
printed with the order-0 entropy of its symbols (bits per element of m), so
the two can be compared at equal bits.

Usage: python3 bench/m_units.py REGIME [--work DIR]  (default DIR ~/.cache/ckptvc-bench/r17)
"""

import argparse
import os
import shutil
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import resume_regimes as R  # noqa: E402

EPS = 1e-8


def entropy_bits(q):
    _, counts = np.unique(q, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum()) * len(q)


def code(m, pm, pv, mode, k):
    """(reconstruction, bits) of m coded as a residual against pm."""
    if mode == "uniform":
        scale = np.full_like(m, k * np.sqrt((m.astype(np.float64) ** 2).mean()))
    else:
        u = m / (np.sqrt(pv) + EPS)
        scale = k * np.sqrt((u.astype(np.float64) ** 2).mean()) * (np.sqrt(pv) + EPS)
    q = np.round((m - pm) / scale)
    return pm + q * scale, entropy_bits(q)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("regime", choices=list(R.REGIMES))
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/ckptvc-bench/r17"))
    args = ap.parse_args()
    cfg = dict(R.REGIMES[args.regime])
    texts, _ = R.load_texts()
    text, _ = texts[cfg["text"]]
    every = cfg["every"]
    _, points, sched = R.layout(cfg)
    ckpt = lambda s: R.ckpt_dir(args.work, args.regime, s)
    resume = lambda path, p: R.flat_weights(R.resumed(path, p, cfg, text, sched, 1))

    for p in points:
        reference = resume(ckpt(p), p)
        opt = load_file(f"{ckpt(p)}/optimizer.safetensors")
        parent = load_file(f"{ckpt(p - every)}/optimizer.safetensors")
        for mode, ks in (("uniform", [1.0, 0.5]), ("scaled", [1.0, 2.0, 3.0])):
            for k in ks:
                damaged, bits, n = {}, 0.0, 0
                for name, t in opt.items():
                    if not name.endswith(".exp_avg"):
                        damaged[name] = t
                        continue
                    m, pm = t.float().numpy().ravel(), parent[name].float().numpy().ravel()
                    pv = parent[name + "_sq"].float().numpy().ravel()
                    recon, b = code(m, pm, pv, mode, k)
                    damaged[name] = torch.from_numpy(recon.reshape(t.shape).astype(np.float32)).to(t.dtype)
                    bits, n = bits + b, n + m.size
                out = f"{args.work}/m_units-{args.regime}-{mode}-{k}-{p}"
                os.makedirs(out, exist_ok=True)
                shutil.copy(f"{ckpt(p)}/meta.json", out)
                shutil.copy(f"{ckpt(p)}/model.safetensors", out)
                save_file(damaged, f"{out}/optimizer.safetensors")
                drift = R.rel(resume(out, p), reference)
                print(f"{args.regime} @{p} {mode:8s} k={k}: {bits / n:.2f} bits/element of m, drift {drift:.3e}",
                      flush=True)
                shutil.rmtree(out)


if __name__ == "__main__":
    main()
