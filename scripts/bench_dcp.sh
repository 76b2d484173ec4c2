#!/usr/bin/env bash
# Do ckptvc's lossy policies compress a PyTorch Distributed Checkpoint (DCP) run
# as well as the same run saved as one safetensors folder per step?
#
#   torchrun --nproc-per-node=2 bench/dcp_vs_safetensors.py --out RUN --steps 240 --every 20
#   scripts/bench_dcp.sh RUN [POLICY...]        # default: balanced faithful compact excp
#
# RUN holds dcp/step-NNNNNN/ and st/step-NNNNNN/ (made first if RUN/dcp is missing).
# For each policy: one store per format, every step committed in order; then
# the DCP steps once more as two concurrent `--shard K/2` commits (balanced).
# Ratios count residual (non-keyframe) commits only: sum input / sum stored.
# Prints markdown tables. The binary is $CKPTVC (default: the release build).
set -euo pipefail
run=${1:?RUN_DIR}
shift
[ $# -gt 0 ] || set -- balanced faithful compact excp
policies=("$@")
here=$(cd "$(dirname "$0")/.." && pwd)
ckptvc=${CKPTVC:-/root/.cache/ckptvc-target/release/ckptvc}
shard_policy=${SHARD_POLICY:-balanced}

if [ ! -d "$run/dcp" ]; then
    torchrun --nproc-per-node=2 "$here/bench/dcp_vs_safetensors.py" --out "$run" \
        --steps "${STEPS:-240}" --every "${EVERY:-20}"
fi
run=$(cd "$run" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/bench-dcp.XXXXXX")
trap 'rm -rf "$work"' EXIT
now() { date +%s.%N; }
steps() { for d in "$run/$1"/step-*; do echo "$((10#${d##*-})) $d"; done; }

# physical STORE: bytes of the store's database (blobs and commit records; no cache).
physical() { "$ckptvc" --repo "$1" --json stats | python3 -c "import json,sys; print(json.load(sys.stdin)['physical_bytes'])"; }

# commit_all FORMAT POLICY: one store, every step in order; writes $work/FORMAT-POLICY.{times,phys} (then finish).
commit_all() {
    local s="$work/store-$1-$2" start
    "$ckptvc" --repo "$s" -q init --policy "$2" >/dev/null
    while read -r step dir; do
        start=$(now)
        "$ckptvc" --repo "$s" -q commit "$dir" --step "$step" >/dev/null
        echo "$start $(now)" >> "$work/$1-$2.times"
        echo "$step $(physical "$s")" >> "$work/$1-$2.phys"
    done < <(steps "$1")
    finish "$s" "$1-$2"
}

# commit_sharded POLICY: DCP steps as --shard 0/2 and 1/2 committed concurrently.
commit_sharded() {
    local s="$work/store-dcp2-$1" start rc0 rc1 p0 p1 fails=0
    "$ckptvc" --repo "$s" -q init --policy "$1" >/dev/null
    while read -r step dir; do
        start=$(now)
        # --wait: both ranks see every shard arrived and both try to seal; the
        # loser must wait for the writer lock (with 0 it exits 1 although its
        # shard is stored and the step gets sealed by the other rank).
        "$ckptvc" --repo "$s" -q --wait 120 commit "$dir" --step "$step" --shard 0/2 >/dev/null 2>"$work/e0" & p0=$!
        "$ckptvc" --repo "$s" -q --wait 120 commit "$dir" --step "$step" --shard 1/2 >/dev/null 2>"$work/e1" & p1=$!
        rc0=0; wait "$p0" || rc0=$?
        rc1=0; wait "$p1" || rc1=$?
        echo "$start $(now)" >> "$work/dcp2-$1.times"
        if [ "$rc0" != 0 ] || [ "$rc1" != 0 ]; then
            fails=$((fails + 1)); echo "step $step: shard exit codes $rc0 $rc1: $(cat "$work/e0" "$work/e1")" >&2
        fi
        echo "$step $(physical "$s")" >> "$work/dcp2-$1.phys"
    done < <(steps dcp)
    if [ -n "$("$ckptvc" --repo "$s" status | grep -v 'no pending')" ]; then echo "pending steps left:" >&2; "$ckptvc" --repo "$s" status >&2; fi
    echo "$fails" > "$work/dcp2-$1.fails"
    finish "$s" "dcp2-$1"
}

# finish STORE LABEL: the log, every residual commit's show, the store's size on disk
# (database + reconstruction cache); then delete the store.
finish() {
    "$ckptvc" --repo "$1" --json log > "$work/$2.log"
    "$ckptvc" --repo "$1" fsck >/dev/null
    : > "$work/$2.show"
    for step in $(python3 -c "import json,sys; [print(c['step']) for c in json.load(open(sys.argv[1])) if not c['keyframe']]" "$work/$2.log"); do
        "$ckptvc" --repo "$1" --json show "main@$step" | python3 -c "import json,sys; print(json.dumps(json.load(sys.stdin)))" >> "$work/$2.show"
    done
    du -sb "$1" | cut -f1 > "$work/$2.du"
    rm -rf "$1"
}

echo "data: $(du -sb "$run/dcp" | cut -f1) bytes DCP, $(du -sb "$run/st" | cut -f1) bytes safetensors," \
     "$(ls -d "$run"/dcp/step-* | wc -l) steps; $("$ckptvc" --version)"
for p in "${policies[@]}"; do
    commit_all dcp "$p"
    commit_all st "$p"
done
commit_sharded "$shard_policy"

python3 - "$work" "$shard_policy" "${policies[@]}" <<'EOF'
import json, sys
work, shard_policy, policies = sys.argv[1], sys.argv[2], sys.argv[3:]

def load(label):
    log = json.load(open(f"{work}/{label}.log"))
    res = [c for c in log if not c["keyframe"]]
    n = len(res)
    r = {
        "commits": len(log), "residual": n,
        "in": sum(c["input_bytes"] for c in log), "stored": sum(c["stored_bytes"] for c in log),
        "rin": sum(c["input_bytes"] for c in res), "rstored": sum(c["stored_bytes"] for c in res),
        "ew": sum(c["error_w"] for c in res) / n, "em": sum(c["error_m"] for c in res) / n,
        "ev": sum(c["error_v"] for c in res) / n,
        "du": int(open(f"{work}/{label}.du").read()), "secs": sum(float(b) - float(a) for a, b in (l.split() for l in open(f"{work}/{label}.times"))),
    }
    r["ratio"] = r["rin"] / r["rstored"]
    # Growth of the store's database over the residual commits: blobs plus
    # commit records (which keep the bytes outside tensors verbatim).
    phys = dict(tuple(map(int, l.split())) for l in open(f"{work}/{label}.phys"))
    order = sorted(phys)
    kf = {c["step"] for c in log if c["keyframe"]}
    r["rphys"] = sum(phys[b] - phys[a] for a, b in zip(order, order[1:]) if b not in kf)
    r["pratio"] = sum(c["input_bytes"] for c in res if c["step"] != order[0]) / r["rphys"]
    # Per role over the residual commits' show entries: W, m (exp_avg), v (exp_avg_sq)
    # coded lossy; the same roles coded losslessly (small chunks, 0-d steps); other
    # (non-tensor files and entries: .metadata, meta.json, pickled param groups).
    roles = {}
    for line in open(f"{work}/{label}.show"):
        for e in json.loads(line)["entries"]:
            t = e["tensor"]
            if t is None:
                role = "other"
            else:
                base = t.split("[")[0]
                role = "v" if base.endswith("exp_avg_sq") else "m" if base.endswith("exp_avg") else \
                    "other" if ".param_groups." in base else "W"
                lossy = any(c.startswith("quant") or c.startswith("excp") for c in e["codecs"])
                role += "" if role == "other" else (" lossy" if lossy else " lossless")
            a = roles.setdefault(role, [0, 0])
            a[0] += e["bytes_in"]; a[1] += e["bytes_out"]
    r["roles"] = roles
    return r

MB = 1e6
rows = {}
print()
print("| policy | format | commits | input MB | stored MB (log) | store on disk MB | ratio, residual (log) | DCP/ST | ratio, residual (db growth) | DCP/ST | mean err W | mean err m | mean err v | commit s |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
labels = [(p, f) for p in policies for f in ("dcp", "st")] + [(shard_policy, "dcp2")]
for p, f in labels:
    rows[(p, f)] = load(f"{f}-{p}")
for p, f in labels:
    r = rows[(p, f)]
    rr = "" if f == "st" else f"{r['ratio'] / rows[(p, 'st')]['ratio']:.3f}"
    pr = "" if f == "st" else f"{r['pratio'] / rows[(p, 'st')]['pratio']:.3f}"
    name = {"dcp": "DCP", "st": "safetensors", "dcp2": "DCP, --shard K/2 x2"}[f]
    print(f"| {p} | {name} | {r['commits']} | {r['in']/MB:.1f} | {r['stored']/MB:.2f} | {r['du']/MB:.2f} | "
          f"{r['ratio']:.2f}x | {rr} | {r['pratio']:.2f}x | {pr} | {r['ew']:.3e} | {r['em']:.3e} | {r['ev']:.3e} | {r['secs']:.1f} |")

print()
print("Residual commits by role: MB in -> MB stored (ratio). lossless = chunks below the lossy size or 0-d.")
print()
names = ["W lossy", "m lossy", "v lossy", "W lossless", "m lossless", "v lossless", "other"]
print("| policy | format | " + " | ".join(names) + " |")
print("|---|---|" + "---:|" * len(names))
for p, f in labels:
    ro = rows[(p, f)]["roles"]
    cells = [f"{ro[n][0]/MB:.2f} -> {ro[n][1]/MB:.3f} ({ro[n][0]/max(ro[n][1],1):.1f}x)" if n in ro else "-" for n in names]
    print(f"| {p} | {f} | " + " | ".join(cells) + " |")
fails = int(open(f"{work}/dcp2-{shard_policy}.fails").read())
print(f"\nsharded commits with a non-zero exit: {fails}")
EOF
