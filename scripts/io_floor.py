#!/usr/bin/env python3
"""The I/O a residual commit cannot avoid, with no computation at all.

    python3 scripts/io_floor.py CHECKPOINT_DIR BASE_FILE SPARE_FILE

Two threads (the machine's two cores), 4 MiB pieces: read every file of
CHECKPOINT_DIR, read the same number of bytes of BASE_FILE (the parent's
reconstruction in the tip cache) and write them over SPARE_FILE (the reused
cache file that receives the new reconstruction). Prints wall and CPU time;
SPARE_FILE (overwritten) and BASE_FILE must be about the checkpoint's size.
"""

import os
import sys
import threading
import time

PIECE = 4 << 20


def main():
    ckpt, base, spare = sys.argv[1:4]
    files = [os.path.join(ckpt, n) for n in sorted(os.listdir(ckpt))]
    pieces, cache_at = [], 0
    for path in files:
        size = os.path.getsize(path)
        for at in range(0, size, PIECE):
            n = min(PIECE, size - at)
            pieces.append((path, at, n, cache_at))
            cache_at += n
    # The cache holds tensor bytes only, a little less than the files.
    limit = min(os.path.getsize(spare), os.path.getsize(base))
    if limit < cache_at * 0.99:
        raise SystemExit("base and spare must be about as large as the checkpoint")
    fds = {p: os.open(p, os.O_RDONLY) for p in files}
    base_fd, spare_fd = os.open(base, os.O_RDONLY), os.open(spare, os.O_WRONLY)

    def work(share):
        for path, at, n, c in share:
            os.pread(fds[path], n, at)
            m = max(0, min(n, limit - c))
            os.pwrite(spare_fd, os.pread(base_fd, m, c), c)

    t0, c0 = time.time(), os.times()
    threads = [threading.Thread(target=work, args=(pieces[k::2],)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, c1 = time.time() - t0, os.times()
    print(f"{cache_at} bytes: wall {wall:.2f} s, user {c1.user - c0.user:.2f} s, "
          f"sys {c1.system - c0.system:.2f} s, {cache_at / wall / 1e6:.0f} MB/s")


if __name__ == "__main__":
    main()
