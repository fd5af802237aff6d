"""One rank of Composer's DDP on CPU with layerfreeze's LayerFreezing (tests/test_distributed_composer.py).

Usage: RANK=r WORLD_SIZE=2 ... python _dist_composer.py OUT_DIR. Composer wraps the model in
DistributedDataParallel itself, with find_unused_parameters from the algorithms; the
results (frozen set, weights, DDP settings, logged depths) go to OUT_DIR/composer-rank{r}.pt.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def main(out: Path) -> None:
    from composer import Trainer
    from composer.loggers import InMemoryLogger
    from composer.models import ComposerClassifier
    from composer.utils import dist

    from layerfreeze.integrations.composer import LayerFreezing

    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(5):
        layers += [nn.Linear(6, 6), nn.ReLU()]
    net = nn.Sequential(*layers, nn.Linear(6, 2))  # 6 layers, 5 freezable
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(16, 6, generator=g), torch.randint(0, 2, (16,), generator=g))
    model = ComposerClassifier(net, num_classes=2)
    logger = InMemoryLogger()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(
            model=model, train_dataloader=DataLoader(data, batch_size=4, sampler=dist.get_sampler(data, shuffle=False)),
            max_duration="4ep", optimizers=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            algorithms=[LayerFreezing(0.25)], loggers=[logger], device="cpu", progress_bar=False,
            log_to_console=False, seed=7, dist_timeout=60,
        )
        trainer.fit()
    wrapper = trainer.state.model
    torch.save({
        "is_ddp": isinstance(wrapper, nn.parallel.DistributedDataParallel),
        "find_unused_parameters": getattr(wrapper, "find_unused_parameters", None),
        "frozen": sorted(n for n, p in wrapper.named_parameters() if not p.requires_grad),
        "params": {n: p.detach().clone() for n, p in wrapper.named_parameters()},
        "depths": [value for _, value in logger.data["layer_freezing/layers_frozen"]],
        "steps": int(trainer.state.timestamp.batch.value),
    }, out / f"composer-rank{dist.get_global_rank()}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
