#!/usr/bin/env python3
"""What a change of coding buys, per regime and policy, and proof it changed nothing else.

Commits each regime's checkpoints (made by bench/resume_regimes.py) once per
ckptvc binary and policy, and prints the ratio per residual commit with the
bits per element of W, m and v for each binary, then whether the checkouts
of the two resume points are byte-identical across the binaries. A change
that only codes the same symbols differently (context splitting) must leave
them identical: then every drift measured with one binary holds for the
other, and only the sizes need measuring again.

Usage:
  python3 bench/context_sizes.py --work ~/.cache/ckptvc-bench/r17 \\
      --bin /tmp/ckptvc-before --bin target/release/ckptvc \\
      [--regimes finetune,warmup,long,bf16] [--policies compact,balanced,faithful,excp]
Needs torch and safetensors. Not run by CI.
"""

import argparse
import hashlib
import os
import shutil
import tempfile

import resume_regimes as R


def digest(directory):
    h = hashlib.blake2b()
    for root, _, files in sorted(os.walk(directory)):
        for name in sorted(files):
            h.update(name.encode())
            with open(os.path.join(root, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def measure(binary, work, name, policy, scratch):
    R.BIN = binary
    steps, points, _ = R.layout(dict(R.REGIMES[name]))
    store = os.path.join(scratch, "store")
    shutil.rmtree(store, ignore_errors=True)
    R.run_ckptvc("--repo", store, "init", "--quiet")
    for s in steps:
        R.run_ckptvc("--repo", store, "--quiet", "commit", R.ckpt_dir(work, name, s), "--step", str(s),
                     "--policy", policy)
    m = R.size_metrics(store)
    digests = []
    for p in points:
        out = os.path.join(scratch, f"out-{p}")
        shutil.rmtree(out, ignore_errors=True)
        R.run_ckptvc("--repo", store, "--quiet", "checkout", str(p), "--output", out)
        digests.append(digest(out))
    return f"{m['ratio_residual']:.2f} ({m['bits_W']:.3f}/{m['bits_m']:.3f}/{m['bits_v']:.3f})", tuple(digests)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--bin", action="append", required=True, help="a ckptvc binary (give two or more)")
    ap.add_argument("--regimes", default="finetune,warmup,long,bf16")
    ap.add_argument("--policies", default="compact,balanced,faithful,excp")
    args = ap.parse_args()
    print("regime policy | ratio (bits W/m/v) per binary | checkouts")
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.regimes.split(","):
            for policy in args.policies.split(","):
                rows = [measure(b, args.work, name, policy, scratch) for b in args.bin]
                same = len({d for _, d in rows}) == 1
                print(name, policy, " | ".join(r for r, _ in rows), "|",
                      "same checkouts" if same else f"CHECKOUTS DIFFER {[d for _, d in rows]}", flush=True)


if __name__ == "__main__":
    main()
