"""Lightning ``Trainer(strategy="ddp", accelerator="cpu", devices=2)`` with freezing.

``python _dist_lightning.py OUTDIR``. Lightning's DDP launcher starts rank 1 by
running this same command again, so this file must stay a script. It fits twice:
MODE ``"direct"`` (a minimal callback in this file drives ``LayerFreezing`` on
``trainer.strategy.model``, the DDP wrapper Lightning built), then, when the
integration exists, MODE ``"callback"``
(``layerfreeze.integrations.lightning.LayerFreezingCallback``). Each rank saves
its parameters and frozen set to OUTDIR/lightning-MODE-rank{R}.pt; rank 0 also
saves a one-process reference over the same global batches.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lightning.pytorch as pl  # noqa: E402

import layerfreeze as lf  # noqa: E402
from _dist_worker import convnet  # noqa: E402

STEPS = 8
PER_RANK = 4


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = convnet()
        self.depths: list[int] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class DirectFreezing(pl.Callback):
    """The least a trainer integration must do: attach to the wrapped model, step."""

    def __init__(self):
        self.freezing = lf.LayerFreezing(freeze_start=0.0, interval="step")

    def on_train_start(self, trainer, pl_module):
        self.freezing.attach(trainer.strategy.model, trainer.optimizers, total_steps=STEPS)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.freezing.step()
        pl_module.depths.append(self.freezing.frozen_depth)


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    return TensorDataset(torch.randn(STEPS * PER_RANK * 2, 3, 6, 6, generator=g),
                         torch.randint(0, 4, (STEPS * PER_RANK * 2,), generator=g))


def reference() -> dict:
    """One process; the global batch of a step is what both ranks see at that step."""
    from torch.utils.data import DistributedSampler

    model = convnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    freezing = lf.LayerFreezing(freeze_start=0.0, interval="step").attach(model, opt, total_steps=STEPS)
    dataset = data()
    x, y = dataset.tensors
    # Lightning replaces the training sampler by DistributedSampler(shuffle=True, seed=0).
    shards = [list(DistributedSampler(dataset, num_replicas=2, rank=r, shuffle=True, seed=0)) for r in (0, 1)]
    depths = []
    for step in range(STEPS):
        rows = [i for shard in shards for i in shard[step * PER_RANK:(step + 1) * PER_RANK]]
        nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()
        opt.zero_grad()
        freezing.step()
        depths.append(freezing.frozen_depth)
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "depths": depths,
            "frozen": freezing.frozen_parameters}


def fit(mode: str, out: str) -> None:
    if mode == "callback":
        from layerfreeze.integrations.lightning import LayerFreezingCallback

        callback = LayerFreezingCallback(freeze_start=0.0, interval="step")
    else:
        callback = DirectFreezing()
    module = Module()
    trainer = pl.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_steps=STEPS, callbacks=[callback],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data(), batch_size=PER_RANK, shuffle=False))
    rank = trainer.global_rank
    result = {"params": {n: p.detach().clone() for n, p in module.net.named_parameters()},
              "frozen": sorted(n for n, p in module.net.named_parameters() if not p.requires_grad),
              "depths": module.depths if mode == "direct" else None}
    if rank == 0:
        result["reference"] = reference()
    torch.save(result, os.path.join(out, f"lightning-{mode}-rank{rank}.pt"))


def main() -> None:
    out = sys.argv[1]
    torch.set_num_threads(1)
    modes = ["direct"]
    try:
        import layerfreeze.integrations.lightning  # noqa: F401
    except ImportError:
        pass  # the integration is not there yet: only the direct mode runs
    else:
        modes.append("callback")
    for mode in modes:  # several fits in one launch: Lightning reuses its process group
        fit(mode, out)
    # No DDP reducer may outlive the process group: with gloo that can abort at exit.
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
