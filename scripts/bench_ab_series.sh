#!/usr/bin/env bash
# A/B commit time of two ckptvc builds on one checkpoint series, in one
# invocation: per round each build commits the whole series into a fresh
# store (balanced), the order alternating, with `sync` and a pause before
# each so that neither pays the other's writeback. Prints wall, user and
# system seconds of A and B per round and the median B/A of wall time.
#
# Usage: scripts/bench_ab_series.sh BIN_A BIN_B ROUNDS CKPT_DIR...
#   e.g. python3 bench/mlp_series.py /tmp/mlp &&
#        scripts/bench_ab_series.sh /tmp/ckptvc-old target/release/ckptvc 8 /tmp/mlp/ckpt-{20,25,30}
set -euo pipefail
bin_a=$1 bin_b=$2 rounds=$3
shift 3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

run() { # bin dirs... -> "wall user sys"
    local bin=$1
    shift
    local store="$work/store"
    rm -rf "$store"
    "$bin" --repo "$store" init -q --policy balanced
    /usr/bin/time -f "%e %U %S" -o "$work/time" bash -c '
        bin=$1 store=$2; shift 2; step=0
        for d in "$@"; do
            step=$((step + 1))
            "$bin" --repo "$store" commit "$d" --step "$step" -q >/dev/null
        done' _ "$bin" "$store" "$@"
    cat "$work/time"
}

ratios=()
for r in $(seq 1 "$rounds"); do
    sync; sleep 2
    if ((r % 2)); then
        a=$(run "$bin_a" "$@"); sync; sleep 2; b=$(run "$bin_b" "$@")
    else
        b=$(run "$bin_b" "$@"); sync; sleep 2; a=$(run "$bin_a" "$@")
    fi
    ratio=$(awk -v a="${a%% *}" -v b="${b%% *}" 'BEGIN { printf "%.3f", b / a }')
    ratios+=("$ratio")
    echo "round $r: A $a | B $b | B/A wall $ratio"
done
printf '%s\n' "${ratios[@]}" | sort -n | awk '{ x[NR] = $1 } END {
    m = (NR % 2) ? x[(NR + 1) / 2] : (x[NR / 2] + x[NR / 2 + 1]) / 2
    printf "median B/A wall: %.3f\n", m }'
