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

commit_series() {
    for dir in fixtures/series/step-*; do
        step=$((10#${dir##*step-}))
        "$ckptvc" commit "$dir" --step "$step" --message "fixture step $step" >/dev/null
    done
}

echo "== the default policy (balanced): lossy residuals against the parent"
export CKPTVC_REPO="$work/store"
"$ckptvc" init
commit_series
"$ckptvc" log
"$ckptvc" stats
"$ckptvc" checkout 60 --output "$work/step-60"   # every chunk verified against its checksum
cmp fixtures/series/step-000060/meta.json "$work/step-60/meta.json"

echo
echo "== policy lossless: checkouts are byte-identical"
export CKPTVC_REPO="$work/lossless"
"$ckptvc" init --policy lossless
commit_series
"$ckptvc" stats
"$ckptvc" checkout 60 --output "$work/exact-60"
for f in fixtures/series/step-000060/*; do
    cmp "$f" "$work/exact-60/$(basename "$f")"
done
echo "demo: lossless step 60 is byte-identical to fixtures/series/step-000060"
