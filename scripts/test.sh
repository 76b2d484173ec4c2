#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit, property and
# integration tests (release profile, so RocksDB is built once for
# everything: tests, demo and benchmarks share the build).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$(./scripts/setup.sh)"
mkdir -p "$CARGO_TARGET_DIR"

cargo fmt --check
cargo fmt --check --manifest-path fuzz/Cargo.toml
cargo clippy --release --all-targets -- -D warnings
# The format and codec layers alone (what the fuzz targets build on) must
# stand without the store.
cargo clippy --release --no-default-features --lib -- -D warnings
# The fuzz targets run under nightly (fuzz/run.sh); here they only have to
# compile, so that they cannot rot.
cargo check --release --manifest-path fuzz/Cargo.toml --bins --examples
cargo test --release
