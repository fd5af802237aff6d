"""Keep DistributedDataParallel consistent when the trainable set changes."""

from __future__ import annotations

import logging

from torch import nn

__all__ = ["is_ddp", "on_trainable_change"]

log = logging.getLogger("layerfreeze")


def is_ddp(model: nn.Module) -> bool:
    """Whether ``model`` is a ``torch.nn.parallel.DistributedDataParallel`` wrapper."""
    return isinstance(model, nn.parallel.DistributedDataParallel)


def on_trainable_change(model: nn.Module) -> None:
    """Called after every change of the trainable set of ``model``.

    A no-op unless ``model`` is wrapped in DistributedDataParallel.
    """
    if not is_ddp(model):
        return
