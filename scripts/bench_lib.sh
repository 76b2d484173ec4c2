# Shell helpers shared by scripts/bench.sh and bench/bench.sh (sourced).
# Callers set $work, a directory for scratch files.

calc() { awk "BEGIN { print $1 }"; }

# Wall seconds of a command (its output discarded).
seconds() {
    local start end
    start=$(date +%s.%N)
    "$@" >/dev/null
    end=$(date +%s.%N)
    calc "$end - $start"
}

# Runs a command under GNU time, its output into $work/out.txt; sets $wall
# (seconds) and $rss_kib (peak resident set size).
timed() {
    local log="$work/time.log"
    /usr/bin/time -v -o "$log" "$@" >"$work/out.txt"
    rss_kib=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$log")
    wall=$(awk -F': ' '/Elapsed \(wall clock\)/ { print $2 }' "$log" |
        awk -F: '{ if (NF == 3) print $1 * 3600 + $2 * 60 + $3; else print $1 * 60 + $2 }')
}

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
bytes_of() { du -sb "$@" | awk '{ s += $1 } END { print s }'; }
json_field() { python3 -c "import json, sys; print(json.load(sys.stdin)$1)"; }
