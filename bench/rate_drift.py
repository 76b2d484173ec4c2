#!/usr/bin/env python3
"""Rate–drift curves per regime (issue 17): ExCP with α and β swept, ckptvc
with its step knobs swept, and the bf16 yardstick, on the runs of
bench/resume_regimes.py (make them first with `resume_regimes.py --work DIR
--train-only`). Each variant: the run committed to a fresh store, two points
checked out and resumed as resume_regimes.py does; its drift is the worse of
the two points, its ratio the mean per residual commit.

Writes DIR/rate_drift.json and DIR/rate_drift-<regime>.png, and prints per
regime the frontier factor: for each ExCP point, ckptvc's ratio at the same
drift (interpolated in log–log along ckptvc's curve) over ExCP's ratio, or
a lower bound where ExCP drifts more than ckptvc's coarsest point.

Usage: python3 bench/rate_drift.py --work DIR [--regimes bf16,long,finetune,warmup]
(regimes already in DIR/rate_drift.json and not named are kept)
"""

import argparse
import json
import math
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import resume_regimes as R  # noqa: E402

EXCP = [("excp α=1e-5", ["--alpha", "1e-5"]), ("excp α=5e-5", ["--alpha", "5e-5"]),
        ("excp α=2e-4", ["--alpha", "2e-4"]), ("excp α=1e-3", ["--alpha", "1e-3"]),
        ("excp β=1", ["--alpha", "5e-5", "--beta", "1"]), ("excp β=4", ["--alpha", "5e-5", "--beta", "4"])]


def ours():
    """The three presets and points between and beyond them: faithful's
    steps scaled by k (the change bound capped at 4, below √24). The
    coarsest (×32 to ×128) carry ckptvc's curve out towards ExCP's drift:
    where it gets there, the frontier factor is read off the curve; where
    ExCP drifts more still, the coarsest point's ratio bounds it."""
    out = [("faithful", ["--policy", "faithful"]), ("balanced", ["--policy", "balanced"]),
           ("compact", ["--policy", "compact"])]
    for k in (0.5, 4.0, 16.0, 32.0, 64.0, 128.0):
        out.append((f"faithful steps ×{k:g}", ["--policy", "faithful", "--w-step", f"{0.008 * k:g}",
                                               "--w-update-step", f"{min(4.0, k):g}",
                                               "--m-step", f"{0.8 * k:g}", "--v-log-step", f"{0.3 * k:g}"]))
    return out


def run(name, cfg, texts, work):
    text, _ = texts[cfg["text"]]
    steps, points, sched = R.layout(cfg)
    ckpt = lambda s: R.ckpt_dir(work, name, s)
    resume = lambda path, p: R.flat_weights(R.resumed(path, p, cfg, text, sched, 1))

    reference = {p: resume(ckpt(p), p) for p in points}
    rows = []

    def drift_of(dirs):
        return max(R.rel(resume(dirs[p], p), reference[p]) for p in points)

    how = "ulp" if cfg["dtype"] == "bf16" else "bf16"
    dirs = {p: f"{work}/{name}/rd-damage/step-{p}" for p in points}
    for p in points:
        R.write_damaged(ckpt(p), dirs[p], how, seed=p)
    rows.append({"variant": "bf16 rounding" if how == "bf16" else "±1 ulp", "family": "yardstick",
                 "ratio": R.bf16_zstd_ratio(ckpt(points[-1])), "drift": drift_of(dirs)})
    for family, variants in (("excp", [(n, ["--policy", "excp", *a]) for n, a in EXCP]), ("ckptvc", ours())):
        for vname, args in variants:
            store = f"{work}/{name}/rd-store"
            shutil.rmtree(store, ignore_errors=True)
            R.run_ckptvc("--repo", store, "init", "--quiet")
            for s in steps:
                R.run_ckptvc("--repo", store, "--quiet", "commit", ckpt(s), "--step", str(s), *args)
            dirs = {}
            for p in points:
                dirs[p] = f"{store}-out/step-{p}"
                shutil.rmtree(dirs[p], ignore_errors=True)
                R.run_ckptvc("--repo", store, "--quiet", "checkout", str(p), "--output", dirs[p])
            row = {"variant": vname, "family": family, "ratio": R.size_metrics(store)["ratio_residual"],
                   "drift": drift_of(dirs)}
            rows.append(row)
            print(f"  {name} {vname}: ratio {row['ratio']:.1f} drift {row['drift']:.3g}", flush=True)
    return rows


def frontier(rows):
    """For each ExCP point: ckptvc's ratio at the same drift (interpolated in
    log–log along ckptvc's curve) over ExCP's ratio. Where ExCP drifts more
    than ckptvc's coarsest point, that point's ratio over ExCP's is a lower
    bound (`at_least`): ckptvc stores that much already at less drift.
    Where ExCP drifts less than ckptvc's finest point, there is no factor."""
    ours_pts = sorted((r["drift"], r["ratio"]) for r in rows if r["family"] == "ckptvc")
    out = []
    for r in rows:
        if r["family"] != "excp":
            continue
        factor, at_least = None, False
        if ours_pts and r["drift"] > ours_pts[-1][0]:
            factor, at_least = ours_pts[-1][1] / r["ratio"], True
        for (d0, r0), (d1, r1) in zip(ours_pts, ours_pts[1:]):
            if d0 <= r["drift"] <= d1 and d1 > d0:
                t = (math.log(r["drift"]) - math.log(d0)) / (math.log(d1) - math.log(d0))
                factor = math.exp(math.log(r0) + t * (math.log(r1) - math.log(r0))) / r["ratio"]
        out.append({"variant": r["variant"], "drift": r["drift"], "excp_ratio": r["ratio"],
                    "factor": factor, "at_least": at_least})
    return out


def plot(name, rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for family, style in (("excp", "o-"), ("ckptvc", "s-"), ("yardstick", "k*")):
        pts = sorted((r["drift"], r["ratio"]) for r in rows if r["family"] == family)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=family)
    for r in rows:
        if r["family"] != "excp":
            ax.annotate(r["variant"], (r["drift"], r["ratio"]), fontsize=6)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("drift after resuming (relative L2, worse of two points)")
    ax.set_ylabel("ratio per residual commit")
    ax.set_title(f"rate–drift, regime {name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--regimes", default="bf16,long,finetune")
    ap.add_argument("--bin")
    ap.add_argument("--report", action="store_true", help="print the frontier of DIR/rate_drift.json, run nothing")
    args = ap.parse_args()
    if args.report:
        with open(os.path.join(args.work, "rate_drift.json")) as f:
            for name, res in json.load(f).items():
                report(name, frontier(res["rows"]))
        return
    src = args.bin or os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/ckptvc-target")),
                                   "release", "ckptvc")
    R.BIN = os.path.join(args.work, "bin", "ckptvc-rd")
    os.makedirs(os.path.dirname(R.BIN), exist_ok=True)
    shutil.copy2(src, R.BIN)
    texts, _ = R.load_texts()
    # Regimes measured before (another invocation) are kept: each regime
    # takes its own 10–25 minutes, so they may be run one at a time.
    path = os.path.join(args.work, "rate_drift.json")
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            out = json.load(f)
    for name in args.regimes.split(","):
        rows = run(name, dict(R.REGIMES[name]), texts, args.work)
        out[name] = {"rows": rows, "frontier": frontier(rows)}
        plot(name, rows, os.path.join(args.work, f"rate_drift-{name}.png"))
        with open(path, "w") as f:
            json.dump(out, f, indent=2)
        report(name, out[name]["frontier"])


def report(name, front):
    print(f"\n### {name}")
    for fr in front:
        factor = ("below ckptvc's finest point" if fr["factor"] is None
                  else f"{'≥ ' if fr['at_least'] else ''}{fr['factor']:.2f}×")
        print(f"- {fr['variant']}: drift {fr['drift']:.3g}, ExCP {fr['excp_ratio']:.1f}×, ckptvc stores less by {factor}")


if __name__ == "__main__":
    main()
