"""``freeze_layers``: the Composer-compatible functional form."""

from __future__ import annotations

import logging
from typing import Sequence, Union

import torch
from torch import nn

from .freezer import freeze_parameters, names_for_depth, validate_model, validate_optimizers
from .layers import definition_order
from .schedule import check_fraction, check_schedule, depth_for_fraction, linear_fraction

__all__ = ["freeze_layers"]

log = logging.getLogger("layerfreeze")


def freeze_layers(
    model: nn.Module,
    optimizers: Union[torch.optim.Optimizer, Sequence[torch.optim.Optimizer]],
    current_duration: float,
    freeze_start: float = 0.5,
    freeze_level: float = 1.0,
) -> tuple[int, float]:
    """Freeze the leading layers of ``model`` for the point ``current_duration`` of training.

    Same result as ``composer.algorithms.layer_freezing.freeze_layers`` for every
    ``current_duration`` in [0, 1]: the same depth, the same fraction and the same
    parameters frozen. Freezing is also complete where Composer's is not: frozen
    parameters lose their ``.grad`` and their optimizer state, so
    ``optimizer.state_dict()`` keeps working. Like Composer's, this function never
    unfreezes: a call with a smaller ``current_duration`` leaves earlier freezing in
    place (use :class:`layerfreeze.LayerFreezing` to move both ways). Which
    parameters a depth freezes is :func:`layerfreeze.freezer.names_for_depth`, the
    rule ``LayerFreezing`` applies too; only where that would leave nothing to
    train (a last layer tied to frozen ones) does ``LayerFreezing`` keep the last
    layer trainable while this function, like Composer's, freezes it and warns.

    Args:
        model: the model being trained (may be wrapped in DistributedDataParallel).
        optimizers: the optimizer, or a list of optimizers, that train it.
        current_duration: fraction of training done, in [0, 1].
        freeze_start: fraction of training before freezing begins, in [0, 1]. Default 0.5.
        freeze_level: fraction of layers frozen at the end of training, in [0, 1]. Default 1.0.

    Returns:
        ``(depth, fraction)``: the number of leading layers frozen and the schedule's
        fraction, exactly as Composer returns them.

    Raises:
        TypeError, ValueError: for bad arguments, checked in signature order before
            anything changes.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> freeze_layers(net, opt, current_duration=1.0, freeze_start=0.5)
        (2, 1.0)
    """
    inner = validate_model(model)
    optimizer_list = validate_optimizers(model, optimizers)
    check_fraction("current_duration", current_duration)
    start, level = check_schedule(freeze_start, freeze_level)

    layers = definition_order(inner)
    # The arithmetic runs on the values as given, as Composer's does: a float32
    # freeze_level computes in float32, and that can move the depth by one.
    fraction = linear_fraction(current_duration, freeze_start, freeze_level)
    depth = depth_for_fraction(fraction, len(layers))
    names = names_for_depth(layers, depth)  # the rule LayerFreezing's freezer applies too
    by_name = dict(inner.named_parameters())
    trainable_before = {n for n, p in by_name.items() if p.requires_grad}
    freeze_parameters([by_name[n] for n in sorted(names)], optimizer_list)
    if trainable_before and trainable_before <= names:
        log.warning(
            "layerfreeze: freeze_layers froze every trainable parameter of %s (its last layer, %s, holds only "
            "parameters tied to frozen layers), as Composer does; the next backward has nothing to train. "
            "HINT: use layerfreeze.LayerFreezing, which keeps the last layer trainable then, or a lower freeze_level",
            type(inner).__name__, layers[-1].name,
        )
    log.info(
        "layerfreeze: freeze_start=%s freeze_level=%s froze %d of %d layers (fraction %.4f)",
        start, level, depth, len(layers), fraction,
    )
    return depth, fraction
