#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 600), two at a time on two
# cores, and prints libFuzzer's final stats line per target.
# Needs: rustup nightly, `cargo install cargo-fuzz`. Seeds: `cargo +nightly run --release --example seeds`.
set -euo pipefail
cd "$(dirname "$0")"
unset CARGO_TARGET_DIR
seconds=${1:-600}
cargo +nightly fuzz build --release
mkdir -p logs
run() {
    cargo +nightly fuzz run --release "$1" -- -max_total_time="$seconds" -rss_limit_mb=2048 \
        -malloc_limit_mb=256 -print_final_stats=1 > "logs/$1.log" 2>&1 \
        && echo "$1: ok" || echo "$1: FAILED (see fuzz/logs/$1.log)"
}
run safetensors_header & run blob_decode & wait
run rans_decode & run quant_payload & wait
run torch_file & wait
for t in safetensors_header blob_decode rans_decode quant_payload torch_file; do
    echo "== $t"; grep -E "stat::number_of_executed_units|stat::peak_rss_mb|Done [0-9]+ runs" "logs/$t.log" || true
done
