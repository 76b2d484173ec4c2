#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit, property and
# integration tests (release profile, so RocksDB is built once for
# everything: tests, demo and benchmarks share the build).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$(./scripts/setup.sh)"
mkdir -p "$CARGO_TARGET_DIR"

cargo fmt --all --check
cargo fmt --check --manifest-path fuzz/Cargo.toml
cargo clippy --release --all-targets -- -D warnings
cargo clippy --release -p ckptvc-py --all-targets -- -D warnings
# The format and codec layers alone (what the fuzz targets build on) must
# stand without the store.
cargo clippy --release --no-default-features --lib -- -D warnings
# The fuzz targets run under nightly (fuzz/run.sh); here they only have to
# compile, so that they cannot rot.
cargo check --release --manifest-path fuzz/Cargo.toml --bins --examples

# The S3 tests run against a real S3-compatible server (SeaweedFS), started
# here on loopback and stopped on exit. With CKPTVC_REQUIRE_S3 set, a test
# that cannot reach it fails instead of printing "skipped".
S3_DIR="$(mktemp -d -t ckptvc-s3.XXXXXX)"
s3_env="$(./scripts/s3-server.sh start "$S3_DIR" "${CKPTVC_S3_PORT:-18333}" ckptvc-test)"
trap './scripts/s3-server.sh stop "$S3_DIR" || true; rm -rf "$S3_DIR"' EXIT
eval "$s3_env"
export CKPTVC_REQUIRE_S3=1

cargo test --release

# The Python package: the wheel built by maturin (the extension shares this
# build directory), installed into a fresh virtualenv with numpy and pytest,
# and its tests run against it. The torch tests print "skipped" unless torch
# is installed there.
./scripts/python_test.sh
