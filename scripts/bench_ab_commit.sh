#!/usr/bin/env bash
# A/B commit throughput of two ckptvc builds on the same checkpoints, in one
# invocation (the machine is shared and noisy: only the ratio means much).
# Each round commits the whole series into a fresh store with A, then with B
# (then B first, A second, alternating), each with its own policy argument.
#
# Usage: scripts/bench_ab_commit.sh BIN_A POLICY_A BIN_B POLICY_B CKPT_DIR... [-- ROUNDS]
#   e.g. scripts/bench_ab_commit.sh /tmp/ckptvc-old balanced target/release/ckptvc balanced \
#        ~/.cache/ckptvc-bench/r17/warmup/ckpt/step-0000{20,40,60,80,100,120}
# Prints per round the wall seconds of A and B and B/A, then the median ratio.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin_a=$1 pol_a=$2 bin_b=$3 pol_b=$4
shift 4
dirs=()
rounds=5
while (($#)); do
    if [[ $1 == -- ]]; then rounds=$2; break; fi
    dirs+=("$1")
    shift
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# shellcheck source=scripts/bench_lib.sh
source "$here/bench_lib.sh"

series() { # bin policy store
    "$1" --repo "$3" init --quiet --policy "$2"
    local step=0
    for d in "${dirs[@]}"; do
        step=$((step + 1))
        "$1" --repo "$3" --quiet commit "$d" --step "$step" >/dev/null
    done
}

ratios=()
echo "| round | A (s) | B (s) | B/A |"
echo "|---|---|---|---|"
for r in $(seq 1 "$rounds"); do
    rm -rf "$work/a" "$work/b"
    if ((r % 2)); then
        ta=$(seconds series "$bin_a" "$pol_a" "$work/a")
        tb=$(seconds series "$bin_b" "$pol_b" "$work/b")
    else
        tb=$(seconds series "$bin_b" "$pol_b" "$work/b")
        ta=$(seconds series "$bin_a" "$pol_a" "$work/a")
    fi
    ratio=$(calc "$tb / $ta")
    ratios+=("$ratio")
    printf '| %d | %.2f | %.2f | %.3f |\n' "$r" "$ta" "$tb" "$ratio"
done
echo "median B/A: $(median "${ratios[@]}")"
