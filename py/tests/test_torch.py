"""The Python package with torch: a model and AdamW committed from memory
and loaded back into them. Skipped where torch is not installed."""

import copy

import pytest

torch = pytest.importorskip("torch")

import ckptvc  # noqa: E402


def make(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        # Layers of 8192 weights: tensors under 64 elements are always lossless.
        torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.LayerNorm(128), torch.nn.Linear(128, 64)
    ).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return model, opt, sched


def train(model, opt, sched, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 64, generator=g, dtype=next(model.parameters()).dtype)
        loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lossless_resume_continues_bit_identically(tmp_path, dtype):
    repo = ckptvc.Repo.init(tmp_path / "store", policy="lossless")
    model, opt, sched = make(dtype=dtype)
    train(model, opt, sched, 5, seed=1)
    repo.commit(5, model=model, optimizer=opt, extra={"scheduler": sched.state_dict()})
    reference = copy.deepcopy((model, opt, sched))
    train(*reference, 4, seed=2)

    fresh, fresh_opt, fresh_sched = make(seed=99, dtype=dtype)
    train(fresh, fresh_opt, fresh_sched, 1, seed=3)  # optimizer state exists, differs
    moments = {id(s["exp_avg"]) for s in fresh_opt.state.values()}
    extra = repo.load("5", fresh, fresh_opt)
    # Decoded into the optimizer's own tensors: no second copy of the state.
    assert {id(s["exp_avg"]) for s in fresh_opt.state.values()} == moments
    fresh_sched.load_state_dict(extra["scheduler"])
    train(fresh, fresh_opt, fresh_sched, 4, seed=2)
    for (name, a), b in zip(reference[0].state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_balanced_load_is_within_what_show_reports(tmp_path):
    repo = ckptvc.Repo.init(tmp_path / "store", policy="balanced")
    model, opt, sched = make()
    for step in range(1, 5):
        train(model, opt, sched, 10, seed=step)
        repo.commit(step * 10, model=model, optimizer=opt)
    errors = {e["tensor"]: e["rel_error"] for e in repo.show("40")["entries"] if e["tensor"]}
    assert repo.show("40")["error_m"] > 0, "the moments were paired and coded lossily"
    fresh, fresh_opt, _ = make(seed=5)
    repo.load("40", fresh, fresh_opt)
    for name, a in model.state_dict().items():
        b = fresh.state_dict()[name]
        err = (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a).clamp_min(1e-30)).item()
        assert err <= errors[name] * 1.001 + 1e-7, (name, err)
    # A weight's update error is that of Adam's next update of it, m/(√v+ε),
    # from the moments as loaded against the moments as trained.
    updates = {e["tensor"]: e["update_error"] for e in repo.show("40")["entries"] if e["tensor"]}
    checked = 0
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        if updates.get(name) is None:
            continue
        s, t = opt.state[p], fresh_opt.state[q]
        u = s["exp_avg"].double() / (s["exp_avg_sq"].double().clamp_min(0).sqrt() + 1e-8)
        u_hat = t["exp_avg"].double() / (t["exp_avg_sq"].double().clamp_min(0).sqrt() + 1e-8)
        measured = (torch.linalg.vector_norm(u_hat - u) / torch.linalg.vector_norm(u)).item()
        assert abs(updates[name] - measured) <= 1e-3 * measured + 1e-6, (name, updates[name], measured)
        checked += 1
    assert checked > 0


def test_a_parameter_missing_from_the_optimizer_is_refused(tmp_path):
    repo = ckptvc.Repo.init(tmp_path / "store")
    model, _, _ = make()
    partial = torch.optim.AdamW(list(model.parameters())[:2], lr=1e-3)
    with pytest.raises(ckptvc.CkptvcError, match="not in the optimizer"):
        repo.commit(1, model=model, optimizer=partial)
    assert repo.log() == []


def test_wrong_dtype_on_load_is_refused_before_writing(tmp_path):
    repo = ckptvc.Repo.init(tmp_path / "store", policy="lossless")
    model, opt, _ = make()
    repo.commit(1, model=model, optimizer=opt)
    other, _, _ = make(dtype=torch.float64)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ckptvc.CkptvcError, match="F32"):
        repo.load("1", other)
    for name, t in other.state_dict().items():
        assert torch.equal(t, before[name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tensors_off_the_host_cross_in_bounded_pieces(tmp_path, monkeypatch, dtype):
    """The path of CUDA tensors, taken here by CPU tensors (no GPU in CI):
    copied into host memory and decoded back in pieces of a bounded buffer
    (1000 bytes here, so pieces end mid-tensor), bit for bit, through
    commit, commit_async and load, a non-contiguous tensor included."""
    monkeypatch.setattr(ckptvc, "_on_host", lambda t: False)
    monkeypatch.setattr(ckptvc, "_DEVICE_PIECE_BYTES", 1000)
    pieces = {"in": 0, "out": 0}
    copy_from_device, read_range = ckptvc._copy_from_device, ckptvc._read_to_device

    def counting_copy(t, host):
        pieces["in"] += 1
        copy_from_device(t, host)

    def counting_read(*args):
        pieces["out"] += 1
        read_range(*args)

    monkeypatch.setattr(ckptvc, "_copy_from_device", counting_copy)
    monkeypatch.setattr(ckptvc, "_read_to_device", counting_read)
    repo = ckptvc.Repo.init(tmp_path / "store", policy="lossless")
    model, opt, sched = make(dtype=dtype)
    train(model, opt, sched, 3, seed=1)
    repo.commit(3, model=model, optimizer=opt)
    train(model, opt, sched, 2, seed=2)
    repo.commit_async(5, model=model, optimizer=opt).wait()
    assert pieces["in"] == 2 * (len(model.state_dict()) + 3 * len(opt.state)), pieces

    fresh, fresh_opt, _ = make(seed=7, dtype=dtype)
    repo.load("5", fresh, fresh_opt)
    assert pieces["out"] == len(fresh.state_dict()) + 3 * len(fresh_opt.state), pieces
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    for p, q in zip(model.parameters(), fresh.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], fresh_opt.state[q][key]), key

    weight = model[0].weight.detach()
    repo.commit(6, model={"w_t": weight.t()})
    target = torch.zeros(weight.shape, dtype=dtype).t()
    repo.load("6", {"w_t": target})
    assert not target.is_contiguous() and torch.equal(target, weight.t())
