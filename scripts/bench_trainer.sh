#!/usr/bin/env bash
# `ckptvc import` of a Hugging Face Trainer run, against `zstd -3 -T2` of the
# same files in the same invocation, with and without the parameter names
# that python/ckptvc_torch.py's callback writes (ckptvc-params.json).
#
#   python3 fixtures/make_trainer_run.py --out RUN --steps 60 --every 10 --width 512 --layers 8
#   scripts/bench_trainer.sh RUN [POLICY]
#
# Prints one line per measurement: wall seconds, bytes in, bytes stored, ratio.
set -euo pipefail
run=$(cd "${1:?RUN_DIR}" && pwd)
policy=${2:-balanced}
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$(./scripts/setup.sh)"
cargo build --release -q
ckptvc="$CARGO_TARGET_DIR/release/ckptvc"
work=$(mktemp -d "${TMPDIR:-/tmp}/bench-trainer.XXXXXX")
trap 'rm -rf "$work"' EXIT
input=$(du -sb "$run" | cut -f1)
now() { date +%s.%N; }
line() { python3 -c "import sys; w, i, o = map(float, sys.argv[2:5]); print(f'{sys.argv[1]:<34} {w:7.2f} s  {i/1e6:9.1f} MB in  {o/1e6:8.1f} MB stored  {i/o:6.2f}x  {i/w/1e6:6.1f} MB/s')" "$@"; }

# Baseline: zstd -3 on two threads, every file of every checkpoint.
start=$(now)
for f in "$run"/checkpoint-*/*; do zstd -q -3 -T2 -c "$f"; done | wc -c > "$work/zstd.bytes"
line "zstd -3 -T2" "$(python3 -c "print($(now)-$start)")" "$input" "$(cat "$work/zstd.bytes")"

import_run() { # LABEL DIR
    "$ckptvc" --repo "$work/store" init --policy "$policy" >/dev/null 2>&1
    start=$(now)
    "$ckptvc" --repo "$work/store" --json import "$2" > "$work/report.json"
    wall=$(python3 -c "print($(now)-$start)")
    stored=$(python3 -c "import json; print(json.load(open('$work/report.json'))['stored_bytes'])")
    line "$1" "$wall" "$input" "$stored"
    "$ckptvc" --repo "$work/store" --json show "$(basename "$(ls -d "$2"/checkpoint-* | sort -V | tail -1)" | sed 's/checkpoint-//')" \
        | python3 -c "import json,sys; p=json.load(sys.stdin)['pairings'][0]; print(f'    pairing: {p[\"rule\"]}, {len(p[\"paired\"])} of {len(p[\"paired\"])+len(p[\"unpaired\"])} parameters')"
    rm -rf "$work/store"
}
import_run "ckptvc import ($policy, names file)" "$run"
# The same files as the Trainer alone writes them: hard links, names file removed.
cp -al "$run" "$work/bare"
rm -f "$work"/bare/checkpoint-*/ckptvc-params.json
import_run "ckptvc import ($policy, no names)" "$work/bare"
