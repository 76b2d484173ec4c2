"""The Trainer callback and the Lightning plugin on real (tiny) runs.
Skipped where transformers or lightning are not installed."""

import pytest

torch = pytest.importorskip("torch")

import ckptvc  # noqa: E402
from ckptvc import integrations  # noqa: E402


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(64, 128)
        self.head = torch.nn.Linear(128, 1)

    def forward(self, x, y=None):
        out = self.head(torch.relu(self.layer(x))).squeeze(-1)
        loss = torch.nn.functional.mse_loss(out, y) if y is not None else None
        return {"loss": loss, "logits": out}


@pytest.mark.parametrize("asynchronous", [False, True])
def test_trainer_callback_commits_each_save_from_memory(tmp_path, asynchronous):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    data = [{"x": torch.randn(64), "y": torch.randn(())} for _ in range(64)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=6, save_steps=3,
        per_device_train_batch_size=8, report_to=[], use_cpu=True,
        logging_strategy="no",
    )
    store = tmp_path / "store"
    repo = ckptvc.Repo.init(store, policy="lossless")
    reserved = []
    reserve = repo.reserve_snapshot
    repo.reserve_snapshot = lambda **kw: (reserved.append(sorted(kw)), reserve(**kw))[1]
    model = Tiny()
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data,
        callbacks=[integrations.TrainerCallback(repo, delete_saved=True,
                                                asynchronous=asynchronous)],
    )
    trainer.train()
    # Asynchronous: the snapshot buffers were reserved once, after the first step.
    assert reserved == ([["model", "optimizer"]] if asynchronous else [])
    assert [e["step"] for e in repo.log()] == [6, 3]
    assert not (tmp_path / "out" / "checkpoint-6").exists(), "deleted once committed"
    fresh = Tiny()
    # The Trainer's own optimizer layout (decay and no-decay groups).
    opt = transformers.Trainer(model=fresh, args=args, train_dataset=data).create_optimizer()
    state = integrations.restore_trainer(repo, "6", fresh, opt)
    assert len(opt.state) == len(list(fresh.parameters())), "every moment came back"
    assert state["global_step"] == 6
    for name, t in model.state_dict().items():
        assert torch.equal(t, fresh.state_dict()[name]), name


def test_lightning_checkpoint_io_keeps_checkpoints_in_the_store(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = Tiny()

        def training_step(self, batch, _):
            x, y = batch
            return self.net(x, y)["loss"]

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 64), torch.randn(64))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    io = integrations.CheckpointIO(str(tmp_path / "store"), policy="lossless")
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=-1
    )
    module = Module()
    trainer = pl.Trainer(
        max_steps=4, plugins=[io], callbacks=[checkpoints], logger=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, loader)
    repo = ckptvc.Repo.open(str(tmp_path / "store"))
    steps = sorted(e["step"] for e in repo.log())
    assert steps == [2, 4]
    assert not list((tmp_path / "ckpt").glob("*.ckpt")), "no .ckpt files were written"
    last = checkpoints.best_model_path or sorted(checkpoints.best_k_models)[-1]
    loaded = io.load_checkpoint(last)
    assert loaded["global_step"] == 4
    for name, t in module.state_dict().items():
        assert torch.equal(t, loaded["state_dict"][name]), name
    assert loaded["optimizer_states"][0]["state"], "optimizer state came back"
