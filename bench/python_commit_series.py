"""Commits from memory only, timed: the benchmark's model, K checkpoints.

What `scripts/bench_ab_python.sh` runs for each build of the library: no
other path writes to the disk in between, so the parent's reconstruction
stays in the page cache, as in a training process that only commits. With
`--perf FILE`, `perf record` samples the last commit (needs perf). With
`--cold`, the store's reconstruction caches are written back and dropped
from the page cache before each commit (`posix_fadvise(DONTNEED)`), as in a
training process whose memory pushed them out: the parent's reconstruction
is then read from disk.

With `--today CKPTVC`, each checkpoint goes today's path instead (its
files written into a folder, then `ckptvc commit` of it by the binary
CKPTVC), so that the two paths can be compared each in a process of its
own, neither evicting the other's reconstruction from the page cache.

    python bench/python_commit_series.py [--checkpoints K] [--policy P] [--perf FILE] [--cold]
                                         [--today CKPTVC]
"""

import argparse
import os
import signal
import subprocess
import sys
import time

import ckptvc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from python_commit import (  # noqa: E402
    disk_read_mib, fresh_run, series_arguments, timed, todays_path, train)


def drop_cached_tips(store):
    """Writes back and evicts every reconstruction cache file of `store`."""
    tips = os.path.join(store, "cache", "tips")
    for name in os.listdir(tips) if os.path.isdir(tips) else []:
        fd = os.open(os.path.join(tips, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main():
    parser = argparse.ArgumentParser()
    series_arguments(parser, "~/.cache/ckptvc-bench/python-series")
    parser.add_argument("--perf", help="perf record the last commit into this file")
    parser.add_argument("--cold", action="store_true",
                        help="evict the store's reconstruction caches before each commit")
    parser.add_argument("--today", metavar="CKPTVC",
                        help="commit by today's path with this ckptvc binary instead")
    args = parser.parse_args()
    model, opt = fresh_run(args.dir, args.model_bytes)
    store = os.path.join(args.dir, "store.ckptvc")
    if args.today:
        subprocess.run([args.today, "--repo", store, "-q", "init", "--policy", args.policy],
                       check=True)
    else:
        repo = ckptvc.Repo.init(store, policy=args.policy)
    for k in range(1, args.checkpoints + 1):
        step = k * args.steps_between
        train(model, opt, args.steps_between)
        perf = None
        if args.perf and k == args.checkpoints:
            perf = subprocess.Popen(["perf", "record", "-F", "999", "-p", str(os.getpid()),
                                     "-o", args.perf],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        if args.cold:
            drop_cached_tips(store)
        read_before = disk_read_mib()
        cpu_before = os.times()
        if args.today:
            seconds, written = todays_path(args.today, model, opt,
                                           os.path.join(args.dir, f"ck-{step}"), store, step)
        else:
            seconds, outcome = timed(lambda: repo.commit(step, model=model, optimizer=opt))
        cpu_after = os.times()
        read = disk_read_mib() - read_before
        # The CLI's CPU time is its child's.
        user = (cpu_after.user - cpu_before.user
                + cpu_after.children_user - cpu_before.children_user)
        system = (cpu_after.system - cpu_before.system
                  + cpu_after.children_system - cpu_before.children_system)
        if perf:
            perf.send_signal(signal.SIGINT)
            perf.wait()
        usage = f"user {user:.2f} s, system {system:.2f} s, read from disk {read:.0f} MiB"
        if args.today:
            print(f"step {step}: today's path {seconds:.2f} s (its writes {written:.2f} s, "
                  f"its ckptvc commit {seconds - written:.2f} s; {usage})", flush=True)
            continue
        kind = "keyframe" if outcome["keyframe"] else "residual"
        print(f"step {step} ({kind}, ratio {outcome['ratio']:.1f}): commit from memory "
              f"{seconds:.2f} s ({usage})", flush=True)


if __name__ == "__main__":
    main()
