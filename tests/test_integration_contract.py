"""One contract for every integration: the same tiny model and schedule give the same
frozen set after the same optimizer steps as the core driven by hand.

Each trainer runs 2 epochs of 4 batches; a recorder registered after the freezing
callback notes the frozen parameters of the inner network after every step.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import layerfreeze as lf
from conftest import mlp

pytestmark = pytest.mark.slow  # the real trainers

EPOCHS, BATCHES, BATCH = 2, 4, 4
SCHEDULES = [dict(freeze_start=0.25, interval="step"), dict(freeze_start=0.0, interval="epoch"),
             dict(freeze_start=0.1, freeze_level=0.6, interval="step")]
# Frozen depth after each of the 8 steps (mlp(6): 5 freezable layers), written out:
# int(freeze_level * (k/8 - freeze_start) / (1 - freeze_start) * 5) at each decision.
DEPTHS = {
    "freeze_start=0.25-interval=step": [0, 0, 0, 1, 2, 3, 4, 5],
    "freeze_start=0.0-interval=epoch": [0, 0, 0, 2, 2, 2, 2, 5],  # decisions at steps 4 and 8
    "freeze_start=0.1-freeze_level=0.6-interval=step": [0, 0, 0, 1, 1, 2, 2, 3],
}


def _name(options) -> str:
    return "-".join(f"{k}={v}" for k, v in options.items())


def _frozen_at(depth: int) -> list[str]:
    return sorted(f"{2 * i}.{kind}" for i in range(depth) for kind in ("bias", "weight"))


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return mlp(6)


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(BATCHES * BATCH, 6, generator=g), torch.randint(0, 2, (BATCHES * BATCH,), generator=g))


def _frozen(net: nn.Module) -> list[str]:
    return sorted(n for n, p in net.named_parameters() if not p.requires_grad)


def expected(options) -> list[list[str]]:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    freezing = lf.LayerFreezing(**options).attach(net, opt, total_steps=EPOCHS * BATCHES, steps_per_epoch=BATCHES)
    seen = []
    for _ in range(EPOCHS * BATCHES):
        freezing.step()
        seen.append(_frozen(net))
    return seen


def run_lightning(options, net) -> list[list[str]]:
    import lightning.pytorch as L

    from layerfreeze.integrations.lightning import LayerFreezingCallback

    seen = []

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(_frozen(net))

        def on_train_epoch_end(self, trainer, pl_module):  # epoch-end decisions land after the last batch
            seen[-1] = _frozen(net)

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    trainer = L.Trainer(max_epochs=EPOCHS, callbacks=[LayerFreezingCallback(**options), Record()], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1)
    trainer.fit(Module(), DataLoader(_data(), batch_size=BATCH))
    return seen


def run_transformers(options, net, tmp_path) -> list[list[str]]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from layerfreeze.integrations.transformers import LayerFreezingCallback

    seen = []

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, labels):
            return {"loss": nn.functional.cross_entropy(self.net(x), labels)}

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(_frozen(net))

        def on_epoch_end(self, args, state, control, **kwargs):
            seen[-1] = _frozen(net)

    rows = [{"x": x, "labels": y} for x, y in _data()]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS,
                             learning_rate=0.05, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, logging_strategy="no")
    Trainer(model=Model(), args=args, train_dataset=rows,
            callbacks=[LayerFreezingCallback(**options), Record()]).train()
    return seen


def run_composer(options, net, tmp_path) -> list[list[str]]:
    import composer
    from composer.models import ComposerClassifier

    from layerfreeze.integrations.composer import LayerFreezing

    seen = []

    class Record(composer.Callback):
        def batch_end(self, state, logger):
            seen.append(_frozen(net))

        def epoch_end(self, state, logger):
            seen[-1] = _frozen(net)

    model = ComposerClassifier(net, num_classes=2)
    composer.Trainer(model=model, train_dataloader=DataLoader(_data(), batch_size=BATCH), max_duration=f"{EPOCHS}ep",
                     optimizers=torch.optim.SGD(model.parameters(), lr=0.05), algorithms=[LayerFreezing(**options)],
                     callbacks=[Record()], device="cpu", progress_bar=False, log_to_console=False).fit()
    return seen


RUNNERS = {"lightning": ("lightning", run_lightning), "transformers": ("transformers", run_transformers),
           "composer": ("composer", run_composer)}


@pytest.mark.parametrize("options", SCHEDULES, ids=_name)
def test_the_core_driven_by_hand_follows_the_table(options):
    assert expected(options) == [_frozen_at(depth) for depth in DEPTHS[_name(options)]]


@pytest.mark.parametrize("options", SCHEDULES, ids=_name)
@pytest.mark.parametrize("integration", sorted(RUNNERS))
def test_same_frozen_set_at_the_same_steps(integration, options, tmp_path):
    package, runner = RUNNERS[integration]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed in this environment")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = _net()
        seen = runner(options, net) if integration == "lightning" else runner(options, net, tmp_path)
    assert seen == [_frozen_at(depth) for depth in DEPTHS[_name(options)]]
