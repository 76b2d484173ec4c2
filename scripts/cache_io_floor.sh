#!/usr/bin/env bash
# What moving a reconstruction cache's bytes costs this machine, each way:
# buffered and O_DIRECT reads of a cold file, buffered writes over cached
# and over uncached pages, direct writes, and a direct read and write at
# once (docs/benchmarks.md, "A cold reconstruction cache"). `dd` reports the
# throughput, `time` the system seconds.
#
# Usage: scripts/cache_io_floor.sh FILE   (a large file, e.g. a cache file
#   under <store>/cache/tips; it is read, and a copy beside it written)
set -euo pipefail
src=$1
copy="$src.floor-copy"
trap 'rm -f "$copy"' EXIT
evict() {
    python3 -c 'import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY); os.fsync(fd)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)' "$1"
}
run() {
    echo "== $1"
    shift
    { time "$@" 2>&1 | tail -1; } 2>&1 | grep -v '^$' | grep -v '^user'
}
cp "$src" "$copy"
# The writes copy zeros, so that only the file written costs anything.
blocks=$(($(stat -c %s "$src") / (4 << 20)))
zeros=(if=/dev/zero bs=4M count="$blocks")
evict "$src"
run "buffered read, cold" dd if="$src" of=/dev/null bs=64M
evict "$src"
run "direct read, cold" dd if="$src" of=/dev/null bs=4M iflag=direct
cat "$copy" >/dev/null
run "buffered write over cached pages" dd "${zeros[@]}" of="$copy" conv=notrunc
evict "$copy"
run "buffered write over uncached pages" dd "${zeros[@]}" of="$copy" conv=notrunc
sync
run "direct write" dd "${zeros[@]}" of="$copy" oflag=direct conv=notrunc
evict "$src"
echo "== direct read and direct write at once"
dd if="$src" of=/dev/null bs=4M iflag=direct 2>&1 | tail -1 &
dd "${zeros[@]}" of="$copy" oflag=direct conv=notrunc 2>&1 | tail -1
wait
