"""Commit from memory against torch.save (issue 18's marks).

A GPT-shaped fp32 model of about MODEL_BYTES (default 1 GiB) with AdamW
state, trained for a few steps between checkpoints (real optimizer steps, so
that successive checkpoints differ as a run's do). For each of CHECKPOINTS
checkpoints, in the same process and the same page-cache state, it times:

- ``torch.save`` of {model, optimizer} to local disk (baseline): returns
  when the bytes are in the page cache;
- the same ``torch.save`` followed by ``os.fsync`` of the file: returns when
  the checkpoint is on disk, as a ckptvc commit does (its write is synced);
- today's path: ``torch.save`` of the model as safetensors and the optimizer
  as ``optimizer.pt`` into a folder, then ``ckptvc commit`` of that folder
  (the CLI, balanced), with its writes and its ``ckptvc commit`` timed
  apart;
- ``Repo.commit`` from memory (balanced), into a second store;
- ``Repo.commit_async``: how long the training loop is blocked (the
  snapshot), then the wait for the commit;
- the I/O floor of the commit from memory: the bytes it cannot avoid
  moving (a residual reads its parent's reconstruction and writes its own
  and its blobs; a keyframe writes a reconstruction and its blobs), moved
  with O_DIRECT by two threads with nothing computed;
- ``torch.save`` and today's path once more, after the commits. Each
  baseline is the faster of its two timings: the first of a step can meet a
  page cache that training left otherwise (``torch.save`` of the same bytes
  has measured 3x apart), and the marks are held against the faster.

Peak extra memory of commit and load is read from /proc/self/status (VmHWM
reset through /proc/self/clear_refs before each, where the kernel allows).

    python bench/python_commit.py [--model-bytes N] [--checkpoints K] [--dir D] [--no-reserve]

It needs torch, safetensors and the ckptvc wheel (scripts/python_test.sh
builds it); CKPTVC is the ckptvc binary for the CLI path.
"""

import argparse
import json
import mmap
import os
import shutil
import subprocess
import threading
import time

import torch

import ckptvc


def rss_mib(field="VmRSS"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def disk_read_mib():
    """Bytes this process has read from storage (not from the page cache)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_model(model_bytes):
    d = 1024
    layers = max(1, round(model_bytes / 4 / (12 * d * d)))
    blocks = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(d, 3 * d), torch.nn.Linear(3 * d, d),
                   torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d), torch.nn.LayerNorm(d)]
    return torch.nn.Sequential(*blocks)


def fresh_run(directory, model_bytes):
    """An empty `directory` and the benchmark's model with AdamW, seeded, on
    two threads (what every Python commit benchmark starts from)."""
    torch.manual_seed(0)
    torch.set_num_threads(2)
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    model = make_model(model_bytes)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def series_arguments(parser, directory):
    """The arguments of the benchmarks that commit one run's checkpoints
    (model size, their number and spacing, the policy, the work folder)."""
    parser.add_argument("--model-bytes", type=int, default=1 << 30)
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--steps-between", type=int, default=5)
    parser.add_argument("--policy", default="balanced")
    parser.add_argument("--dir", default=os.path.expanduser(directory))


def train(model, opt, steps):
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()
        opt.zero_grad(set_to_none=True)


def save_durable(state, path):
    """torch.save, then fsync: the checkpoint is on disk when it returns."""
    torch.save(state, path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def todays_path(cli, model, opt, folder, store, step):
    """Today's path: the model as safetensors and the optimizer as
    ``optimizer.pt`` into ``folder``, then ``ckptvc commit`` of it into
    ``store`` (the CLI ``cli``); the folder is removed after. Returns (its
    seconds, the seconds of its writes)."""
    from safetensors.torch import save_file
    start = time.perf_counter()
    os.makedirs(folder)
    save_file(model.state_dict(), os.path.join(folder, "model.safetensors"))
    torch.save(opt.state_dict(), os.path.join(folder, "optimizer.pt"))
    # The names file python/ckptvc_torch.py writes (docs/format.md), so
    # that the CLI pairs the moments as the memory path does.
    names = [n for n, _ in model.named_parameters()]
    with open(os.path.join(folder, "ckptvc-params.json"), "w") as f:
        json.dump({"version": 1, "params": names}, f)
    written = time.perf_counter()
    subprocess.run([cli, "--repo", store, "-q", "commit", folder, "--step", str(step)],
                   check=True, stdout=subprocess.DEVNULL)
    end = time.perf_counter()
    shutil.rmtree(folder)
    return end - start, written - start


PIECE = 4 << 20


def direct_io_floor(read_path, write_path, write_bytes):
    """Wall seconds to read ``read_path`` (None: nothing) and write
    ``write_bytes`` over ``write_path``, both with O_DIRECT, by two threads
    in 4 MiB pieces: the I/O a commit from memory cannot avoid on this disk,
    with nothing computed (the parent's reconstruction read, the new one and
    the blobs written)."""
    read_fd = os.open(read_path, os.O_RDONLY | os.O_DIRECT) if read_path else None
    write_fd = os.open(write_path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    read_bytes = os.fstat(read_fd).st_size // PIECE * PIECE if read_fd is not None else 0
    pieces = max(read_bytes, write_bytes) // PIECE

    def work(k):
        buf = mmap.mmap(-1, PIECE)  # page-aligned, as O_DIRECT needs
        for i in range(k, pieces, 2):
            if i * PIECE < read_bytes:
                os.preadv(read_fd, [buf], i * PIECE)
            if i * PIECE < write_bytes:
                os.pwritev(write_fd, [buf], i * PIECE)

    start = time.perf_counter()
    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    os.fsync(write_fd)
    seconds = time.perf_counter() - start
    for fd in (read_fd, write_fd):
        if fd is not None:
            os.close(fd)
    return seconds


def newest_tip_cache(store):
    tips = os.path.join(store, "cache", "tips")
    files = [os.path.join(tips, n) for n in os.listdir(tips) if "." not in n]
    return max(files, key=os.path.getmtime)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-bytes", type=int, default=1 << 30)
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--no-reserve", action="store_true",
                        help="do not call Repo.reserve_snapshot after the first steps "
                             "(the first commit_async then allocates its buffers)")
    parser.add_argument("--steps-between", type=int, default=5)
    parser.add_argument("--dir", default=os.path.expanduser("~/.cache/ckptvc-bench/python"))
    args = parser.parse_args()
    model, opt = fresh_run(args.dir, args.model_bytes)
    cli = os.environ.get("CKPTVC", "ckptvc")
    train(model, opt, 3)
    numel = sum(p.numel() for p in model.parameters())
    print(f"model: {numel / 1e6:.1f}M parameters, {numel * 4 / 2**30:.2f} GiB; state with AdamW "
          f"{numel * 12 / 2**30:.2f} GiB")
    memory_repo = ckptvc.Repo.init(os.path.join(args.dir, "memory.ckptvc"), policy="balanced")
    async_repo = ckptvc.Repo.init(os.path.join(args.dir, "async.ckptvc"), policy="balanced")
    for name in ("cli.ckptvc", "cli-again.ckptvc"):
        subprocess.run([cli, "--repo", os.path.join(args.dir, name), "-q", "init",
                        "--policy", "balanced"], check=True)
    if not args.no_reserve:
        # As the Trainer callback does after the first step: the buffers
        # are prepared while training goes on.
        async_repo.reserve_snapshot(model=model, optimizer=opt)
    rows = []
    # What the I/O floor writes over (see direct_io_floor).
    spare = os.path.join(args.dir, "floor-spare")
    for k in range(1, args.checkpoints + 1):
        step = k * args.steps_between
        train(model, opt, args.steps_between)
        state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
        def save():
            seconds, _ = timed(lambda: torch.save(state, os.path.join(args.dir, "save.pt")))
            os.remove(os.path.join(args.dir, "save.pt"))
            return seconds
        t_save_first = save()
        t_durable, _ = timed(lambda: save_durable(state, os.path.join(args.dir, "save.pt")))
        os.remove(os.path.join(args.dir, "save.pt"))

        def today_timed(store):
            return todays_path(cli, model, opt, os.path.join(args.dir, f"ck-{step}"),
                               os.path.join(args.dir, store), step)
        t_today_first, t_write_first = today_timed("cli.ckptvc")

        base = rss_mib()
        peak_ok = reset_peak()
        read_before = disk_read_mib()
        t_mem, outcome = timed(lambda: memory_repo.commit(step, model=model, optimizer=opt))
        extra_commit = rss_mib("VmHWM") - base if peak_ok else float("nan")
        # Its parent's reconstruction (the tip cache) read from disk where
        # the other paths' writes pushed it out of the page cache.
        disk_read = disk_read_mib() - read_before

        t_block, handle = timed(lambda: async_repo.commit_async(step, model=model, optimizer=opt))
        t_wait, _ = timed(handle.wait)
        # The I/O floor of the commit from memory, just measured: a residual
        # reads its parent's reconstruction (here the commit's own, just
        # written: the same size, and not in the page cache) and writes its
        # own over it, as a commit along a branch does, and its blobs; a
        # keyframe writes a new reconstruction and its blobs.
        cache = newest_tip_cache(os.path.join(args.dir, "memory.ckptvc"))
        cache_bytes = os.path.getsize(cache) // PIECE * PIECE
        if outcome["keyframe"] and os.path.exists(spare):
            os.remove(spare)
        t_floor = direct_io_floor(None if outcome["keyframe"] else cache, spare,
                                  cache_bytes + outcome["stored_bytes"] // PIECE * PIECE)
        # The baselines once more, after the commits: the first of a step
        # meets a page cache its training left otherwise (torch.save has
        # measured 3x apart for the same bytes), and the faster of the two
        # is the one the marks are held against.
        t_save = min(t_save_first, save())
        t_today, t_write = min((t_today_first, t_write_first), today_timed("cli-again.ckptvc"))

        rows.append(dict(step=step, save=t_save, save_first=t_save_first, today_first=t_today_first,
                         durable=t_durable, today=t_today, today_write=t_write,
                         io_floor=t_floor, memory=t_mem, block=t_block, wait=t_wait,
                         keyframe=outcome["keyframe"], ratio=outcome["ratio"],
                         extra_commit_mib=extra_commit, disk_read_mib=disk_read))
        r = rows[-1]
        print(f"step {step}: torch.save {t_save:.2f} s (first {t_save_first:.2f} s) | "
              f"torch.save+fsync {t_durable:.2f} s "
              f"(commit from memory {t_mem / t_durable:.2f}x) | save+ckptvc commit {t_today:.2f} s "
              f"(first {t_today_first:.2f} s; its writes {t_write:.2f} s, "
              f"its ckptvc commit {t_today - t_write:.2f} s) | "
              f"commit from memory {t_mem:.2f} s (its direct I/O alone {t_floor:.2f} s) "
              f"({t_mem / t_save:.2f}x save, "
              f"{t_mem / t_today:.2f}x today's) | async blocks {t_block:.2f} s "
              f"({t_block / t_save:.2f}x save), then {t_wait:.2f} s | "
              f"{'keyframe' if r['keyframe'] else 'residual'}, ratio {r['ratio']:.1f} | "
              f"commit extra memory {extra_commit:.0f} MiB, read from disk {disk_read:.0f} MiB",
              flush=True)

    if os.path.exists(spare):
        os.remove(spare)

    # Load into the live model: extra memory and a bit-exact check against a
    # lossless commit of the same state.
    lossless = ckptvc.Repo.init(os.path.join(args.dir, "lossless.ckptvc"), policy="lossless")
    lossless.commit(1, model=model, optimizer=opt)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    base = rss_mib()
    peak_ok = reset_peak()
    t_load, _ = timed(lambda: lossless.load("1", model))
    extra_load = rss_mib("VmHWM") - base if peak_ok else float("nan")
    exact = all(torch.equal(reference[k], v) for k, v in model.state_dict().items())
    print(f"load of the model (lossless) {t_load:.2f} s, bit-identical: {exact}, "
          f"extra memory {extra_load:.0f} MiB")
    base = rss_mib()
    peak_ok = reset_peak()
    t_opt, _ = timed(lambda: lossless.load("1", model, opt))
    extra_opt = rss_mib("VmHWM") - base if peak_ok else float("nan")
    print(f"load of model and optimizer {t_opt:.2f} s, extra memory {extra_opt:.0f} MiB "
          f"(its state, {numel * 8 / 2**20:.0f} MiB, decoded into the optimizer's tensors)")


if __name__ == "__main__":
    main()
