#!/usr/bin/env bash
# The main job on the bundled fixtures: build, init a store in a temporary
# directory, commit the fixture training series, print log and stats, check
# a step out and verify it byte for byte.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$(./scripts/setup.sh)"
mkdir -p "$CARGO_TARGET_DIR"
cargo build --release --quiet
ckptvc="$CARGO_TARGET_DIR/release/ckptvc"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export CKPTVC_REPO="$work/store"

"$ckptvc" init
for dir in fixtures/series/step-*; do
    step=$((10#${dir##*step-}))
    "$ckptvc" commit "$dir" --step "$step" --message "fixture step $step" >/dev/null
done
echo "== log"
"$ckptvc" log
echo "== stats"
"$ckptvc" stats
echo "== checkout step 60 and verify"
"$ckptvc" checkout 60 --output "$work/step-60"
for f in fixtures/series/step-000060/*; do
    cmp "$f" "$work/step-60/$(basename "$f")"
done
echo "demo: step 60 is byte-identical to fixtures/series/step-000060"
