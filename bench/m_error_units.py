#!/usr/bin/env python3
"""Adam's m error of a checkout, in m's own units and in units of the update.

`ckptvc show` reports m's relative error in m's units: ‖m̂ − m‖ / ‖m‖. The
guided presets size m's step and choose between coding m as a residual or
as a value in units of the update, u = m / (√v + ε), which is what the
resumed weights see. This prints both for every m tensor of a checkpoint and
its checkout (safetensors optimizer files as bench/resume_regimes.py writes
them: `<param>.exp_avg`, `<param>.exp_avg_sq`), and over all m tensors.

Usage: python3 bench/m_error_units.py ORIGINAL_DIR CHECKOUT_DIR [--top K]
"""

import argparse
import os

import numpy as np
from safetensors.numpy import load_file

EPS = 1e-8


def sums(m, m_hat, v):
    """(Σ err², Σ m², Σ err_u², Σ u²) over the finite elements."""
    m, m_hat, v = (x.astype(np.float64) for x in (m, m_hat, v))
    scale = np.sqrt(np.maximum(v, 0.0)) + EPS
    ok = np.isfinite(m) & np.isfinite(m_hat) & np.isfinite(scale)
    err, m, scale = (m_hat - m)[ok], m[ok], scale[ok]
    return np.array([(err ** 2).sum(), (m ** 2).sum(), ((err / scale) ** 2).sum(), ((m / scale) ** 2).sum()])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("original")
    ap.add_argument("checkout")
    ap.add_argument("--top", type=int, default=5)
    args = ap.parse_args()
    name = "optimizer.safetensors"
    orig = load_file(os.path.join(args.original, name))
    out = load_file(os.path.join(args.checkout, name))
    rel = lambda s: (np.sqrt(s[0] / s[1]), np.sqrt(s[2] / s[3]))
    total, rows = np.zeros(4), []
    for key in sorted(k for k in orig if k.endswith(".exp_avg")):
        s = sums(orig[key], out[key], orig[key + "_sq"])
        total += s
        rows.append((key, s[1], *rel(s)))
    rows.sort(key=lambda r: -r[2])
    print(f"{'m tensor':48} {'share of ‖m‖²':>14} {'in m units':>11} {'in update units':>16}")
    for key, norm, m_units, u_units in rows[: args.top]:
        print(f"{key:48} {norm / total[1]:14.4f} {m_units:11.3f} {u_units:16.3f}")
    m_units, u_units = rel(total)
    print(f"{'all m tensors':48} {1.0:14.4f} {m_units:11.3f} {u_units:16.3f}")


if __name__ == "__main__":
    main()
