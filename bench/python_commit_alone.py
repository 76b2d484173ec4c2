"""Commit from memory alone, as a training process that only commits sees it.

bench/python_commit.py times every path for each checkpoint in one process,
so each path pays for the others' writes (they push the store's tip cache
out of the page cache). This one times, per checkpoint, `torch.save` of the
state (then deletes it) and `Repo.commit` from memory, nothing else; with
`--cold` the page cache is dropped before each commit (root only), so the
commit reads its parent's reconstruction from disk. It prints each time,
the bytes the commit read from disk, and the ratio of the two times.

    python bench/python_commit_alone.py [--model-bytes N] [--checkpoints K] [--cold]
                                        [--policy P] [--dir D]
"""

import argparse
import os
import shutil
import sys

import torch

import ckptvc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from python_commit import disk_read_mib, fresh_run, series_arguments, timed, train  # noqa: E402


def drop_page_cache():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1")


def main():
    parser = argparse.ArgumentParser()
    series_arguments(parser, "~/.cache/ckptvc-bench/python-alone")
    parser.add_argument("--cold", action="store_true",
                        help="drop the page cache before each commit (needs root)")
    args = parser.parse_args()
    model, opt = fresh_run(args.dir, args.model_bytes)
    repo = ckptvc.Repo.init(os.path.join(args.dir, "store.ckptvc"), policy=args.policy)
    save_path = os.path.join(args.dir, "save.pt")
    for k in range(1, args.checkpoints + 1):
        step = k * args.steps_between
        train(model, opt, args.steps_between)
        state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
        t_save, _ = timed(lambda: torch.save(state, save_path))
        os.remove(save_path)
        if args.cold:
            drop_page_cache()
        read_before = disk_read_mib()
        t_commit, outcome = timed(lambda: repo.commit(step, model=model, optimizer=opt))
        read = disk_read_mib() - read_before
        kind = "keyframe" if outcome["keyframe"] else "residual"
        print(f"step {step} ({kind}, ratio {outcome['ratio']:.1f}): torch.save {t_save:.2f} s | "
              f"commit from memory {t_commit:.2f} s ({t_commit / t_save:.2f}x) | "
              f"read from disk {read:.0f} MiB", flush=True)
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
