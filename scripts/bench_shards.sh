#!/usr/bin/env bash
# Many ranks committing one step (docs/benchmarks.md, "Distributed"): RANKS
# processes each commit their shard (`commit --shard K/N`) of a step of
# RANKS × RANK_BYTES at once, against one process committing the same
# folder, both measured in this invocation on the same data:
#   step 1  a keyframe (lossless; the first commit of the store)
#   step 2  a residual commit under POLICY, against step 1
# Each rank's data is its own simulated run (examples/make_series.rs with
# SEED=rank): `rank<K>/model.safetensors` + `optimizer.safetensors`.
#
# Environment: BENCH_DIR (default ~/.cache/ckptvc-bench), RANKS (4),
# RANK_BYTES (512 MiB), RUNS (3), POLICY (balanced).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$(./scripts/setup.sh)"
cargo build --release --quiet --bin ckptvc --examples
bin="$CARGO_TARGET_DIR/release"
ckptvc="$bin/ckptvc"
work="${BENCH_DIR:-$HOME/.cache/ckptvc-bench}/shards"
ranks="${RANKS:-4}"
rank_bytes="${RANK_BYTES:-$((512 << 20))}"
runs="${RUNS:-3}"
policy="${POLICY:-balanced}"
source scripts/bench_lib.sh
mkdir -p "$work"

for ((k = 0; k < ranks; k++)); do
    if [ ! -d "$work/series$k/ck-2" ]; then
        SEED=$k "$bin/examples/make_series" "$work/series$k" $((rank_bytes / 3)) 2 >&2
    fi
done
for c in 1 2; do
    for ((k = 0; k < ranks; k++)); do
        mkdir -p "$work/step$c/rank$k"
        for f in model.safetensors optimizer.safetensors meta.json; do
            ln -f "$work/series$k/ck-$c/$f" "$work/step$c/rank$k/$f"
        done
    done
done
echo "data: $(bytes_of "$work/step1") bytes per step, $ranks ranks" >&2

# One process commits the step folder.
single() {
    "$ckptvc" --repo "$1" --quiet commit "$2" --step "$3" >/dev/null
}
# All ranks commit their shards at once; returns when the last is done.
sharded() {
    local pids=()
    for ((k = 0; k < ranks; k++)); do
        "$ckptvc" --repo "$1" --quiet --wait 600 commit "$2" --step "$3" --shard "$k/$ranks" >/dev/null &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
}

key_ratios=()
res_ratios=()
for ((run = 1; run <= runs; run++)); do
    rm -rf "$work/one" "$work/many"
    "$ckptvc" --repo "$work/one" init --policy "$policy" >/dev/null
    "$ckptvc" --repo "$work/many" init --policy "$policy" >/dev/null
    sync
    one_key=$(seconds single "$work/one" "$work/step1" 1)
    many_key=$(seconds sharded "$work/many" "$work/step1" 1)
    sync
    one_res=$(seconds single "$work/one" "$work/step2" 2)
    many_res=$(seconds sharded "$work/many" "$work/step2" 2)
    one_stored=$("$ckptvc" --repo "$work/one" --json log | json_field '[0]["stored_bytes"]')
    many_stored=$("$ckptvc" --repo "$work/many" --json log | json_field '[0]["stored_bytes"]')
    key_ratios+=("$(calc "$many_key / $one_key")")
    res_ratios+=("$(calc "$many_res / $one_res")")
    echo "run $run: keyframe one ${one_key}s, $ranks ranks ${many_key}s;" \
        "residual one ${one_res}s, $ranks ranks ${many_res}s;" \
        "residual stored one $one_stored B, sharded $many_stored B" >&2
done
echo "keyframe step: $ranks ranks / one process, median $(median "${key_ratios[@]}") (${key_ratios[*]})"
echo "residual step ($policy): $ranks ranks / one process, median $(median "${res_ratios[@]}") (${res_ratios[*]})"
