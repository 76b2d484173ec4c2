#!/usr/bin/env python3
"""How much of W's change between checkpoints Adam's moments predict (issue 17).

For each pair of consecutive checkpoints of a regime made by
bench/resume_regimes.py (parent p, child c), fits per tensor, by least
squares, W_c - W_p against

  u      = m_c / (sqrt(v_c) + 1e-8)   (the child's update direction)
  u, u_p                              (and the parent's)
  u, u_p, W_p                         (and weight decay)

and prints the share of sum (W_c - W_p)^2 each explains, over all tensors
with Adam state. These are the true moments, not the coded ones: an upper
bound on what the `Predictive` presets' domain-5 prediction can remove (it
fits per 2^20-element chunk, on the reconstructed m and v).

Usage: python3 bench/explain_w.py --work ~/.cache/ckptvc-bench/r17 [--regimes finetune,warmup,long,bf16]
Needs torch and safetensors. Not run by CI.
"""

import argparse
import glob
import os

import torch
from safetensors.torch import load_file

FEATURES = {"u": ["u"], "u+u_parent": ["u", "up"], "u+u_parent+decay": ["u", "up", "w"]}


def load(step_dir):
    model = load_file(os.path.join(step_dir, "model.safetensors"))
    optim = load_file(os.path.join(step_dir, "optimizer.safetensors"))
    return model, optim


def update(optim, name):
    m = optim[name + ".exp_avg"].double().flatten()
    v = optim[name + ".exp_avg_sq"].double().flatten()
    return m / (v.clamp(min=0).sqrt() + 1e-8)


def explained(regime_dir):
    dirs = sorted(glob.glob(os.path.join(regime_dir, "ckpt", "step-*")))
    residual = {k: 0.0 for k in FEATURES}
    total = 0.0
    for parent, child in zip(dirs, dirs[1:]):
        (wp, op), (wc, oc) = load(parent), load(child)
        for name in wc:
            if name + ".exp_avg" not in oc or name + ".exp_avg" not in op:
                continue
            d = (wc[name].double() - wp[name].double()).flatten()
            cols = {"u": update(oc, name), "up": update(op, name), "w": wp[name].double().flatten()}
            total += float(d @ d)
            for key, names in FEATURES.items():
                a = torch.stack([cols[n] for n in names], 1)
                coef = torch.linalg.lstsq(a, d.unsqueeze(1)).solution
                r = d - (a @ coef).squeeze(1)
                residual[key] += float(r @ r)
    return {k: 1 - r / total for k, r in residual.items()}, len(dirs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--regimes", default="finetune,warmup,long,bf16")
    args = ap.parse_args()
    print("| regime | checkpoints | " + " | ".join(FEATURES) + " |")
    print("|---|---|" + "---|" * len(FEATURES))
    for regime in args.regimes.split(","):
        shares, n = explained(os.path.join(args.work, regime))
        cells = " | ".join(f"{100 * shares[k]:.0f}%" for k in FEATURES)
        print(f"| {regime} | {n} | {cells} |")


if __name__ == "__main__":
    main()
