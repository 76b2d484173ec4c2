#!/usr/bin/env bash
# Performance harness (docs/benchmarks.md, "Performance marks"). Builds
# release, makes (once) a synthetic training run of a 1 GiB fp32 model with
# Adam's m and v (5 checkpoints of 3 GiB, `examples/make_series.rs`), and
# prints markdown tables. Every time is the median of $RUNS runs with the page
# cache warm, and is given as a ratio against a baseline measured in the same
# invocation: this machine is shared and noisy, absolute seconds are not
# comparable between days.
#
#   scripts/bench.sh keyframe   lossless keyframe commit vs `zstd -3 -T2`
#   scripts/bench.sh lossy      10 lossy residual commits vs `zstd -3 -T2`
#   scripts/bench.sh checkout   keyframe / depth-9 / tip checkout vs `cp`
#                               (needs the store `lossy` leaves)
#   scripts/bench.sh history    log, branch, show on 10,000 commits vs `git log`
#   scripts/bench.sh shards     one checkpoint as 2 files vs as 4+4 shards
#   scripts/bench.sh fixture    the fixture series under every policy
#   scripts/bench.sh all        all of the above (~40 GB free disk under $BENCH_DIR)
#
# Environment: BENCH_DIR (default ~/.cache/ckptvc-bench; the series is kept
# there between runs), RUNS (default 3), MODEL_BYTES (default 1 GiB).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$(./scripts/setup.sh)"
cargo build --release --quiet --bin ckptvc --examples
bin="$CARGO_TARGET_DIR/release"
ckptvc="$bin/ckptvc"
work="${BENCH_DIR:-$HOME/.cache/ckptvc-bench}"
runs="${RUNS:-3}"
model_bytes="${MODEL_BYTES:-$((1 << 30))}"
series="$work/series-$model_bytes"
mkdir -p "$work"

source scripts/bench_lib.sh
max() { printf '%s\n' "$@" | sort -g | tail -1; }
warm() { cat "$1"/* >/dev/null; }
mb_s() { calc "$1 / $2 / 1e6"; }

# Sets $wall (seconds) and $rss (MiB) of a command, from GNU time; its
# output goes to $work/out.txt.
measure() {
    timed "$@"
    rss=$((rss_kib / 1024))
}


make_series() {
    if [ ! -f "$series/ck-5/meta.json" ]; then
        echo "making the series in $series (about 7 minutes)" >&2
        "$bin/examples/make_series" "$series" "$model_bytes" 5 >&2
    fi
}

machine() {
    echo "machine: $(nproc) cores, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)," \
        "$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo); $(date -u +%F); $(git rev-parse --short HEAD)"
}

zstd_files() { zstd -q -3 -T2 -f "$1"/*.safetensors --output-dir-flat "$2"; }

keyframe() {
    make_series
    local ck="$series/ck-1" input; input=$(bytes_of "$ck")
    local times=() zstd_times=() rss_max=0 store="$work/store-k" zout="$work/zstd-out"
    for _ in $(seq "$runs"); do
        rm -rf "$store" "$zout"
        "$ckptvc" --repo "$store" --quiet init --policy lossless
        warm "$ck"; sync
        measure "$ckptvc" --repo "$store" --quiet commit "$ck" --step 1
        times+=("$wall"); rss_max=$(max "$rss_max" "$rss")
        mkdir -p "$zout"; warm "$ck"; sync
        zstd_times+=("$(seconds zstd_files "$ck" "$zout")")
    done
    local blob; blob=$("$ckptvc" --repo "$store" --json stats | json_field "['blob_bytes']")
    local zbytes; zbytes=$(bytes_of "$zout")
    local t z; t=$(median "${times[@]}"); z=$(median "${zstd_times[@]}")
    echo "### Lossless keyframe commit ($input bytes, median of $runs)"
    echo
    echo "| | ckptvc commit (lossless) | zstd -3 -T2 | ckptvc / zstd |"
    echo "|---|---|---|---|"
    printf '| wall | %.2f s (%s) | %.2f s (%s) | **%.2f×** time |\n' "$t" "${times[*]}" "$z" "${zstd_times[*]}" "$(calc "$t / $z")"
    printf '| throughput | %.0f MB/s | %.0f MB/s | |\n' "$(mb_s "$input" "$t")" "$(mb_s "$input" "$z")"
    printf '| ratio (input / stored) | %.4f | %.4f | %.3f× smaller |\n' "$(calc "$input / $blob")" "$(calc "$input / $zbytes")" "$(calc "$zbytes / $blob")"
    printf '| peak RSS | %d MiB | | |\n' "$rss_max"
    echo
    rm -rf "$store" "$zout"
}

# The order residual commits take through the series: a chain of 10.
residual_dirs=(ck-2 ck-3 ck-4 ck-5 ck-4 ck-3 ck-2 ck-3 ck-4 ck-5)

lossy() {
    make_series
    local store="$work/store-l" zout="$work/zstd-out" input; input=$(bytes_of "$series/ck-2")
    rm -rf "$store"
    # The default replay budget (60 s) would take a keyframe every ~7
    # commits of this size; the chain of 10 residuals needs a longer one.
    "$ckptvc" --repo "$store" --quiet init --replay-budget 600
    # The store's first chain (ck-5, then ck-4: nothing the measured chain
    # could share blobs with): its first residual writes the store's first
    # cache file, into new page-cache pages. Every later chain starts with
    # the spare (the cache file of the tip its keyframe replaced), as in a
    # long run; the 10 measured commits are such a chain.
    "$ckptvc" --repo "$store" --quiet commit "$series/ck-5" --step 10 >/dev/null
    warm "$series/ck-4"; sync
    measure "$ckptvc" --repo "$store" --quiet commit "$series/ck-4" --step 20
    local first_ever="$wall"
    "$ckptvc" --repo "$store" --quiet commit "$series/ck-1" --step 30 --keyframe >/dev/null
    local times=() rss_max=0 step=30 dir json
    echo "### Lossy residual commits (default policy balanced, $input bytes each)"
    echo
    echo "| commit | input | chain depth | wall | throughput | stored | ratio | bases from cache / decoded | peak RSS |"
    echo "|---|---|---|---|---|---|---|---|---|"
    for dir in "${residual_dirs[@]}"; do
        step=$((step + 10))
        warm "$series/$dir"; sync
        measure "$ckptvc" --repo "$store" --json commit "$series/$dir" --step "$step"
        json=$(cat "$work/out.txt")
        times+=("$wall"); rss_max=$(max "$rss_max" "$rss")
        printf '| %d | %s | %s | %.2f s | %.0f MB/s | %s B | %.1f× | %s / %s | %d MiB |\n' "${#times[@]}" "$dir" \
            "$(json_field "['chain_depth']" <<<"$json")" "$wall" "$(mb_s "$input" "$wall")" \
            "$(json_field "['stored_bytes']" <<<"$json")" "$(json_field "['ratio']" <<<"$json")" \
            "$(json_field "['bases_from_cache']" <<<"$json")" "$(json_field "['bases_decoded']" <<<"$json")" "$rss"
    done
    local zstd_times=()
    for _ in $(seq "$runs"); do
        rm -rf "$zout"; mkdir -p "$zout"; warm "$series/ck-2"; sync
        zstd_times+=("$(seconds zstd_files "$series/ck-2" "$zout")")
    done
    rm -rf "$zout"
    local t z; t=$(median "${times[@]}"); z=$(median "${zstd_times[@]}")
    echo
    printf '| | value | baseline | ratio |\n|---|---|---|---|\n'
    printf '| median residual commit | %.2f s = %.0f MB/s | zstd -3 -T2 %.2f s = %.0f MB/s (%s) | **%.2f×** zstd time |\n' \
        "$t" "$(mb_s "$input" "$t")" "$z" "$(mb_s "$input" "$z")" "${zstd_times[*]}" "$(calc "$t / $z")"
    printf '| 10th residual vs 1st | %.2f s | %.2f s | **%.2f×** |\n' "${times[9]}" "${times[0]}" "$(calc "${times[9]} / ${times[0]}")"
    printf '| 10th residual vs the first of the store'"'"'s first chain (no spare cache file yet) | %.2f s | %.2f s | %.2f× |\n' "${times[9]}" "$first_ever" "$(calc "${times[9]} / $first_ever")"
    printf '| peak RSS (all commits) | %d MiB | | |\n' "$rss_max"
    echo
    "$ckptvc" --repo "$store" log | head -12
    "$ckptvc" --repo "$store" stats
    echo
}

checkout() {
    local store="$work/store-l" out="$work/out" copy="$work/copy"
    [ -d "$store" ] || { echo "run '$0 lossy' first" >&2; exit 2; }
    local input; input=$(bytes_of "$series/ck-1")
    local kf=() nosync=() deep=() tip=() cp_times=() rss_max=0
    for _ in $(seq "$runs"); do
        rm -rf "$out" "$copy"; sync
        cp_times+=("$(seconds cp -r "$series/ck-1" "$copy")"); rm -rf "$copy"; sync
        measure "$ckptvc" --repo "$store" --quiet checkout 30 --output "$out"
        kf+=("$wall"); rss_max=$(max "$rss_max" "$rss"); rm -rf "$out"; sync
        measure "$ckptvc" --repo "$store" --quiet checkout 30 --no-sync --output "$out"
        nosync+=("$wall"); rm -rf "$out"; sync
        # Step 120 is the 9th residual after the keyframe, not a branch tip.
        measure "$ckptvc" --repo "$store" --quiet checkout 120 --output "$out"
        deep+=("$wall"); rss_max=$(max "$rss_max" "$rss"); rm -rf "$out"; sync
        measure "$ckptvc" --repo "$store" --quiet checkout main --output "$out"
        tip+=("$wall"); rss_max=$(max "$rss_max" "$rss"); rm -rf "$out"; sync
    done
    local c k n d t; c=$(median "${cp_times[@]}"); k=$(median "${kf[@]}"); n=$(median "${nosync[@]}")
    d=$(median "${deep[@]}"); t=$(median "${tip[@]}")
    echo "### Checkout ($input bytes written, median of $runs)"
    echo
    echo "| checkout of | wall | throughput | vs cp -r (${c} s) | vs keyframe |"
    echo "|---|---|---|---|---|"
    printf '| keyframe (step 30) | %.2f s (%s) | %.0f MB/s | %.2f× | 1.00× |\n' "$k" "${kf[*]}" "$(mb_s "$input" "$k")" "$(calc "$k / $c")"
    printf '| keyframe, `--no-sync` | %.2f s (%s) | %.0f MB/s | %.2f× | %.2f× |\n' "$n" "${nosync[*]}" "$(mb_s "$input" "$n")" "$(calc "$n / $c")" "$(calc "$n / $k")"
    printf '| 9 residuals after it (step 120) | %.2f s (%s) | %.0f MB/s | %.2f× | **%.2f×** |\n' "$d" "${deep[*]}" "$(mb_s "$input" "$d")" "$(calc "$d / $c")" "$(calc "$d / $k")"
    printf '| branch tip `main`, depth 10 (step 130), from the tip cache | %.2f s (%s) | %.0f MB/s | %.2f× | %.2f× |\n' "$t" "${tip[*]}" "$(mb_s "$input" "$t")" "$(calc "$t / $c")" "$(calc "$t / $k")"
    printf '| `cp -r` of the checkpoint | %.2f s (%s) | %.0f MB/s | 1.00× | |\n' "$c" "${cp_times[*]}" "$(mb_s "$input" "$c")"
    echo
    echo "peak RSS of the checkouts: $rss_max MiB"
    echo
}

history() {
    local store="$work/store-10k" git_dir="$work/git-10k" ck="$work/tiny"
    if [ ! -f "$work/store-10k.done" ]; then
        echo "making a store of 10,000 commits (about 10 minutes, once)" >&2
        rm -rf "$store" "$ck"; mkdir -p "$ck"
        python3 -c "
import json, struct
h = json.dumps({'w': {'dtype': 'F32', 'shape': [64], 'data_offsets': [0, 256]}}).encode()
h += b' ' * (-len(h) % 8)
open('$ck/model.safetensors', 'wb').write(struct.pack('<Q', len(h)) + h + bytes(256))"
        "$ckptvc" --repo "$store" --quiet init --policy lossless
        for step in $(seq 1 10000); do
            echo "{\"step\": $step}" >"$ck/meta.json"
            "$ckptvc" --repo "$store" --quiet commit "$ck" --step "$step" -m "step $step" >/dev/null
        done
        touch "$work/store-10k.done"
    fi
    if [ ! -d "$git_dir" ]; then
        git init -q "$git_dir"
        { for i in $(seq 1 10000); do
            printf 'commit refs/heads/main\ncommitter b <b@b> %d +0000\ndata %d\nstep %d\n' "$i" $((${#i} + 6)) "$i"
            printf 'M 644 inline meta.json\ndata %d\n{"step": %d}\n' $((${#i} + 11)) "$i"
        done; } | git -C "$git_dir" fast-import --quiet
    fi
    local logs=() branches=() shows=() gits=()
    for _ in $(seq "$runs"); do
        gits+=("$(seconds git -C "$git_dir" log main)")
        logs+=("$(seconds "$ckptvc" --repo "$store" log)")
        branches+=("$(seconds "$ckptvc" --repo "$store" branch)")
        shows+=("$(seconds "$ckptvc" --repo "$store" show main)")
    done
    local g; g=$(median "${gits[@]}")
    echo "### History commands on 10,000 commits (median of $runs)"
    echo
    echo "| command | wall | vs \`git log\` of 10,000 commits ($(calc "$g * 1000") ms) |"
    echo "|---|---|---|"
    local name list m
    for name in log branch show; do
        case $name in log) list=("${logs[@]}") ;; branch) list=("${branches[@]}") ;; show) list=("${shows[@]}") ;; esac
        m=$(median "${list[@]}")
        printf '| `ckptvc %s` | %.0f ms (%s) | %.2f× |\n' "$name" "$(calc "$m * 1000")" "${list[*]}" "$(calc "$m / $g")"
    done
    echo
}

shards() {
    make_series
    local one="$work/store-s1" four="$work/store-s4" sharded="$work/sharded"
    rm -rf "$one" "$four" "$sharded"
    local k
    for k in 1 2; do python3 scripts/reshard.py "$series/ck-$k" "$sharded/ck-$k" 4; done
    # One store at a time: two 3 GiB stores and the shard copies at once
    # would need ~20 GB of free disk.
    local rows=() kind store dir
    for kind in one four; do
        if [ $kind = one ]; then store=$one; else store=$four; fi
        "$ckptvc" --repo "$store" --quiet init
        for k in 1 2; do
            if [ $kind = one ]; then dir="$series/ck-$k"; else dir="$sharded/ck-$k"; fi
            warm "$dir"; sync
            measure "$ckptvc" --repo "$store" --quiet commit "$dir" --step "$k"
            rows+=("$wall $rss")
        done
        rm -rf "$store"
    done
    # rows: one/keyframe, one/residual, four/keyframe, four/residual
    rows=("${rows[0]}" "${rows[2]}" "${rows[1]}" "${rows[3]}")
    echo "### One checkpoint as 2 files vs as 8 shard files (4 ranks × model/optimizer)"
    echo
    echo "| commit | 2 files | 8 shards | shards / files |"
    echo "|---|---|---|---|"
    local label i=0
    for label in keyframe residual; do
        read -r w1 r1 <<<"${rows[$i]}"; read -r w4 r4 <<<"${rows[$((i + 1))]}"
        printf '| %s | %.2f s, %d MiB | %.2f s, %d MiB | %.2f× |\n' "$label" "$w1" "$r1" "$w4" "$r4" "$(calc "$w4 / $w1")"
        i=$((i + 2))
    done
    echo
    ls "$sharded/ck-1"
    rm -rf "$one" "$four" "$sharded"
}

fixture() {
    local input; input=$(bytes_of fixtures/series/step-*)
    echo "### Fixture series (${input} bytes in 4 checkpoints)"
    echo
    echo "| policy | commit wall (4 commits) | stored blob bytes | ratio |"
    echo "|---|---|---|---|"
    local policy store="$work/store-f" start end blob
    for policy in lossless excp compact balanced faithful; do
        rm -rf "$store"
        "$ckptvc" --repo "$store" --quiet init --policy "$policy"
        start=$(date +%s.%N)
        for dir in fixtures/series/step-*; do
            "$ckptvc" --repo "$store" --quiet commit "$dir" --step $((10#${dir##*step-})) >/dev/null
        done
        end=$(date +%s.%N)
        blob=$("$ckptvc" --repo "$store" --json stats | json_field "['blob_bytes']")
        printf '| %s | %.2f s | %s | %.2f× |\n' "$policy" "$(calc "$end - $start")" "$blob" "$(calc "$input / $blob")"
    done
    local z="$work/zstd-f"; rm -rf "$z"
    for dir in fixtures/series/step-*; do
        mkdir -p "$z/${dir##*/}"
        zstd -q -3 -f "$dir"/* --output-dir-flat "$z/${dir##*/}"
    done
    printf '| (zstd -3 of the same files) | | %s | %.2f× |\n' "$(bytes_of "$z")" "$(calc "$input / $(bytes_of "$z")")"
    rm -rf "$z" "$store"
    echo
}

machine
echo
case "${1:-all}" in
    keyframe) keyframe ;;
    lossy) lossy ;;
    checkout) checkout ;;
    history) history ;;
    shards) shards ;;
    fixture) fixture ;;
    all) fixture; keyframe; lossy; checkout; rm -rf "$work/store-l"; history; shards ;;
    *) echo "usage: $0 keyframe|lossy|checkout|history|shards|fixture|all" >&2; exit 2 ;;
esac
