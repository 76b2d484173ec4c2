#!/usr/bin/env bash
# Remote benchmarks (docs/benchmarks.md, "Remotes"), against a local
# SeaweedFS started here (scripts/s3-server.sh) and `aws s3 cp` (awscli from
# PyPI) as the baseline, both measured in this invocation:
#
#   scripts/bench_remote.sh push   push of one lossy commit vs `aws s3 cp
#                                  --recursive` of the raw checkpoint folder
#   scripts/bench_remote.sh lazy   lazy clone + checkout of step 5 of a 10-step
#                                  run: bytes downloaded against what the step
#                                  occupies (with its bases), and time against
#                                  `aws s3 cp --recursive` downloading the raw
#                                  folder
#   scripts/bench_remote.sh rss    peak RSS of push, clone, checkout of a
#                                  4 GiB checkpoint
#   scripts/bench_remote.sh keyframe  push of a 4 GiB lossless keyframe vs
#                                  `aws s3 cp --recursive` of its folder
#
# Environment: BENCH_DIR (default ~/.cache/ckptvc-bench), RUNS (default 3),
# MODEL_BYTES (model size of the 10-step run, default 64 MiB: checkpoints of
# 3 × that), BIG_MODEL_BYTES (default 4 GiB / 3), S3_PORT (default 18600).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$(./scripts/setup.sh)"
cargo build --release --quiet --bin ckptvc --examples
bin="$CARGO_TARGET_DIR/release"
ckptvc="$bin/ckptvc"
work="${BENCH_DIR:-$HOME/.cache/ckptvc-bench}/remote"
runs="${RUNS:-3}"
model_bytes="${MODEL_BYTES:-$((64 << 20))}"
big_model_bytes="${BIG_MODEL_BYTES:-$(((4 << 30) / 3))}"
port="${S3_PORT:-18600}"
mkdir -p "$work"
source scripts/bench_lib.sh

command -v aws >/dev/null || python3 -m pip install --quiet awscli >&2
s3_dir="$work/s3"
rm -rf "$s3_dir"
s3_env="$(scripts/s3-server.sh start "$s3_dir" "$port" bench)"
trap 'scripts/s3-server.sh stop "$s3_dir" || true' EXIT
eval "$s3_env"
aws_cp() { aws --endpoint-url "$AWS_ENDPOINT_URL" s3 cp --recursive --quiet "$@"; }
aws_rm() { aws --endpoint-url "$AWS_ENDPOINT_URL" s3 rm --recursive --quiet "$@" >/dev/null; }

series="$work/series-$model_bytes"
if [ ! -f "$series/ck-10/meta.json" ]; then
    echo "making a 10-checkpoint run in $series" >&2
    "$bin/examples/make_series" "$series" "$model_bytes" 10 >&2
fi

# A balanced store with ck-1..ck-N committed (steps 1..N).
store_with() {
    local store="$1" n="$2"
    rm -rf "$store"
    "$ckptvc" --repo "$store" -q init --policy balanced
    for i in $(seq "$n"); do
        "$ckptvc" --repo "$store" -q commit "$series/ck-$i" --step "$i" >/dev/null
    done
}

bench_push() {
    echo "## push of one lossy commit vs aws s3 cp --recursive of its folder"
    echo
    echo "| run | ckptvc push (s) | aws s3 cp (s) | ratio | blobs sent | PUTs | bytes up |"
    echo "|---|---|---|---|---|---|---|"
    local ratios=()
    for r in $(seq "$runs"); do
        local store="$work/store-push"
        store_with "$store" 9
        local url="s3://bench/push-$r-$RANDOM"
        "$ckptvc" --repo "$store" -q remote add o "$url"
        "$ckptvc" --repo "$store" -q push o
        "$ckptvc" --repo "$store" -q commit "$series/ck-10" --step 10 >/dev/null
        cat "$series/ck-10"/* >/dev/null
        local t_push t_aws
        timed "$ckptvc" --repo "$store" --json push o
        t_push=$wall
        local sent puts up
        sent=$(json_field '["blobs_sent"]' <"$work/out.txt")
        puts=$(json_field '["traffic"]["puts"]' <"$work/out.txt")
        up=$(json_field '["traffic"]["bytes_up"]' <"$work/out.txt")
        t_aws=$(seconds aws_cp "$series/ck-10" "s3://bench/raw-$r-$RANDOM")
        local ratio; ratio=$(calc "$t_push / $t_aws")
        ratios+=("$ratio")
        echo "| $r | $t_push | $t_aws | $ratio | $sent | $puts | $up |"
    done
    echo
    echo "median ratio push / aws s3 cp: $(median "${ratios[@]}")"
    echo
}

bench_lazy() {
    echo "## lazy clone + checkout of step 5 of 10 vs aws s3 cp --recursive download"
    echo
    local store="$work/store-lazy"
    store_with "$store" 10
    local url="s3://bench/lazy-$RANDOM"
    "$ckptvc" --repo "$store" -q remote add o "$url"
    "$ckptvc" --repo "$store" -q push o
    local raw_url="s3://bench/raw5-$RANDOM"
    aws_cp "$series/ck-5" "$raw_url"
    local raw_bytes; raw_bytes=$(bytes_of "$series/ck-5")
    echo "| run | clone+checkout (s) | aws download (s) | time ratio | wire bytes | step's blobs + bases | bytes ratio |"
    echo "|---|---|---|---|---|---|---|"
    local tratios=() bratios=()
    for r in $(seq "$runs"); do
        local clone="$work/clone-$r" out="$work/out-$r" rawout="$work/raw-$r"
        rm -rf "$clone" "$out" "$rawout" "$HOME/.cache/ckptvc"
        local start end t_ck t_aws
        start=$(date +%s.%N)
        "$ckptvc" --repo "$clone" --json clone "$url" "$clone" --lazy >"$work/clone.json"
        "$ckptvc" --repo "$clone" --json checkout main@5 --output "$out" --no-sync >"$work/checkout.json"
        end=$(date +%s.%N)
        t_ck=$(calc "$end - $start")
        t_aws=$(seconds aws_cp "$raw_url" "$rawout")
        local wire needed
        wire=$(( $(json_field '["fetch"]["traffic"]["bytes_down"]' <"$work/clone.json") + $(json_field '["bytes_downloaded"]' <"$work/checkout.json") ))
        needed=$("$ckptvc" --repo "$clone" --json stats | json_field '["blob_bytes"]')
        local tr br; tr=$(calc "$t_ck / $t_aws"); br=$(calc "$wire / $needed")
        tratios+=("$tr"); bratios+=("$br")
        echo "| $r | $t_ck | $t_aws | $tr | $wire | $needed | $br |"
    done
    echo
    echo "raw step: $raw_bytes bytes; median time ratio $(median "${tratios[@]}") (throughput ratio = 1 / that), median bytes ratio $(median "${bratios[@]}")"
    echo
}

bench_rss() {
    echo "## peak RSS with a 4 GiB checkpoint"
    echo
    local big="$work/big-$big_model_bytes"
    if [ ! -f "$big/ck-1/meta.json" ]; then
        "$bin/examples/make_series" "$big" "$big_model_bytes" 1 >&2
    fi
    local store="$work/store-big" clone="$work/clone-big" out="$work/out-big"
    rm -rf "$store" "$clone" "$out"
    "$ckptvc" --repo "$store" -q init --policy lossless
    "$ckptvc" --repo "$store" -q commit "$big/ck-1" --step 1 >/dev/null
    local url="s3://bench/big-$RANDOM"
    "$ckptvc" --repo "$store" -q remote add o "$url"
    echo "| operation | input | wall (s) | peak RSS (MiB) |"
    echo "|---|---|---|---|"
    local input; input=$(bytes_of "$big/ck-1")
    timed "$ckptvc" --repo "$store" -q push o
    echo "| push | $input | $wall | $((rss_kib / 1024)) |"
    timed "$ckptvc" --repo "$clone" -q clone "$url" "$clone" --lazy
    echo "| clone --lazy | | $wall | $((rss_kib / 1024)) |"
    timed "$ckptvc" --repo "$clone" -q checkout 1 --output "$out" --no-sync
    echo "| checkout (downloads the step) | | $wall | $((rss_kib / 1024)) |"
    rm -rf "$clone"
    timed "$ckptvc" --repo "$clone" -q clone "$url" "$clone"
    echo "| clone (full) | | $wall | $((rss_kib / 1024)) |"
    echo
}

bench_keyframe() {
    echo "## push of a 4 GiB lossless keyframe vs aws s3 cp --recursive of its folder"
    echo
    local big="$work/big-$big_model_bytes"
    if [ ! -f "$big/ck-1/meta.json" ]; then
        "$bin/examples/make_series" "$big" "$big_model_bytes" 1 >&2
    fi
    local store="$work/store-key"
    rm -rf "$store"
    "$ckptvc" --repo "$store" -q init --policy lossless
    "$ckptvc" --repo "$store" -q commit "$big/ck-1" --step 1 >/dev/null
    echo "| run | ckptvc push (s) | aws s3 cp (s) | ratio | bytes up (ckptvc) | input |"
    echo "|---|---|---|---|---|---|"
    local input; input=$(bytes_of "$big/ck-1")
    local ratios=()
    for r in $(seq "$runs"); do
        "$ckptvc" --repo "$store" -q remote remove o 2>/dev/null || true
        "$ckptvc" --repo "$store" -q remote add o "s3://bench/key-$r-$RANDOM"
        timed "$ckptvc" --repo "$store" --json push o
        local t_push=$wall up
        up=$(json_field '["traffic"]["bytes_up"]' <"$work/out.txt")
        local t_aws; t_aws=$(seconds aws_cp "$big/ck-1" "s3://bench/rawkey-$r-$RANDOM")
        local ratio; ratio=$(calc "$t_push / $t_aws")
        ratios+=("$ratio")
        echo "| $r | $t_push | $t_aws | $ratio | $up | $input |"
    done
    echo
    echo "median ratio push / aws s3 cp: $(median "${ratios[@]}")"
    echo
}

case "${1:-all}" in
    push) bench_push ;;
    lazy) bench_lazy ;;
    rss) bench_rss ;;
    keyframe) bench_keyframe ;;
    all) bench_push; bench_lazy; bench_rss; bench_keyframe ;;
    *) echo "usage: $0 push|lazy|rss|keyframe|all" >&2; exit 2 ;;
esac
