#!/usr/bin/env bash
# The cheapest checkout there could be: two writers (the machine's two
# cores) putting BYTES of fresh files into the page cache, no decoding, no
# hashing, no fsync. Prints wall seconds and MB/s; removes its files.
# Usage: scripts/write_floor.sh DIR [BYTES]   (DIR on the disk checkouts go to)
set -euo pipefail
dir=$(mktemp -d "${1:?DIR}/write-floor.XXXXXX")
bytes=${2:-3218044376}
half_mib=$(( bytes / 2 / 1048576 ))
start=$(date +%s.%N)
dd if=/dev/zero of="$dir/a" bs=1M count="$half_mib" status=none &
dd if=/dev/zero of="$dir/b" bs=1M count="$half_mib" status=none &
wait
end=$(date +%s.%N)
rm -rf "$dir"
python3 -c "w=$end-$start; b=2*$half_mib*1048576; print(f'{b} bytes: wall {w:.2f} s, {b/w/1e6:.0f} MB/s')"
