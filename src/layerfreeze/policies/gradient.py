"""Adaptive freezing from the change in each layer's gradient norm (after AutoFreeze).

AutoFreeze (Liu et al. 2021, arXiv:2102.01386) freezes a layer once its gradient
norm stops changing: every ``every`` steps it compares each layer's gradient norm
over the window with the previous window's, and freezes the leading layers whose
relative change is below a percentile of all the changes.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import numpy as np
import torch

from ..state import field_count, field_mapping, field_name_map, field_real
from ..validation import check_int, check_number
from .base import Context, Policy, Progress

__all__ = ["GradientChange", "relative_changes", "leading_below"]

log = logging.getLogger("layerfreeze")


def relative_changes(now: list[float], before: list[float]) -> list[float]:
    """``|now - before| / before`` per layer; 0 for a layer with no gradient in
    either window (nothing to learn), infinity when it only now has one."""
    out = []
    for a, b in zip(now, before):
        if b > 0.0:
            out.append(abs(a - b) / b)
        else:
            out.append(0.0 if a == 0.0 else math.inf)
    return out


def leading_below(changes: list[float], percentile: float) -> int:
    """How many leading entries of ``changes`` lie strictly below its ``percentile``.

    The percentile is numpy's (linear interpolation) over all entries; counting
    stops at the first entry not below it, so the result describes a prefix.

    Example:
        >>> leading_below([0.01, 0.02, 0.5, 0.03, 0.9], 50.0)
        2
    """
    if not changes:
        return 0
    finite = [c if math.isfinite(c) else 1e300 for c in changes]
    threshold = float(np.percentile(np.asarray(finite, dtype=np.float64), percentile))
    count = 0
    for change in finite:
        if not change < threshold:
            break
        count += 1
    return count


class GradientChange(Policy):
    """Freeze the leading layers whose gradient norm has stopped changing.

    At ``samples`` evenly spaced steps of each window (every step when ``every <=
    samples``), inside ``optimizer.step`` (a step pre-hook, so after gradient
    clipping and AMP unscaling), the policy adds each trainable layer's gradient
    norm (over all its parameters) to a running sum, on the device, with no
    synchronisation. Every ``every`` optimizer steps it averages the window,
    computes each trainable layer's relative change against the previous window
    (:func:`relative_changes`), and moves the target depth past the leading
    trainable layers whose change is strictly below the ``percentile``-th
    percentile of the trainable layers' changes (:func:`leading_below`). The first
    decision can thus come at step ``2 * every``. Layers not frozen yet but with no
    gradient in both windows count as unchanged.

    Cost: at a measured step, one fused norm over the gradients
    (``torch._foreach_norm``, a read of every gradient) and a few small tensor ops;
    a host sync only every ``every`` steps. Measuring ``samples`` of ``every`` steps
    bounds the average to that share of one gradient read per step: reading the
    gradients of a parameter-heavy, compute-light model (a wide MLP on CPU) costs
    about 6% of its step, so measuring all 50 steps would miss the 2% budget there.
    ``benchmarks/policy_overhead.py`` measures it against plain training.

    Args:
        every: window length in optimizer steps (> 0). Default 50.
        percentile: in [0, 100]; layers whose change is below this percentile of
            all trainable layers' changes are candidates. 0 never freezes. Default 50.0.
        samples: steps measured per window (> 0, at most ``every``). Default 10.

    Example:
        >>> from torch import nn
        >>> from layerfreeze import LayerFreezing
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> freezing = LayerFreezing(policy=GradientChange(every=2), interval="step")
        >>> _ = freezing.attach(net, opt, total_steps=8)
        >>> for _ in range(8):
        ...     net(torch.randn(2, 4)).sum().backward(); opt.step(); opt.zero_grad(); freezing.step()
        >>> freezing.frozen_depth in (0, 1, 2)
        True
    """

    def __init__(self, every: int = 50, percentile: float = 50.0, samples: int = 10):
        every = check_int("every", every)
        percentile = check_number("percentile", percentile, 0.0, 100.0)
        samples = check_int("samples", samples)
        if 0.0 < percentile <= 1.0:
            log.warning(
                "layerfreeze: GradientChange(percentile=%s) is a percentile in [0, 100]: layers below the "
                "%s-th percentile of the changes freeze. HINT: if you meant a fraction, pass it times 100 "
                "(percentile=50 for the median).",
                percentile, percentile,
            )
        self.every = every
        self.percentile = percentile
        self.samples = min(samples, every)
        # Window positions (1..every) whose gradients are measured, evenly spaced,
        # the window's last step always among them.
        self._positions = frozenset(round((k + 1) * every / self.samples) for k in range(self.samples))
        self._handles: list[Any] = []
        self._reset()

    def _reset(self) -> None:
        self._sum: Optional[torch.Tensor] = None  # running sum of each layer's norm, this window
        self._index_key: Any = None
        self._index: Optional[torch.Tensor] = None
        self._count = 0  # optimizer steps done in the current window
        self._measured = 0  # of which measured
        self._measuring = False  # whether the step under way is measured
        self._previous: Optional[dict[str, float]] = None  # mean norm per layer, last window
        self._target = 0
        self._changes: Optional[dict[str, float]] = None  # last computed, for inspection
        self._plan_key: Any = None
        self._plan: dict[int, tuple[list[torch.nn.Parameter], torch.Tensor, list[str]]] = {}

    # -- hooks -------------------------------------------------------------
    def bind(self, context: Context) -> None:
        super().bind(context)
        for optimizer in context.optimizers:
            self._handles.append(optimizer.register_step_pre_hook(self._observe))

    def release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def hints(self, context: Context) -> list[str]:
        # The first comparison needs two whole windows.
        if context.total_steps is not None and 2 * self.every > context.total_steps:
            return [
                f"GradientChange(every={self.every}) compares two windows of {self.every} steps before its first "
                f"decision, at step {2 * self.every}, but the run has {context.total_steps} steps: nothing will "
                f"freeze. HINT: pass every <= {context.total_steps // 2}"
            ]
        return []

    def _sync_order(self) -> Any:
        # The layers list is replaced, never edited, when the execution order is
        # resolved; then the per-optimizer plans are rebuilt and a window's sums
        # are carried over by layer name.
        if self.context.resolve_layers is not None:
            self.context.resolve_layers()  # order="execution": the first forward has run by now
        layers = self.context.layers
        if self._plan_key is not layers:
            if self._sum is not None and self._plan_key is not None:
                position = {layer.name: i for i, layer in enumerate(self._plan_key)}
                order = torch.tensor([position[layer.name] for layer in layers], device=self._sum.device)
                self._sum = self._sum[order]
            self._plan_key, self._plan, self._index_key = layers, {}, None
        return layers

    def _layer_plan(self, optimizer: torch.optim.Optimizer):
        # Which of this optimizer's parameters belong to which layer; rebuilt when
        # the layer order is resolved (the layers list is replaced, not edited).
        layers = self._sync_order()
        plan = self._plan.get(id(optimizer))
        if plan is None:
            owner: dict[int, int] = {}
            for index, layer in enumerate(layers):
                for p in layer.module.parameters(recurse=False):
                    owner.setdefault(id(p), index)
            params, index = [], []
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if id(p) in owner:
                        params.append(p)
                        index.append(owner[id(p)])
            # Frozen parameters leave the groups, so read membership at call time:
            # keep the full list and filter by grad presence below.
            plan = (params, index, [layer.name for layer in layers])
            self._plan[id(optimizer)] = plan
        return plan

    def _observe(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if (self._count + 1) not in self._positions:
            return
        self._measuring = True
        params, index, names = self._layer_plan(optimizer)
        grads, where = [], []
        for p, i in zip(params, index):
            if p.grad is not None and p.requires_grad:
                grads.append(p.grad)
                where.append(i)
        if not grads:
            return
        device = grads[0].device
        norms = torch._foreach_norm(grads)
        if len({n.dtype for n in norms}) > 1:
            norms = [n.float() for n in norms]
        squares = torch.stack(norms).to(torch.float64).square()
        where_key = tuple(where)
        if self._index_key != (where_key, device):
            self._index_key = (where_key, device)
            self._index = torch.tensor(where, device=device)
        per_layer = torch.zeros(len(names), dtype=torch.float64, device=device)
        per_layer.index_add_(0, self._index, squares)
        # One running sum, whatever the optimizer: the additions happen in the same
        # order in a resumed run, so its sums match bit for bit.
        layer_norms = per_layer.sqrt()
        self._sum = layer_norms if self._sum is None else self._sum + layer_norms.to(self._sum.device)

    # -- decisions ---------------------------------------------------------
    def after_step(self, progress: Progress) -> None:
        self._count += 1
        if self._measuring:
            self._measured += 1
            self._measuring = False
        if progress.step % self.every != 0:
            return
        names = [layer.name for layer in self._sync_order()]
        if self._sum is None:
            means = {name: 0.0 for name in names}
        else:
            # The one host sync per window. Several optimizers holding parts of one
            # layer add their parts' norms.
            means = dict(zip(names, (self._sum / self._measured).tolist()))
        self._sum, self._count, self._measured = None, 0, 0
        previous, self._previous = self._previous, means
        if previous is None:
            return
        trainable = names[progress.depth:]
        now = [means[n] for n in trainable]
        before = [previous.get(n, 0.0) for n in trainable]
        changes = relative_changes(now, before)
        self._changes = dict(zip(trainable, changes))
        self._target = max(self._target, progress.depth + leading_below(changes, self.percentile))
        log.debug("layerfreeze: GradientChange at step %d: changes %s -> target depth %d",
                  progress.step, self._changes, self._target)

    def decide(self, progress: Progress) -> tuple[int, float]:
        depth = max(self._target, progress.depth)
        return depth, depth / max(len(self.context.layers) - 1, 1)

    @property
    def changes(self) -> Optional[dict[str, float]]:
        """Relative gradient-norm change of each trainable layer at the last window."""
        return None if self._changes is None else dict(self._changes)

    # -- state -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        names = [layer.name for layer in self._sync_order()]
        return {
            "count": self._count,
            "measured": self._measured,
            "sums": {} if self._sum is None else dict(zip(names, self._sum.tolist())),
            "previous": None if self._previous is None else dict(self._previous),
            "target": self._target,
            "changes": None if self._changes is None else dict(self._changes),
        }

    def check_state(self, state: Any, path: str = "policy") -> dict[str, Any]:
        keys = ("count", "measured", "sums", "previous", "target", "changes")
        state = field_mapping(state, path, keys, source="GradientChange")
        checked = {
            "count": field_count(state["count"], f"{path}.count"),
            "measured": field_count(state["measured"], f"{path}.measured"),
            "sums": field_name_map(state["sums"], f"{path}.sums", field_real),
            "previous": field_name_map(state["previous"], f"{path}.previous", field_real, optional=True),
            "target": field_count(state["target"], f"{path}.target"),
            "changes": field_name_map(state["changes"], f"{path}.changes", field_real, optional=True),
        }
        if checked["measured"] > checked["count"]:
            raise ValueError(
                f"{path}.measured must be at most {path}.count ({checked['count']}), got {checked['measured']}"
            )
        return checked

    def apply_state(self, checked: dict[str, Any]) -> None:
        self._count, self._measured, self._target = checked["count"], checked["measured"], checked["target"]
        self._previous, self._changes = checked["previous"], checked["changes"]
        self._sum = None
        if checked["sums"]:
            names = [layer.name for layer in self.context.layers]
            device = next(iter(self.context.model.parameters())).device
            values = [checked["sums"].get(n, 0.0) for n in names]
            self._sum = torch.tensor(values, dtype=torch.float64, device=device)
            self._plan_key, self._plan, self._index_key = self.context.layers, {}, None

    def describe(self) -> dict[str, Any]:
        return {"policy": "GradientChange", "every": self.every, "percentile": self.percentile,
                "samples": self.samples}
