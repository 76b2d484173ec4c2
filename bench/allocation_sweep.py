#!/usr/bin/env python3
"""How drift depends on how a commit's bits are shared among W, m and v (issue 17).

For one regime of bench/resume_regimes.py (its checkpoints made first), commits
the run once per variant — each a list of `ckptvc commit` flags, e.g. custom
steps for W, m and v — checks out the two resume points, resumes training
from each, and prints the ratio per residual commit, the bits per element of
W, m and v, and per point the drift and each role's relative error: the
same measurements as the benchmark, for knobs it does not sweep.

Usage:
  python3 bench/allocation_sweep.py --work ~/.cache/ckptvc-bench/r17 --regime finetune \\
      --variant 'm1.6 v1.6=--w-step 0.008 --w-update-step 1 --m-step 1.6 --v-log-step 1.6' ...
Needs torch and safetensors, and the release binary (--bin or
$CARGO_TARGET_DIR/release/ckptvc). Not run by CI.
"""

import argparse
import os
import shlex
import shutil

import resume_regimes as R


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--regime", required=True, choices=sorted(R.REGIMES))
    ap.add_argument("--variant", action="append", required=True, help="LABEL=FLAGS (ckptvc commit flags)")
    ap.add_argument("--bin")
    args = ap.parse_args()
    R.BIN = args.bin or os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/ckptvc-target")), "release", "ckptvc")
    texts, _ = R.load_texts()
    cfg = dict(R.REGIMES[args.regime])
    text, _ = texts[cfg["text"]]
    steps, points, sched = R.layout(cfg)
    ckpt = lambda s: R.ckpt_dir(args.work, args.regime, s)  # noqa: E731
    resume = lambda path, p: R.flat_weights(R.resumed(path, p, cfg, text, sched, 1))  # noqa: E731
    reference = {p: resume(ckpt(p), p) for p in points}
    store = os.path.join(args.work, args.regime, "sweep-store")
    for spec in args.variant:
        label, _, flags = spec.partition("=")
        shutil.rmtree(store, ignore_errors=True)
        R.run_ckptvc("--repo", store, "init", "--quiet")
        for s in steps:
            R.run_ckptvc("--repo", store, "--quiet", "commit", ckpt(s), "--step", str(s), *shlex.split(flags))
        m = R.size_metrics(store)
        out = [f"{label}: ratio {m['ratio_residual']:.2f} bits W/m/v "
               f"{m['bits_W']:.2f}/{m['bits_m']:.2f}/{m['bits_v']:.2f}"]
        for p in points:
            d = f"{store}-out/step-{p}"
            shutil.rmtree(d, ignore_errors=True)
            R.run_ckptvc("--repo", store, "--quiet", "checkout", str(p), "--output", d)
            e = R.checkout_errors(ckpt(p), d)
            out.append(f"@{p} drift {R.rel(resume(d, p), reference[p]):.3e} "
                       f"errW {e['err_w']:.2e} m {e['err_m']:.2f} v {e['err_v']:.2f}")
        print(" | ".join(out), flush=True)


if __name__ == "__main__":
    main()
