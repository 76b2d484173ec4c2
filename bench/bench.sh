#!/usr/bin/env bash
# Benchmarks for docs/benchmarks.md. Every timing is a ratio against a baseline
# measured in the same invocation (this machine is shared and noisy).
#
#   ./bench/bench.sh ratio    keyframe codec vs zstd -3 on the fixture tensors
#   ./bench/bench.sh big      4 GiB synthetic checkpoint: peak RSS and speed of
#                             commit / checkout vs `cp` of the same files
#   ./bench/bench.sh lossy    lossy residual commit of a 4 GiB checkpoint (part of big)
#   ./bench/bench.sh chain    commit time along a growing delta chain
#   ./bench/bench.sh all      everything (needs ~20 GB free disk under $BENCH_DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$(./scripts/setup.sh)"
cargo build --release --quiet --bin ckptvc --examples
bin="$CARGO_TARGET_DIR/release"
ckptvc="$bin/ckptvc"
work="${BENCH_DIR:-$(mktemp -d)}"
mkdir -p "$work"
trap 'rm -rf "$work"/store* "$work"/out* "$work"/copy*' EXIT

source scripts/bench_lib.sh

# "peak_rss_kib seconds" of a command, from GNU time.
measure() {
    timed "$@"
    echo "$rss_kib $wall"
}

ratio() {
    echo "== keyframe codec vs zstd -3 (fixtures/series, all tensors)"
    "$bin/examples/codec_ratio" fixtures/series/step-*
    echo "== whole fixture series through the store"
    rm -rf "$work/store-r"
    "$ckptvc" --repo "$work/store-r" init --policy lossless
    for dir in fixtures/series/step-*; do
        "$ckptvc" --repo "$work/store-r" --quiet commit "$dir" --step $((10#${dir##*step-})) >/dev/null
    done
    "$ckptvc" --repo "$work/store-r" log
    "$ckptvc" --repo "$work/store-r" stats
}

big() {
    local size=$((4 * 1024 * 1024 * 1024))
    echo "== synthetic checkpoint: $size bytes"
    [ -f "$work/ck-big/model.safetensors" ] || "$bin/examples/make_synthetic" "$work/ck-big" "$size" 1
    [ -f "$work/ck-big2/model.safetensors" ] || "$bin/examples/make_synthetic" "$work/ck-big2" "$size" 2
    du -sb "$work/ck-big" "$work/ck-big2"
    rm -rf "$work/store-b" "$work/out-b" "$work/copy-b" "$work/store-l"
    "$ckptvc" --repo "$work/store-b" init --policy lossless
    sync
    local cp_s; cp_s=$(seconds cp -r "$work/ck-big" "$work/copy-b"); rm -rf "$work/copy-b"
    read -r rss1 s1 < <(measure "$ckptvc" --repo "$work/store-b" --quiet commit "$work/ck-big" --step 100)
    read -r rss2 s2 < <(measure "$ckptvc" --repo "$work/store-b" --quiet commit "$work/ck-big2" --step 200)
    read -r rss3 s3 < <(measure "$ckptvc" --repo "$work/store-b" --quiet checkout 100 --output "$work/out-b")
    cmp "$work/ck-big/model.safetensors" "$work/out-b/model.safetensors"
    cmp "$work/ck-big/optimizer.safetensors" "$work/out-b/optimizer.safetensors"
    local cp2_s; cp2_s=$(seconds cp -r "$work/ck-big" "$work/copy-b"); rm -rf "$work/copy-b"
    local cp_avg; cp_avg=$(calc "($cp_s + $cp2_s) / 2")
    printf 'cp -r baseline          %6.1f s (mean of %.1f and %.1f)\n' "$cp_avg" "$cp_s" "$cp2_s"
    printf 'commit keyframe         %6.1f s  %.2fx cp   peak RSS %d MiB\n' "$s1" "$(calc "$s1 / $cp_avg")" $((rss1 / 1024))
    printf 'commit delta            %6.1f s  %.2fx cp   peak RSS %d MiB\n' "$s2" "$(calc "$s2 / $cp_avg")" $((rss2 / 1024))
    printf 'checkout (verified)     %6.1f s  %.2fx cp   peak RSS %d MiB\n' "$s3" "$(calc "$s3 / $cp_avg")" $((rss3 / 1024))
    "$ckptvc" --repo "$work/store-b" log
    "$ckptvc" --repo "$work/store-b" stats
    rm -rf "$work/store-b" "$work/out-b"
    lossy
}

lossy() {
    local size=$((4 * 1024 * 1024 * 1024))
    [ -f "$work/ck-big/model.safetensors" ] || "$bin/examples/make_synthetic" "$work/ck-big" "$size" 1
    [ -f "$work/ck-big2/model.safetensors" ] || "$bin/examples/make_synthetic" "$work/ck-big2" "$size" 2
    rm -rf "$work/store-l" "$work/copy-b"
    echo "== the 4 GiB checkpoints, policy balanced: a keyframe, then 3 lossy residuals along main"
    "$ckptvc" --repo "$work/store-l" init --policy balanced
    "$ckptvc" --repo "$work/store-l" --quiet commit "$work/ck-big" --step 100 >/dev/null
    # Page cache warm, as in a save hook: the checkpoint was just written.
    # Baselines in the same run: cp of the same files, before and after; and
    # zstd -3 on both cores where installed.
    warm() { cat "$1"/* >/dev/null; sync; }
    warm "$work/ck-big2"
    local cp1; cp1=$(seconds cp -r "$work/ck-big2" "$work/copy-b"); rm -rf "$work/copy-b"
    local times=() step=200 dir rss s
    for dir in ck-big2 ck-big ck-big2; do
        warm "$work/$dir"
        read -r rss s < <(measure "$ckptvc" --repo "$work/store-l" --quiet commit "$work/$dir" --step "$step")
        printf 'commit lossy residual %s (step %d)  %6.2f s  %4.0f MB/s  peak RSS %d MiB\n' \
            "$dir" "$step" "$s" "$(calc "$size / $s / 1000000")" $((rss / 1024))
        times+=("$s")
        step=$((step + 100))
    done
    warm "$work/ck-big2"
    local cp2; cp2=$(seconds cp -r "$work/ck-big2" "$work/copy-b"); rm -rf "$work/copy-b"
    local median; median=$(printf '%s\n' "${times[@]}" | sort -g | sed -n 2p)
    local cpl; cpl=$(calc "($cp1 + $cp2) / 2")
    printf 'cp -r baseline          %6.2f s (%.2f and %.2f)\n' "$cpl" "$cp1" "$cp2"
    if command -v zstd >/dev/null; then
        warm "$work/ck-big2"
        mkdir -p "$work/copy-b"
        local z; z=$(seconds zstd -q -3 -T2 -f "$work/ck-big2/optimizer.safetensors" "$work/ck-big2/model.safetensors" --output-dir-flat "$work/copy-b")
        rm -rf "$work/copy-b"
        printf 'zstd -3 -T2 baseline    %6.2f s\n' "$z"
        printf 'median lossy commit     %6.2f s = %.0f MB/s   %.2fx cp   %.2fx zstd -3 -T2\n' \
            "$median" "$(calc "$size / $median / 1000000")" "$(calc "$median / $cpl")" "$(calc "$median / $z")"
    else
        printf 'median lossy commit     %6.2f s = %.0f MB/s   %.2fx cp\n' \
            "$median" "$(calc "$size / $median / 1000000")" "$(calc "$median / $cpl")"
    fi
    "$ckptvc" --repo "$work/store-l" log
}

chain() {
    local size=$((96 * 1024 * 1024)) n=12
    echo "== commit time along one delta chain (keyframe interval 1000, $n commits of $size bytes)"
    rm -rf "$work/store-c"
    "$ckptvc" --repo "$work/store-c" init --policy lossless --keyframe-interval 1000 --replay-budget 1000000
    for v in $(seq 1 $n); do
        [ -f "$work/ck-c$v/model.safetensors" ] || "$bin/examples/make_synthetic" "$work/ck-c$v" "$size" "$v"
    done
    # Baseline, measured right after each chain commit: the same checkpoint
    # committed into a fresh store (no parent, nothing to look up).
    for v in $(seq 1 $n); do
        local s; s=$(seconds "$ckptvc" --repo "$work/store-c" --quiet commit "$work/ck-c$v" --step "$v")
        rm -rf "$work/store-f"
        "$ckptvc" --repo "$work/store-f" --quiet init --policy lossless
        local f; f=$(seconds "$ckptvc" --repo "$work/store-f" --quiet commit "$work/ck-c$v" --step "$v")
        printf 'commit %2d (chain depth %2d)  %5.2f s   fresh-store commit %5.2f s   ratio %.2f\n' "$v" $((v - 1)) "$s" "$f" "$(calc "$s / $f")"
    done
}

case "${1:-all}" in
    ratio) ratio ;;
    big) big ;;
    lossy) lossy ;;
    chain) chain ;;
    all) ratio; chain; big ;;
    *) echo "usage: $0 ratio|big|chain|all" >&2; exit 2 ;;
esac
