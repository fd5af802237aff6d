"""Lightning: LayerFreezingCallback with the real lightning.pytorch Trainer."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytestmark = pytest.mark.slow  # the real Trainer

L = pytest.importorskip("lightning.pytorch", reason="lightning is not installed")
from lightning.pytorch.loggers import Logger  # noqa: E402

import layerfreeze as lf  # noqa: E402
from conftest import ConvBN, mlp  # noqa: E402
from layerfreeze.integrations.lightning import LayerFreezingCallback  # noqa: E402

BATCHES = 4  # per epoch


class Module(L.LightningModule):
    def __init__(self, net: nn.Module, scheduler: bool = False):
        super().__init__()
        self.net, self.scheduler = net, scheduler
        self.bn_training: list[bool] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.bn_training.append([m.training for m in self.net.modules() if isinstance(m, nn.BatchNorm2d)])
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        if not self.scheduler:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 3, 0.5)}


class Recorder(Logger):
    """A logger keeping what Lightning hands it (a real Logger, as a user would write)."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    name, version = "recorder", 0

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def values(self, key: str) -> list[float]:
        return [m[key] for _, m in self.rows if key in m]


def _loader(conv: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    n = 4 * BATCHES
    x = torch.randn(n, 1, 6, 6, generator=g) if conv else torch.randn(n, 6, generator=g)
    y = torch.randint(0, 2 if not conv else 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def _net(conv: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return ConvBN() if conv else mlp(6)


def _trainer(tmp_path, callbacks, max_epochs=4, **kwargs) -> L.Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(
        max_epochs=max_epochs, callbacks=callbacks, default_root_dir=tmp_path, accelerator="cpu", devices=1,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True, **kwargs,
    )


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on num_workers and small datasets
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        yield


def _frozen(module: nn.Module) -> list[str]:
    return sorted(n for n, p in module.named_parameters() if not p.requires_grad)


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_freezes_at_epoch_ends_and_logs_composer_keys(tmp_path):
    recorder = Recorder()
    callback = LayerFreezingCallback(freeze_start=0.25)
    module = Module(_net())
    _trainer(tmp_path, [callback], logger=recorder, log_every_n_steps=1).fit(module, _loader())
    # 16 steps; at epoch ends durations 1/4..4/4: fractions 0, 1/3, 2/3, 1 of 5 freezable layers
    assert recorder.values(lf.LAYERS_FROZEN) == [0, 1, 3, 5]
    assert recorder.values(lf.PERCENTAGE_FROZEN) == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0], abs=1e-7)
    assert _frozen(module) == [f"net.{i}.{k}" for i in (0, 2, 4, 6, 8) for k in ("bias", "weight")]
    optimizer = module.trainer.optimizers[0]
    assert [p for g in optimizer.param_groups for p in g["params"]] == [module.net[10].weight, module.net[10].bias]


def test_interval_step_freezes_within_the_only_epoch(tmp_path):
    recorder = Recorder()
    module = Module(_net())
    callback = LayerFreezingCallback(freeze_start=0.0, interval="step")
    _trainer(tmp_path, [callback], max_epochs=1, logger=recorder, log_every_n_steps=1).fit(module, _loader())
    assert recorder.values(lf.LAYERS_FROZEN) == [1, 2, 3, 5]
    assert callback.freezing.frozen_depth == 5


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    module = Module(_net())
    callback = LayerFreezingCallback(freeze_start=0.0, interval="step")
    _trainer(tmp_path, [callback], max_epochs=2, accumulate_grad_batches=2).fit(module, _loader())
    # 2 epochs x 4 batches / 2 = 4 optimizer steps, the last one at duration 1.0
    assert callback.freezing.state_dict()["step"] == 4
    assert callback.freezing.frozen_depth == 5


def test_frozen_batchnorm_stays_in_eval_mode_through_model_train(tmp_path):
    module = Module(_net(conv=True))
    callback = LayerFreezingCallback(freeze_start=0.0, freeze_level=0.5, batchnorm="eval")
    _trainer(tmp_path, [callback], max_epochs=2).fit(module, _loader(conv=True))
    # 5 layers (conv, bn, conv, bn, head): after epoch 1 fraction 0.25 -> depth 1, after 2: 0.5 -> 2
    assert module.bn_training[:BATCHES] == [[True, True]] * BATCHES
    assert module.bn_training[BATCHES:] == [[True, True]] * BATCHES  # depth 1: the first conv only
    stats = module.net.features[1].running_mean.clone()
    callback.freezing.set_depth(3)  # conv, bn, conv frozen; Lightning's model.train() must not undo it
    trainer = _trainer(tmp_path, [], max_epochs=3)
    trainer.fit(module, _loader(conv=True))
    assert module.bn_training[-1] == [False, True]
    assert torch.equal(module.net.features[1].running_mean, stats)


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_resume_from_lightning_checkpoint_is_bit_identical(tmp_path, interval):
    def run(ckpt_path=None, folder="full"):
        module = Module(_net(), scheduler=True)
        checkpoint = L.callbacks.ModelCheckpoint(dirpath=tmp_path / folder, save_top_k=-1,
                                                 filename="{epoch}", every_n_epochs=1)
        callbacks = [LayerFreezingCallback(freeze_start=0.25, interval=interval), checkpoint]
        _trainer(tmp_path, callbacks, enable_checkpointing=True).fit(module, _loader(), ckpt_path=ckpt_path)
        return module

    full = run()
    resumed = run(ckpt_path=tmp_path / "full" / "epoch=1.ckpt", folder="resumed")
    assert _frozen(resumed) == _frozen(full) != []
    expected, got = _weights(full), _weights(resumed)
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    saved = torch.load(tmp_path / "full" / "epoch=1.ckpt", weights_only=False)["callbacks"]["LayerFreezingCallback"]
    # step 8 of 16, either interval: int((0.5 - 0.25) / 0.75 * 5) = 1 layer
    assert saved["step"] == 2 * BATCHES and saved["frozen"] == ["net.0.bias", "net.0.weight"]


def test_resume_without_freezing_is_exact_too(tmp_path):
    """The yardstick: Lightning itself resumes this run exactly from an epoch-end checkpoint."""
    def run(ckpt_path=None, folder="full"):
        module = Module(_net(), scheduler=True)
        checkpoint = L.callbacks.ModelCheckpoint(dirpath=tmp_path / folder, save_top_k=-1, filename="{epoch}")
        _trainer(tmp_path, [checkpoint], enable_checkpointing=True).fit(module, _loader(), ckpt_path=ckpt_path)
        return _weights(module)

    full, resumed = run(), run(tmp_path / "full" / "epoch=1.ckpt", "resumed")
    assert all(torch.equal(full[n], resumed[n]) for n in full)


def test_mid_epoch_checkpoint_restores_the_frozen_set(tmp_path):
    """Lightning does not resume mid-epoch exactly even without freezing (the epoch's batches
    restart), so this checks what it can: the resumed run starts from the saved frozen set."""
    starts = []

    class AtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            starts.append(_frozen(pl_module))

    def run(ckpt_path=None, folder="full"):
        module = Module(_net(), scheduler=True)
        checkpoint = L.callbacks.ModelCheckpoint(dirpath=tmp_path / folder, save_top_k=-1, filename="{step}",
                                                 every_n_train_steps=5)
        callbacks = [LayerFreezingCallback(freeze_start=0.25, interval="step"), checkpoint, AtStart()]
        _trainer(tmp_path, callbacks, enable_checkpointing=True).fit(module, _loader(), ckpt_path=ckpt_path)

    run()
    saved = torch.load(tmp_path / "full" / "step=10.ckpt", weights_only=False)["callbacks"]["LayerFreezingCallback"]
    run(tmp_path / "full" / "step=10.ckpt", "resumed")
    # step 10 of 16: fraction (10/16 - 0.25) / 0.75 = 0.5, int(0.5 * 5) = 2 layers
    assert saved["step"] == 10 and saved["depth"] == 2
    assert starts == [[], ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]]


@pytest.mark.parametrize("interval, warned", [("epoch", True), ("step", False)])
def test_a_one_epoch_run_deciding_at_epoch_ends_is_warned(tmp_path, caplog, interval, warned):
    with caplog.at_level("WARNING", logger="layerfreeze"):
        _trainer(tmp_path, [LayerFreezingCallback(freeze_start=0.0, interval=interval)], max_epochs=1).fit(
            Module(_net()), _loader())
    assert ("a one-epoch run with interval='epoch' freezes only after its last step. HINT: pass interval='step'"
            in caplog.text) is warned


@pytest.mark.parametrize("interval, depths", [("epoch", [3, 5]), ("step", [2, 2, 2, 3, 3, 4, 4, 5])])
def test_freezing_added_on_resume_follows_the_runs_true_progress(tmp_path, interval, depths):
    """A run checkpointed without freezing, resumed after epoch 2 of 4 (step 8 of 16) with the callback."""
    checkpoint = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "plain", save_top_k=-1, filename="{epoch}")
    _trainer(tmp_path, [checkpoint], enable_checkpointing=True).fit(Module(_net()), _loader())
    recorder, callback = Recorder(), LayerFreezingCallback(freeze_start=0.25, interval=interval)
    _trainer(tmp_path, [callback], logger=recorder, log_every_n_steps=1).fit(
        Module(_net()), _loader(), ckpt_path=tmp_path / "plain" / "epoch=1.ckpt")
    # the schedule at steps 9..16 of 16: fraction (k/16 - 0.25) / 0.75 of 5 layers, not at 1..8
    assert recorder.values(lf.LAYERS_FROZEN) == depths
    assert callback.freezing.state_dict()["step"] == 16


def _readme_code(title: str) -> str:
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0], re.S)[0]


def test_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(_readme_code("Lightning"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "['net.0.weight', 'net.0.bias', 'net.2.weight', 'net.2.bias']\n" in out and out.endswith("True\n")


def test_a_callback_used_for_a_second_fit_freezes_that_fits_model(tmp_path):
    """One callback object in two fits (new Trainer, new module): the second module freezes by the
    schedule (before, the callback kept acting on the first module and the second trained unfrozen)."""
    callback = LayerFreezingCallback(freeze_start=0.25)
    first = Module(_net())
    _trainer(tmp_path, [callback]).fit(first, _loader())
    frozen = [f"net.{i}.{k}" for i in (0, 2, 4, 6, 8) for k in ("bias", "weight")]
    assert _frozen(first) == frozen
    recorder, second = Recorder(), Module(_net())
    _trainer(tmp_path, [callback], logger=recorder, log_every_n_steps=1).fit(second, _loader())
    assert recorder.values(lf.LAYERS_FROZEN) == [0, 1, 3, 5]  # the second run's own schedule, from step 0
    assert _frozen(second) == frozen
    assert _frozen(first) == []  # the previous run is released
    optimizer = second.trainer.optimizers[0]
    assert [p for g in optimizer.param_groups for p in g["params"]] == [second.net[10].weight, second.net[10].bias]


def test_a_reused_callback_resumes_the_second_fit_from_its_checkpoint(tmp_path):
    """The second fit resumes from a checkpoint: its saved frozen set, not the first fit's, applies."""
    checkpoint = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    _trainer(tmp_path, [LayerFreezingCallback(freeze_start=0.25), checkpoint], enable_checkpointing=True).fit(
        Module(_net()), _loader())
    callback = LayerFreezingCallback(freeze_start=0.25)
    _trainer(tmp_path, [callback]).fit(Module(_net()), _loader())  # a whole run first: 5 layers frozen
    resumed = Module(_net())
    starts = []

    class AtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            starts.append(_frozen(pl_module))

    _trainer(tmp_path, [callback, AtStart()]).fit(resumed, _loader(), ckpt_path=tmp_path / "ckpt" / "epoch=1.ckpt")
    # saved after epoch 2 of 4 (step 8 of 16): int((0.5 - 0.25) / 0.75 * 5) = 1 layer
    assert starts == [["net.0.bias", "net.0.weight"]]
    assert _frozen(resumed) == [f"net.{i}.{k}" for i in (0, 2, 4, 6, 8) for k in ("bias", "weight")]
