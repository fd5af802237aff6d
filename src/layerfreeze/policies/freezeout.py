"""FreezeOut (Brock et al. 2017): per-layer cosine learning-rate annealing, then freeze.

Each freezable layer ``i`` gets a freeze time ``t_i`` (a fraction of training):
the first at ``t0``, the last freezable one at 1.0, the others spaced linearly or,
by default, cubically (more time for later layers). Layer ``i``'s learning rate is
annealed by a cosine to zero at ``t_i``; then the layer is frozen and leaves the
backward pass. The paper is arXiv:1706.04983; its reference code is
github.com/ajbrock/FreezeOut.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ..state import field_count, field_mapping
from ..validation import check_bool, check_choice, check_number
from .base import Context, Policy, Progress

__all__ = ["FreezeOut", "freeze_times", "lr_factor", "SPACINGS"]

log = logging.getLogger("layerfreeze")

#: How the freeze times grow from ``t0`` to 1. The paper's ``how_scale``: the
#: linear interpolation is raised to this power (cubic by default).
SPACINGS = {"linear": 1, "squared": 2, "cubic": 3}

#: Extra key of the per-layer param groups FreezeOut builds for each step: the layer.
GROUP_KEY = "freezeout_layer"

_MISSING = object()


def freeze_times(count: int, t0: float, spacing: str = "cubic") -> list[float]:
    """Freeze times of ``count`` freezable layers, first at ``t0``, last at 1.0.

    The paper interpolates linearly in ``t0 ** (1/p)`` space and raises to the
    power ``p`` (1 linear, 2 squared, 3 cubic): ``t_i = (s0 + (1 - s0) * i / (count - 1)) ** p``
    with ``s0 = t0 ** (1/p)``. Here ``t0`` is the time the first layer actually
    freezes; the paper's code takes it "pre-cubed" (its default 0.8 is ``t0 = 0.512``).

    Example:
        >>> freeze_times(3, 0.5, "linear")
        [0.5, 0.75, 1.0]
    """
    power = SPACINGS[spacing]
    start = t0 ** (1.0 / power)
    if count <= 1:
        return [t0] * count
    times = [(start + (1.0 - start) * i / (count - 1)) ** power for i in range(count)]
    # Exact endpoints: a root and a power back, or s + (1 - s), can be an ulp off,
    # and the depth at a boundary step depends on that last bit.
    times[0], times[-1] = t0, 1.0
    return times


def lr_factor(t: float, t_i: float, scale_lr: bool = True) -> float:
    """Multiplier of a layer's learning rate at training fraction ``t``.

    ``0.5 * (1 + cos(pi * t / t_i))`` until ``t_i``, 0 afterwards (the paper's
    schedule; its README notes the 1/2 missing from the paper's equation). With
    ``scale_lr`` it is divided by ``t_i``, so that layers trained for less time
    start from a larger rate and all travel about the same distance.
    """
    if t_i <= 0.0 or t >= t_i:
        return 0.0
    factor = 0.5 * (1.0 + math.cos(math.pi * t / t_i))
    return factor / t_i if scale_lr else factor


class FreezeOut(Policy):
    """Anneal each layer's learning rate to zero on its own schedule, then freeze it.

    Freezable layer ``i`` (of ``n - 1``; the last layer never freezes) freezes at
    ``t_i`` (see :func:`freeze_times`); until then its learning rate is multiplied
    by :func:`lr_factor`. The last layer and parameters outside every layer follow
    the plain cosine to zero at the end of training (``t = 1``, unscaled is then the
    same as scaled), as the paper's classifier does.

    How it touches the optimizer: for the duration of each ``optimizer.step()``
    (a step pre-hook swaps the groups in, a post-hook swaps them back) every
    layer's parameters form a param group of their own: a copy of the group they
    are in, with the extra key ``"freezeout_layer"`` and ``lr`` set to that group's
    ``lr`` times the layer's factor. Between steps the optimizer holds exactly your
    groups, untouched. So an LR scheduler, built before or after attach, keeps
    driving your groups' rates and composes multiplicatively with FreezeOut, and
    ``optimizer.state_dict()`` looks as without FreezeOut. The paper uses FreezeOut
    in place of a decaying schedule; with a cosine scheduler on top, rates decay
    twice. Values an optimizer writes into its groups during a step (some
    third-party adaptive optimizers keep running estimates there) are carried back
    from the group's first per-layer copy.

    Args:
        t0: fraction of training at which the first layer freezes, in (0, 1].
            Default 0.5.
        spacing: ``"cubic"`` (default, the paper's best), ``"squared"`` or
            ``"linear"``: how the freeze times of later layers grow to 1.
        scale_lr: divide each layer's initial rate by its ``t_i`` (default True).

    Example:
        >>> from torch import nn
        >>> from layerfreeze import LayerFreezing
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> freezing = LayerFreezing(policy=FreezeOut(t0=0.5, spacing="linear"), interval="step")
        >>> _ = freezing.attach(net, opt, total_steps=4)
        >>> len(opt.param_groups)  # between steps, the user's groups as they were
        1
        >>> for _ in range(4):
        ...     net(torch.randn(2, 4)).sum().backward(); opt.step(); opt.zero_grad(); freezing.step()
        >>> freezing.frozen_depth
        2
    """

    def __init__(self, t0: float = 0.5, spacing: str = "cubic", scale_lr: bool = True):
        self.t0 = check_number("t0", t0, 0.0, 1.0, low_open=True)
        self.spacing = check_choice("spacing", spacing, tuple(SPACINGS))
        self.scale_lr = check_bool("scale_lr", scale_lr)
        self._step = 0
        self._handles: list[Any] = []
        self._saved: dict[int, tuple[torch.optim.Optimizer, list[dict], list[Any]]] = {}
        self._owner: dict[int, str] = {}
        self._splits: dict[tuple[int, int], tuple[list, list, list]] = {}
        self._times_for: Any = None
        self._times: dict[str, float] = {}

    # -- schedule ----------------------------------------------------------
    def times(self) -> dict[str, float]:
        """Freeze time of each layer by name (the last layer: 1.0, never frozen)."""
        layers = self.context.layers
        if self._times_for is layers:  # the list is replaced, never edited, when the order changes
            return self._times
        times = freeze_times(max(len(layers) - 1, 0), self.t0, self.spacing)
        out = {layer.name: t for layer, t in zip(layers, times)}
        for layer in layers[len(times):]:
            out.setdefault(layer.name, 1.0)
        self._times_for, self._times = layers, out
        return out

    def decide(self, progress: Progress) -> tuple[int, float]:
        layers = self.context.layers
        times = freeze_times(max(len(layers) - 1, 0), self.t0, self.spacing)
        depth = 0
        while depth < len(times) and progress.current_duration >= times[depth]:
            depth += 1
        return depth, depth / max(len(layers) - 1, 1)

    def after_step(self, progress: Progress) -> None:
        self._step = progress.step
        self._total = progress.total_steps

    # -- optimizer plumbing ------------------------------------------------
    def bind(self, context: Context) -> None:
        super().bind(context)
        if context.total_steps is None:
            raise ValueError("FreezeOut needs total_steps in its context (LayerFreezing.attach passes it)")
        self._total = context.total_steps
        self._owner = {}
        for layer in context.layers:  # a tied parameter goes with the first layer holding it
            for p in layer.module.parameters(recurse=False):
                self._owner.setdefault(id(p), layer.name)
        self._splits = {}
        for optimizer in context.optimizers:
            self._handles.append(optimizer.register_step_pre_hook(self._pre_step))
            self._handles.append(optimizer.register_step_post_hook(self._post_step))

    def _split(self, params: list) -> tuple[list, list[tuple[str, list]]]:
        # A group's parameters by layer, in parameter order. Cached by the list
        # object: the freezer replaces a group's list whenever it changes it.
        key = (id(params), len(params))
        cached = self._splits.get(key)
        if cached is not None and cached[0] is params:
            return cached[1], cached[2]
        rest, by_layer = [], {}
        for p in params:
            name = self._owner.get(id(p))
            if name is None:
                rest.append(p)
            else:
                by_layer.setdefault(name, []).append(p)
        if len(self._splits) > 64:
            self._splits.clear()
        self._splits[key] = (params, rest, list(by_layer.items()))
        return rest, list(by_layer.items())

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # For the duration of this step only, each layer's parameters form a group
        # of their own: a copy of the user's group with the layer's rate. The user's
        # groups are left untouched, so schedulers and state_dict never see a change.
        self._restore(optimizer)  # a previous step that raised left its groups swapped
        if self.context.resolve_layers is not None:
            self.context.resolve_layers()  # order="execution": the first forward has run by now
        t = min(self._step / self._total, 1.0) if self._total else 0.0
        times = self.times()
        groups = optimizer.param_groups
        temporary, copies = [], []
        for group in groups:
            rest, by_layer = self._split(group["params"])
            settings = {k: v for k, v in group.items() if k != "params"}
            base = group["lr"]
            first = None
            for name, params in ([(None, rest)] if rest else []) + by_layer:
                copy = dict(settings)
                copy["params"] = params
                copy["lr"] = base * lr_factor(t, times.get(name, 1.0) if name else 1.0, self.scale_lr)
                if name is not None:
                    copy[GROUP_KEY] = name
                temporary.append(copy)
                first = first or copy
            copies.append((group, first, settings))
        optimizer.param_groups = temporary
        self._saved[id(optimizer)] = (optimizer, groups, copies)

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._restore(optimizer)

    def _restore(self, optimizer: torch.optim.Optimizer) -> None:
        entry = self._saved.pop(id(optimizer), None)
        if entry is None:
            return
        _, groups, copies = entry
        optimizer.param_groups = groups
        # An optimizer that keeps running values in its groups wrote them into the
        # copies: carry those back (never the rates FreezeOut set).
        for group, first, settings in copies:
            if first is None:
                continue
            for key, value in first.items():
                if key not in ("params", "lr", GROUP_KEY) and settings.get(key, _MISSING) is not value:
                    group[key] = value

    def release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for optimizer, _, _ in list(self._saved.values()):
            self._restore(optimizer)

    # -- state -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self._step}

    def check_state(self, state: Any, path: str = "policy") -> int:
        state = field_mapping(state, path, ("step",), source="FreezeOut")
        return field_count(state["step"], f"{path}.step")

    def apply_state(self, checked: int) -> None:
        self._step = checked

    def describe(self) -> dict[str, Any]:
        return {"policy": "FreezeOut", "t0": self.t0, "spacing": self.spacing, "scale_lr": self.scale_lr}
