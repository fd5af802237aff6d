"""What ``LayerFreezing`` tells its user: warnings about settings that will not do
what was likely meant, each with a HINT saying what to do.

Every function here only looks and logs (or, for :func:`check_group_sizes`, raises
with the fix); none changes the model, the optimizers or the algorithm.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from .layers import Layer

__all__ = [
    "summarize",
    "check_group_sizes",
    "warn_few_layers",
    "warn_orphans",
    "warn_one_epoch",
    "warn_no_epoch_end",
    "warn_frozen_batchnorm",
    "warn_other_settings",
]

log = logging.getLogger("layerfreeze")


def summarize(names: Iterable[str], limit: int = 5) -> str:
    """The first ``limit`` names, comma-separated, and how many more."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_group_sizes(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Optimizer load pre-hook: name the cause and the fix where torch would only say the
    group sizes differ (Lightning #6891): the freezing state was loaded after the optimizer's."""
    saved = state_dict.get("param_groups", [])
    if len(saved) != len(optimizer.param_groups):
        return  # torch's own error says it
    for index, (group, saved_group) in enumerate(zip(optimizer.param_groups, saved)):
        if len(group["params"]) != len(saved_group.get("params", ())):
            raise ValueError(
                f"optimizer state_dict has {len(saved_group['params'])} parameter(s) in group {index}, but the "
                f"optimizer's group holds {len(group['params'])} now: the frozen set differs from the "
                "checkpoint's. HINT: call freezing.load_state_dict(...) BEFORE optimizer.load_state_dict(...)"
            )


def warn_few_layers(model: nn.Module, layers: Sequence[Layer]) -> None:
    """A model of fewer than two layers: the last layer never freezes, so nothing will."""
    if len(layers) < 2:
        log.warning(
            "layerfreeze: %s has %d layer(s); the last layer is never frozen, so nothing "
            "will freeze", type(model).__name__, len(layers),
        )


def warn_orphans(model: nn.Module, layers: Sequence[Layer], unit: str) -> None:
    """Trainable parameters no layer holds under ``unit="leaf"`` never freeze."""
    if unit != "leaf":
        return
    held = {name for layer in layers for name in layer.param_names}
    orphans = [n for n, p in model.named_parameters() if p.requires_grad and n not in held]
    if orphans:
        log.warning(
            "layerfreeze: %d trainable parameter(s) belong to no layer under unit='leaf' (Composer's "
            "definition of a layer: leaf modules only) and never freeze: %s. Where they are used "
            "before frozen layers, backward still runs through those layers to reach them. HINT: "
            "unit='owner' makes every module that owns parameters a layer",
            len(orphans), summarize(orphans),
        )


def warn_one_epoch(interval: str, steps_per_epoch: Optional[int], total_steps: int) -> None:
    """A one-epoch run deciding at epoch ends decides once, after its last step."""
    if interval == "epoch" and steps_per_epoch is not None and steps_per_epoch >= total_steps:
        log.warning(
            "layerfreeze: a one-epoch run with interval='epoch' freezes only after its last step. "
            "HINT: pass interval='step'"
        )


def warn_no_epoch_end(step: int, total_steps: int) -> None:
    """Half the run done under ``interval="epoch"`` and no epoch end seen: nothing freezes."""
    log.warning(
        "layerfreeze: %d of %d steps done and epoch_end() was never called; with interval='epoch' "
        "and no steps_per_epoch nothing freezes. HINT: pass steps_per_epoch to attach(), call "
        "freezing.epoch_end() at each epoch end, or use interval='step'", step, total_steps,
    )


def warn_frozen_batchnorm(frozen_layers: Sequence[Layer]) -> bool:
    """Frozen BatchNorm under ``batchnorm="train"`` keeps moving its statistics; returns whether it warned."""
    if any(isinstance(layer.module, nn.modules.batchnorm._NormBase) for layer in frozen_layers):
        log.warning(
            "layerfreeze: frozen BatchNorm layers keep updating their running statistics "
            "(batchnorm='train', Composer's behaviour). HINT: pass batchnorm='eval' to "
            "LayerFreezing to hold them fixed."
        )
        return True
    return False


def warn_other_settings(config: dict[str, Any], now: dict[str, Any], total_steps: int) -> None:
    """Resuming with other settings than the checkpoint's: say which, and that the new ones apply."""
    differing = [f"{key}={config[key]!r} (now {value!r})" for key, value in now.items()
                 if key in config and config[key] != value]
    if differing:
        log.warning(
            "layerfreeze: resuming with other settings than the checkpoint's: %s; the run "
            "continues with the new ones", ", ".join(differing),
        )
    saved_total = config.get("total_steps")
    if saved_total is not None and saved_total != total_steps:
        log.warning(
            "layerfreeze: resuming with total_steps=%d, but the checkpoint was made with %d; "
            "the schedule continues on the new length", total_steps, saved_total,
        )
