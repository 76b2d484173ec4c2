"""The Python package with numpy only: commit from memory, load into memory,
and bad input. Run against the built wheel (`.ci/run` installs it in a fresh
virtualenv)."""

import fcntl
import mmap
import os
import subprocess
import sys

import numpy as np
import pytest

import ckptvc


def model_and_moments(seed: int, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    model = {
        "embed.weight": rng.standard_normal((256, 64), dtype=np.float32),
        "head.weight": rng.standard_normal((64, 128), dtype=np.float32) + shift,
        "head.bias": np.zeros(128, dtype=np.float32),
        "steps_seen": np.array([seed], dtype=np.int64),
    }
    optimizer = {
        name: {
            "exp_avg": rng.standard_normal(model[name].shape, dtype=np.float32) * 1e-3,
            "exp_avg_sq": np.abs(rng.standard_normal(model[name].shape, dtype=np.float32)) * 1e-6,
        }
        for name in ("embed.weight", "head.weight", "head.bias")
    }
    return model, optimizer


def drift(model, seed):
    """The next checkpoint of a run: every weight moves a little."""
    out = {k: v.copy() for k, v in model.items()}
    rng = np.random.default_rng(seed)
    for k, v in out.items():
        if v.dtype == np.float32:
            v += rng.standard_normal(v.shape, dtype=np.float32) * 1e-3
    return out


def run_states(seed, count):
    """`count` checkpoints of a run: weights drift, moments decay."""
    states = [model_and_moments(seed)]
    for step in range(1, count):
        m = drift(states[-1][0], step)
        o = {p: {k: a * 0.9 + 1e-5 for k, a in keys.items()} for p, keys in states[-1][1].items()}
        states.append((m, o))
    return states


def assert_model_within_show(restored, model, reported):
    """Every f32 tensor of ``model`` restored within the error ``show``
    reported for it (``reported(name)``); every other tensor exactly."""
    for name, array in model.items():
        got = restored[name]
        if array.dtype != np.float32:
            assert np.array_equal(got, array)
            continue
        err = np.linalg.norm(got - array) / max(np.linalg.norm(array), 1e-30)
        assert err <= reported(name) * 1.001 + 1e-9, (name, err, reported(name))


def test_lossless_round_trip_is_bit_identical(tmp_path):
    repo = ckptvc.Repo.init(tmp_path / "store", policy="lossless")
    model, optimizer = model_and_moments(1)
    extra = {"scheduler": {"last_epoch": 7, "lrs": (1e-3, 5e-4)}, "rng": b"\x00\x01"}
    outcome = repo.commit(10, model=model, optimizer=optimizer, extra=extra, message="first")
    assert outcome["step"] == 10 and outcome["branch"] == "main"
    state = repo.state_dict("main@10")
    for name, array in model.items():
        assert state["model"][name].dtype == array.dtype
        assert np.array_equal(state["model"][name], array), name
    for name, keys in optimizer.items():
        for key, array in keys.items():
            assert np.array_equal(state["optimizer"][name][key], array), (name, key)
    assert state["extra"] == extra  # tuples and bytes come back as they were
    assert [e["step"] for e in repo.log()] == [10]
    assert repo.show("10")["message"] == "first"


def test_load_writes_into_the_callers_arrays(tmp_path):
    repo = ckptvc.Repo.init(tmp_path / "store", policy="lossless")
    model, optimizer = model_and_moments(2)
    repo.commit(1, model=model, optimizer=optimizer)
    target = {k: np.zeros_like(v) for k, v in model.items()}
    target_opt = {p: {k: np.zeros_like(a) for k, a in keys.items()} for p, keys in optimizer.items()}
    before = {k: v.__array_interface__["data"][0] for k, v in target.items()}
    extra = repo.load("1", target, target_opt)
    assert extra is None
    for k, v in target.items():
        assert v.__array_interface__["data"][0] == before[k], "decoded in place"
        assert np.array_equal(v, model[k])
    assert np.array_equal(target_opt["head.weight"]["exp_avg"], optimizer["head.weight"]["exp_avg"])


def test_lossy_policy_pairs_moments_and_stays_within_what_show_reports(tmp_path):
    repo = ckptvc.Repo.init(tmp_path / "store", policy="balanced")
    states = run_states(3, 4)
    for step, (m, o) in enumerate(states):
        repo.commit(step * 10, model=m, optimizer=o)
    show = repo.show("30")
    assert not show["keyframe"]
    errors = {e["tensor"]: e["rel_error"] for e in show["entries"] if e["tensor"]}
    state = repo.state_dict("30")
    m, o = states[3]
    assert_model_within_show(state["model"], m, lambda name: errors[name])
    for name, keys in o.items():
        for key, array in keys.items():
            got = state["optimizer"][name][key]
            err = np.linalg.norm(got - array) / max(np.linalg.norm(array), 1e-30)
            assert err <= errors[f"{name}.{key}"] * 1.001 + 1e-9


def adam_update(m, v):
    return m.astype(np.float64) / (np.sqrt(np.maximum(v.astype(np.float64), 0.0)) + 1e-8)


def test_show_reports_the_error_in_adams_update(tmp_path):
    repo = ckptvc.Repo.init(tmp_path / "store", policy="balanced")
    states = run_states(5, 3)
    for step, (m, o) in enumerate(states):
        repo.commit(step * 10, model=m, optimizer=o)
    assert repo.show("0")["update_error"] is None, "a keyframe is exact"
    show = repo.show("20")
    reported = {e["tensor"]: e["update_error"] for e in show["entries"] if e["tensor"]}
    restored = repo.state_dict("20")["optimizer"]
    _, o = states[2]
    sums = np.zeros(4)
    measured_any = False
    for name, keys in o.items():
        m, v = keys["exp_avg"], keys["exp_avg_sq"]
        m_hat, v_hat = restored[name]["exp_avg"], restored[name]["exp_avg_sq"]
        u = adam_update(m, v)
        shares = [adam_update(m_hat, v) - u, adam_update(m, v_hat) - u, adam_update(m_hat, v_hat) - u]
        squares = [float((d ** 2).sum()) for d in shares]
        norm = float((u ** 2).sum())
        keys_of = [f"{name}.exp_avg", f"{name}.exp_avg_sq", name]
        if reported[keys_of[0]] is None:
            # Not coded lossily: nothing to report, and nothing changed.
            assert np.array_equal(m_hat, m) and np.array_equal(v_hat, v), name
            continue
        measured_any = True
        for key, square in zip(keys_of, squares):
            expected = np.sqrt(square / norm)
            assert abs(reported[key] - expected) <= 1e-3 * expected + 1e-6, (key, reported[key], expected)
        sums += np.array(squares + [norm])
    assert measured_any
    totals = show["update_error"]
    for key, square in zip(["m", "v", "both"], sums[:3]):
        expected = np.sqrt(square / sums[3])
        assert abs(totals[key] - expected) <= 1e-3 * expected + 1e-6, (key, totals[key], expected)
    assert totals["m"] > 0 and totals["v"] > 0


def test_non_contiguous_arrays_are_copied_not_refused(tmp_path):
    repo = ckptvc.Repo.init(tmp_path / "store", policy="lossless")
    base = np.arange(200, dtype=np.float32).reshape(10, 20)
    view = base[:, ::2]  # not contiguous
    assert not view.flags.c_contiguous
    repo.commit(1, model={"w": view})
    assert np.array_equal(repo.state_dict("1")["model"]["w"], view)


def test_shape_or_dtype_mismatch_on_load_raises_before_writing(tmp_path):
    repo = ckptvc.Repo.init(tmp_path / "store", policy="lossless")
    repo.commit(1, model={"w": np.ones((4, 4), dtype=np.float32)})
    wrong_shape = {"w": np.zeros((4, 5), dtype=np.float32)}
    with pytest.raises(ckptvc.CkptvcError, match=r"F32 \[4, 4\] in the commit, but F32 \[4, 5\]"):
        repo.load("1", wrong_shape)
    assert not wrong_shape["w"].any()
    with pytest.raises(ckptvc.CkptvcError, match="F64"):
        repo.load("1", {"w": np.zeros((4, 4), dtype=np.float64)})
    with pytest.raises(ckptvc.CkptvcError, match="no tensor `nope`"):
        repo.load("1", {"nope": np.zeros(1, dtype=np.float32)})


def test_errors_are_exceptions_with_the_cli_message_and_a_kind(tmp_path):
    repo = ckptvc.Repo.init(tmp_path / "store", policy="lossless")
    repo.commit(5, model={"w": np.ones(8, dtype=np.float32)})
    with pytest.raises(ckptvc.CkptvcError) as info:
        repo.commit(5, model={"w": np.ones(8, dtype=np.float32)})
    assert info.value.kind == "step_exists"
    assert "step 5 already exists on branch `main`" in str(info.value)
    with pytest.raises(ckptvc.CkptvcError) as info:
        repo.show("nosuch")
    assert info.value.kind == "unknown_revision"
    with pytest.raises(ckptvc.CkptvcError) as info:
        ckptvc.Repo.open(tmp_path / "missing")
    assert info.value.kind == "not_a_store"
    with pytest.raises(ckptvc.CkptvcError, match="tensor `w`"):
        repo.commit(6, model={"w": np.ones(3, dtype=np.complex64)})
    # The refused commits changed nothing.
    assert [e["step"] for e in repo.log()] == [5]


def test_a_second_writer_is_refused_and_the_store_is_unchanged(tmp_path):
    store = tmp_path / "store"
    repo = ckptvc.Repo.init(store, policy="lossless")
    repo.commit(1, model={"w": np.ones(8, dtype=np.float32)})
    with open(store / "lock", "r+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another writer holds the store
        with pytest.raises(ckptvc.CkptvcError) as info:
            repo.commit(2, model={"w": np.zeros(8, dtype=np.float32)})
        assert info.value.kind == "locked"
    assert [e["step"] for e in repo.log()] == [1]
    repo.commit(2, model={"w": np.zeros(8, dtype=np.float32)})
    assert [e["step"] for e in repo.log()] == [2, 1]


def test_a_closed_repository_raises(tmp_path):
    repo = ckptvc.Repo.init(tmp_path / "store")
    repo.close()
    with pytest.raises(ckptvc.CkptvcError, match="closed"):
        repo.log()


def test_commit_async_returns_a_handle_and_surfaces_errors(tmp_path):
    repo = ckptvc.Repo.init(tmp_path / "store", policy="lossless")
    model, optimizer = model_and_moments(4)
    handle = repo.commit_async(1, model=model, optimizer=optimizer)
    # The snapshot was taken: changing the arrays now does not change the commit.
    model["head.bias"][:] = 42.0
    outcome = handle.wait()
    assert outcome["step"] == 1
    assert not repo.state_dict("1")["model"]["head.bias"].any()
    # The next snapshot reuses the first one's buffers: its own values land.
    repo.commit_async(2, model=model, optimizer=optimizer).wait()
    assert (repo.state_dict("2")["model"]["head.bias"] == 42.0).all()
    assert not repo.state_dict("1")["model"]["head.bias"].any()
    failing = repo.commit_async(1, model={"w": np.ones(2, dtype=np.float32)})
    with pytest.raises(ckptvc.CkptvcError, match="already exists"):
        failing.wait()
    # A second call waits for the first and raises its error.
    repo.commit_async(1, model={"w": np.ones(2, dtype=np.float32)})
    with pytest.raises(ckptvc.CkptvcError, match="already exists"):
        repo.commit(3, model={"w": np.ones(2, dtype=np.float32)})
    repo.commit(3, model={"w": np.ones(2, dtype=np.float32)})


def mapping_of(array):
    """The mmap under an array's chain of views, if any (numpy keeps a
    memoryview of the buffer it was made from)."""
    base = array.base
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return base if isinstance(base, mmap.mmap) else None


def test_reserved_snapshot_buffers_are_the_ones_commit_async_fills(tmp_path):
    repo = ckptvc.Repo.init(tmp_path / "store", policy="lossless")
    model, optimizer = model_and_moments(5)
    # Large enough for a mapped buffer (2 MiB), beside numpy-allocated small ones.
    model["big"] = np.arange(512 * 1024, dtype=np.float32)
    repo.reserve_snapshot(model=model, optimizer=optimizer)
    thread, reserved = repo._reserving
    thread.join()
    handle = repo.commit_async(1, model=model, optimizer=optimizer)
    buffers = repo._pool.buffers
    assert reserved and all(buffers[key] is buffer for key, buffer in reserved.items())
    big = buffers[("model.safetensors", "big")]
    assert isinstance(mapping_of(big), mmap.mmap)  # not numpy's allocator (huge pages)
    assert mapping_of(buffers[("model.safetensors", "head.bias")]) is None
    assert handle.wait()["step"] == 1
    # Every tensor went through a reserved buffer, and the commit holds the values.
    assert set(buffers) == {("model.safetensors", n) for n in model} | {
        ("optimizer.safetensors", f"{n}.{k}") for n in optimizer for k in optimizer[n]
    }
    state = repo.state_dict("1")
    for name, array in model.items():
        assert np.array_equal(state["model"][name], array), name
    # Values changed after the snapshot land in the next commit, through the
    # same buffer.
    model["big"][:] = -1.0
    repo.commit_async(2, model=model, optimizer=optimizer).wait()
    assert repo._pool.buffers[("model.safetensors", "big")] is big
    assert (repo.state_dict("2")["model"]["big"] == -1.0).all()
    assert state["model"]["big"][7] == 7.0
    # A reservation for other shapes replaces those buffers; commits stay right.
    repo.reserve_snapshot(model={"big": np.zeros(3, dtype=np.float32)})
    repo.commit_async(3, model=model, optimizer=optimizer).wait()
    assert (repo.state_dict("3")["model"]["big"] == -1.0).all()
    repo.close()


def test_checkout_and_the_command_line(tmp_path):
    store = tmp_path / "store"
    repo = ckptvc.Repo.init(store, policy="lossless")
    repo.commit(1, model={"w": np.arange(16, dtype=np.float32)}, extra={"a": 1})
    out = repo.checkout("1", tmp_path / "out")
    assert sorted(os.path.basename(f) for f in out["files"]) == [
        "ckptvc-state.pkl",
        "model.safetensors",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "ckptvc._cli", "--repo", str(store), "--json", "log"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert '"step": 1' in result.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "ckptvc._cli", "--repo", str(tmp_path / "nope"), "log"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "no ckptvc store" in bad.stderr


DCP = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "dcp")


def _tree(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_ranks_commit_their_shards_of_a_dcp_step(tmp_path):
    repo = ckptvc.Repo.init(str(tmp_path / "store"), policy="lossless")
    for step in (2, 4):
        folder = os.path.join(DCP, f"step-{step:06d}")
        first = repo.commit_dir(folder, step, shard=(1, 2))
        assert first["sealed"] is None and first["files"] == 1
        assert [p["arrived"] for p in repo.pending()] == [[1]]
        last = repo.commit_dir(folder, step, shard=(0, 2))
        assert last["sealed"]["step"] == step and last["sealed"]["by_this_process"]
        assert repo.pending() == []
    out = tmp_path / "out"
    repo.checkout("4", str(out))
    assert _tree(out) == _tree(os.path.join(DCP, "step-000004"))
    mine = tmp_path / "rank1"
    repo.checkout("4", str(mine), shard=(1, 2))
    assert sorted(_tree(mine)) == ["__1_0.distcp"]
    with pytest.raises(ckptvc.CkptvcError, match="belongs to rank 1"):
        repo.commit_dir(os.path.join(DCP, "step-000006"), 6, shard=(0, 1))
    assert [e["step"] for e in repo.log()] == [4, 2]


def test_commit_distributed_outside_torch_distributed_commits_the_folder(tmp_path):
    from ckptvc.integrations import commit_distributed

    outcome = commit_distributed(str(tmp_path / "store"), os.path.join(DCP, "step-000002"), 2,
                                 policy="lossless")
    assert outcome["step"] == 2 and outcome["input_bytes"] > 0


def test_ranks_commit_their_parts_from_memory_as_one_step(tmp_path):
    store = str(tmp_path / "store")
    ckptvc.Repo.init(store, policy="balanced").close()
    # One Repo per rank, opened before any commit, as each rank's process
    # would: each must see the steps the other sealed.
    ranks = [ckptvc.Repo.open(store) for _ in range(2)]
    runs = [run_states(10 + rank, 3) for rank in range(2)]
    for k in range(3):
        step = 10 * (k + 1)
        for rank in (1, 0):  # the last to arrive seals
            model, optimizer = runs[rank][k]
            kwargs = dict(model=model, optimizer=optimizer, extra={"rank": rank},
                          shard=(rank, 2), group="job-1")
            if k == 1:
                out = ranks[rank].commit_async(step, **kwargs).wait()
            else:
                out = ranks[rank].commit(step, **kwargs)
            assert out["shard"] == {"index": rank, "count": 2} and out["group"] == "job-1"
            if rank == 1:
                assert out["sealed"] is None
                assert [p["arrived"] for p in ranks[0].pending()] == [[1]]
            else:
                assert out["sealed"]["step"] == step
    assert [e["step"] for e in ranks[1].log()] == [30, 20, 10]
    show = ranks[1].show("30")
    assert not show["keyframe"]
    errors = {(e["file"], e["tensor"]): e["rel_error"] for e in show["entries"] if e["tensor"]}
    for rank in range(2):
        model, optimizer = runs[rank][2]
        state = ranks[1 - rank].state_dict("30", shard=(rank, 2))
        assert state["extra"] == {"rank": rank}
        assert_model_within_show(
            state["model"], model, lambda name: errors[(f"rank{rank}/model.safetensors", name)])
        target = {p: {k: np.zeros_like(a) for k, a in keys.items()} for p, keys in optimizer.items()}
        ranks[rank].load("30", None, target, shard=(rank, 2))
        assert np.array_equal(target["head.weight"]["exp_avg"],
                              state["optimizer"]["head.weight"]["exp_avg"])
    for r in ranks:
        r.close()


def test_a_sharded_commit_is_read_with_its_number_of_ranks(tmp_path):
    repo = ckptvc.Repo.init(str(tmp_path / "store"), policy="lossless")
    model, optimizer = model_and_moments(1)
    for rank in range(2):
        repo.commit(5, model=model, optimizer=optimizer, shard=(rank, 2))
    with pytest.raises(ckptvc.CkptvcError, match=r"committed by 2 ranks: read it with shard=\(rank, 2\)"):
        repo.state_dict("5")
    with pytest.raises(ckptvc.CkptvcError, match="committed by 2 ranks, not 4"):
        repo.load("5", {k: np.zeros_like(v) for k, v in model.items()}, shard=(0, 4))
    repo.commit(6, model=model, optimizer=optimizer)
    with pytest.raises(ckptvc.CkptvcError, match="not committed by ranks"):
        repo.state_dict("6", shard=(0, 2))
    log = repo.log()
    with pytest.raises(ckptvc.CkptvcError, match="0 <= rank < world_size"):
        repo.commit(7, model=model, shard=(2, 2))
    with pytest.raises(ckptvc.CkptvcError, match="`parent` cannot be given with `shard`"):
        repo.commit(7, model=model, shard=(0, 2), parent="5")
    with pytest.raises(TypeError, match="shards"):
        repo.commit_async(7, model=model, shards=(0, 2))
    assert repo.log() == log and repo.pending() == []
