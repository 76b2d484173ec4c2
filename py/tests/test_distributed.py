"""Sharded commits from memory by the ranks of a real FSDP2 run (torchrun,
gloo, two CPU processes; `fsdp_worker.py`). Skipped where torch or its
FSDP2 is not installed."""

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.fsdp", reason="torch without FSDP")
if not hasattr(__import__("torch.distributed.fsdp").distributed.fsdp, "fully_shard"):
    pytest.skip("torch without FSDP2 (fully_shard)", allow_module_level=True)

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fsdp_worker.py")


def run_ranks(tmp_path, policy, ranks=2):
    out = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={ranks}", WORKER, str(tmp_path / "store"), policy, str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def test_fsdp2_ranks_commit_one_step_and_resume_bit_identically(tmp_path):
    reports = run_ranks(tmp_path, "lossless")
    for rank, r in enumerate(reports):
        assert r["extra"] == {"rank": rank}
        assert r["log_steps"] == [30, 20, 10]  # one commit per step, not one per rank
        assert r["files"] == [f"rank{k}/{f}" for k in range(2)
                              for f in ("ckptvc-state.pkl", "model.safetensors",
                                        "optimizer.safetensors")]
        assert r["state_is_dtensor"] and r["moments_equal"]
        assert r["continues_identically"]
    # Each step was sealed by whichever rank came last; a rank before it
    # saw its shard pending.
    for step in range(3):
        assert any(r["sealed"][step] for r in reports)
    # Uneven shards, and an empty one (the 1-element bias on rank 1).
    assert reports[0]["shapes"]["0.weight"] == [129, 96]
    assert reports[1]["shapes"]["0.weight"] == [128, 96]
    assert reports[1]["shapes"]["4.bias"] == [0]


def test_fsdp2_ranks_restore_within_what_show_reports(tmp_path):
    reports = run_ranks(tmp_path, "balanced")
    lossy = 0
    for r in reports:
        assert r["state_is_dtensor"]
        for name, (measured, reported) in r["errors"].items():
            assert reported is not None, name
            assert measured == pytest.approx(reported, rel=1e-3, abs=1e-6), name
            lossy += measured > 0
    assert lossy >= 8  # the weights and biases of both ranks, but the empty shard
