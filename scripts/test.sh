#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit, property and
# integration tests (release profile, so RocksDB is built once for
# everything: tests, demo and benchmarks share the build).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$(./scripts/setup.sh)"
mkdir -p "$CARGO_TARGET_DIR"

cargo fmt --check
cargo clippy --release --all-targets -- -D warnings
cargo test --release
