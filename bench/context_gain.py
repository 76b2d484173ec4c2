#!/usr/bin/env python3
"""What context-modelled entropy coding could save (issue 17), before building it.

ckptvc codes each quantized chunk's symbols with one rANS table per stream.
Context modelling would pick the table per element from something the
decoder already has. This script measures the most it could save: the
empirical entropy H(symbols) per element against the conditional entropy
H(symbols | context), per tensor, summed over a regime's checkpoints made by
bench/resume_regimes.py. Real tables cost bytes per context, so the true
saving is smaller than this bound.

Symbols are those of `faithful` (fp32 steps), from the true parent
(no closed loop):
  W  residual W - W_p - prediction (least squares on u, u_p, W_p, per
     tensor), step min(0.008 RMS(W), RMS(W - W_p));
  m  m / (sqrt(v) + eps), step 0.8 of its RMS;
  v  ln(v / v_p), step 0.3.
Contexts (each binned on a log2 scale):
  pred   |prediction| / step (W only)
  u_p    |m_p / (sqrt(v_p) + eps)| relative to its mean (the parent's update)
  sqrtv  sqrt(v) relative to its RMS (for v: the parent's)
  both   sqrtv and pred (W) or sqrtv and u_p (m, v)

Usage: python3 bench/context_gain.py --work ~/.cache/ckptvc-bench/r17 [--regimes finetune,warmup,long]
Needs torch, numpy and safetensors. Not run by CI.
"""

import argparse
import glob
import os

import numpy as np
from safetensors.torch import load_file

EPS = 1e-8


def entropy(symbols):
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def conditional_entropy(symbols, context):
    total = 0.0
    for k in np.unique(context):
        mask = context == k
        total += mask.sum() * entropy(symbols[mask])
    return total / len(symbols)


def log_bin(x, lo, hi):
    return np.clip(np.floor(np.log2(np.abs(x) + 1e-30)), lo, hi)


def tensors(step_dir):
    model = load_file(os.path.join(step_dir, "model.safetensors"))
    optim = load_file(os.path.join(step_dir, "optimizer.safetensors"))
    flat = lambda t: t.double().flatten().numpy()  # noqa: E731
    for name, w in model.items():
        if name + ".exp_avg" in optim and w.numel() >= 4096:
            yield name, flat(w), flat(optim[name + ".exp_avg"]), flat(optim[name + ".exp_avg_sq"])


def streams(parent, child):
    """(role, symbols, contexts) of each tensor of a checkpoint pair."""
    parents = {name: (w, m, v) for name, w, m, v in tensors(parent)}
    for name, w, m, v in tensors(child):
        wp, mp, vp = parents[name]
        u = m / (np.sqrt(np.maximum(v, 0)) + EPS)
        up = mp / (np.sqrt(np.maximum(vp, 0)) + EPS)
        d = w - wp
        a = np.stack([u, up, wp], 1)
        pred = a @ np.linalg.lstsq(a, d, rcond=None)[0]
        step = min(0.008 * np.sqrt((w * w).mean()), np.sqrt((d * d).mean()))
        sqrtv = log_bin(np.sqrt(np.maximum(v, 0)) / np.sqrt(v.mean() + 1e-30), -6, 3)
        sqrtvp = log_bin(np.sqrt(np.maximum(vp, 0)) / np.sqrt(vp.mean() + 1e-30), -6, 3)
        u_p = log_bin(up / (np.abs(up).mean() + 1e-30), -6, 3)
        pred_bin = log_bin(pred / step, -4, 4)
        w_sym = np.round((d - pred) / step)
        yield "W", w_sym, {"pred": pred_bin, "u_p": u_p, "sqrtv": sqrtv, "both": sqrtv * 16 + pred_bin}
        m_sym = np.round(u / (0.8 * np.sqrt((u * u).mean()) + 1e-30))
        yield "m", m_sym, {"u_p": u_p, "sqrtv": sqrtv, "both": sqrtv * 16 + u_p}
        ok = (v > 0) & (vp > 0)
        v_sym = np.where(ok, np.round(np.log(np.where(ok, v, 1) / np.where(ok, vp, 1)) / 0.3), 999)
        yield "v", v_sym, {"u_p": u_p, "sqrtv": sqrtvp, "both": sqrtvp * 16 + u_p}


def regime_gain(regime_dir):
    dirs = sorted(glob.glob(os.path.join(regime_dir, "ckpt", "step-*")))
    sums = {}
    for parent, child in zip(dirs, dirs[1:]):
        for role, symbols, contexts in streams(parent, child):
            s = sums.setdefault(role, {"n": 0, "H": 0.0})
            n = len(symbols)
            s["n"] += n
            s["H"] += n * entropy(symbols)
            for key, ctx in contexts.items():
                s[key] = s.get(key, 0.0) + n * conditional_entropy(symbols, ctx)
    return {role: {k: v / s["n"] for k, v in s.items() if k != "n"} for role, s in sums.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--regimes", default="finetune,warmup,long")
    args = ap.parse_args()
    print("| regime | stream | H (bits/element) | pred | u_p | sqrtv | both | best saving |")
    print("|---|---|---|---|---|---|---|---|")
    for regime in args.regimes.split(","):
        for role, h in regime_gain(os.path.join(args.work, regime)).items():
            cells = " | ".join(f"{h[k]:.3f}" if k in h else "–" for k in ["pred", "u_p", "sqrtv", "both"])
            best = min(v for k, v in h.items() if k != "H")
            print(f"| {regime} | {role} | {h['H']:.3f} | {cells} | {100 * (1 - best / h['H']):.1f}% |")


if __name__ == "__main__":
    main()
