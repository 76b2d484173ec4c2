#!/usr/bin/env bash
# A/B of two builds of the wheel's native library on commits from memory
# (bench/python_commit_series.py), alternating A B B A ... in one invocation:
# the machine is shared and noisy, so only ratios within a round mean much.
#
# Usage: scripts/bench_ab_python.sh LIB_A LIB_B [ROUNDS [SERIES ARGS...]]
#   LIB_*: a `lib_ckptvc.so` (`cargo build --release -p ckptvc-py`), copied
#   over the installed package's `_ckptvc.abi3.so` for its runs (the one of
#   the `python3` on PATH; restored after).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
lib_a=$1 lib_b=$2 rounds=${3:-2}
shift $(($# < 3 ? $# : 3))
installed=$(python3 -c 'import ckptvc, os; print(os.path.join(os.path.dirname(ckptvc.__file__), "_ckptvc.abi3.so"))')
backup=$(mktemp)
cp "$installed" "$backup"
trap 'cp "$backup" "$installed"; rm -f "$backup"' EXIT
for r in $(seq 1 "$rounds"); do
    order=(A B)
    if ((r % 2 == 0)); then order=(B A); fi
    for which in "${order[@]}"; do
        lib=$lib_a
        if [[ $which == B ]]; then lib=$lib_b; fi
        cp "$lib" "$installed"
        echo "== round $r: $which"
        python3 "$here/../bench/python_commit_series.py" "$@"
    done
done
