"""``layerfreeze plan``: which layer freezes when, what it costs, and what freezing saves.

The schedule is not re-derived here: a real :class:`layerfreeze.LayerFreezing` is
attached to the (throwaway) model with an optimizer that is never stepped, and
driven through ``steps`` calls of ``step()``, so the plan is exactly what a
training run with the same settings would freeze, epoch ends and all.
"""

from __future__ import annotations

import logging
import textwrap
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..algorithm import LayerFreezing
from ..layers import layer_flops, total_flops

__all__ = ["PlanRow", "Plan", "make_plan", "render_plan", "summary_line", "plot_plan"]


@dataclass(frozen=True)
class PlanRow:
    """One layer of the plan, in freeze order.

    Attributes:
        index: position in freeze order (0 freezes first).
        name: qualified module name.
        type: module class name.
        params: parameters the layer owns.
        flops: forward FLOPs of the layer's own computation, per example.
        flops_share: ``flops`` over the whole model's forward FLOPs.
        freeze_step: the optimizer step after which it is frozen, or None if never.
    """

    index: int
    name: str
    type: str
    params: int
    flops: float
    flops_share: float
    freeze_step: Optional[int]


@dataclass(frozen=True)
class Plan:
    """The plan: rows, the depth in effect at each step, and predicted costs."""

    rows: list[PlanRow]
    depth_per_step: list[int]  # depth in effect during step s (index s - 1)
    total_flops: float  # whole-model forward FLOPs per example
    total_params: int
    steps: int
    steps_per_epoch: Optional[int]

    def prefix_share(self, depth: int) -> float:
        """Share of forward FLOPs held by the first ``depth`` layers."""
        return sum(row.flops_share for row in self.rows[:depth])

    def step_costs(self) -> list[float]:
        """Predicted cost of each step in forward passes: ``1 + 2(1 - f)`` (the performance model of docs/performance.md)."""
        shares = [self.prefix_share(d) for d in range(len(self.rows) + 1)]
        return [1.0 + 2.0 * (1.0 - shares[d]) for d in self.depth_per_step]

    @property
    def saving(self) -> float:
        """Run-average share of compute saved against training without freezing."""
        costs = self.step_costs()
        return 1.0 - sum(costs) / (3.0 * len(costs)) if costs else 0.0

    @property
    def speedup(self) -> float:
        """Predicted speedup over the whole run, ``1 / (1 - saving)``."""
        return 1.0 / (1.0 - self.saving)

    def cached_step_costs(self) -> Optional[list[float]]:
        """Predicted cost of each step with the frozen prefix cached (EncoderCache, PrefixCache).

        A step at frozen share f costs ``3(1 - f)`` for the trainable part, plus a
        forward over the part of the prefix its examples have no stored output for.
        Each example was last seen one epoch before, at a step spread evenly over
        that epoch (shuffled data), where the stored share was that step's; in the
        first epoch nothing is stored. None without ``steps_per_epoch``.
        """
        epoch = self.steps_per_epoch
        if not epoch:
            return None
        shares = [self.prefix_share(d) for d in self.depth_per_step]
        costs = []
        for step, share in enumerate(shares):
            before = shares[step - epoch - step % epoch: step - step % epoch] if step >= epoch else []
            stored = sum(min(share, s) for s in before) / len(before) if before else 0.0
            costs.append(3.0 * (1.0 - share) + (share - stored))
        return costs

    @property
    def cached_saving(self) -> Optional[float]:
        """Run-average share of compute saved with the frozen prefix cached (None without epochs)."""
        costs = self.cached_step_costs()
        return 1.0 - sum(costs) / (3.0 * len(costs)) if costs else None


def make_plan(model: nn.Module, example: Any, *, freeze_start: float, freeze_level: float, interval: str,
              order: str, unit: str, measure: str, steps: int, steps_per_epoch: Optional[int]) -> Plan:
    """Drive a LayerFreezing over ``steps`` steps on ``model`` and record what freezes when.

    ``model`` is used as a scratch copy: its parameters are not changed, but it is
    attached and detached again.

    Raises:
        ValueError, TypeError: for bad schedule settings (from LayerFreezing).
    """
    freezing = LayerFreezing(freeze_start, freeze_level, interval=interval, order=order, unit=unit, measure=measure)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters, so there is nothing to freeze")
    optimizer = torch.optim.SGD(trainable, lr=0.0)  # never stepped
    run = (lambda m: m(*example)) if isinstance(example, tuple) else (lambda m: m(example))
    batch = (example[0] if isinstance(example, tuple) else example).shape[0]
    logger = logging.getLogger("layerfreeze")
    level = logger.level
    logger.setLevel(logging.ERROR)  # the simulation's hints (BatchNorm, ...) concern training, not a plan
    try:
        freezing.attach(model, optimizer, total_steps=steps, steps_per_epoch=steps_per_epoch, example_inputs=example)
        layers = freezing.layers
        depth_per_step = []
        for _ in range(steps):
            depth_per_step.append(freezing.frozen_depth)
            freezing.step()
        final_depth = freezing.frozen_depth
        freezing.detach()
    finally:
        logger.setLevel(level)
    flops = layer_flops(model, layers, run)
    whole = total_flops(model, run) or 1
    # The step after which layer i is frozen: the last step run at a depth <= i.
    freeze_steps: list[Optional[int]] = []
    for index in range(len(layers)):
        step = next((s for s, d in enumerate(depth_per_step[1:], start=1) if d > index), None)
        if step is None and final_depth > index:
            step = steps  # frozen by the decision after the last step: too late to save anything
        freeze_steps.append(step)
    rows = [
        PlanRow(i, layer.name, layer.type_name, sum(p.numel() for p in layer.module.parameters(recurse=False)),
                flops[i] / batch, flops[i] / whole, freeze_steps[i])
        for i, layer in enumerate(layers)
    ]
    total_params = sum(p.numel() for p in model.parameters())
    return Plan(rows, depth_per_step, whole / batch, total_params, steps, steps_per_epoch)


def _count(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f}"


def render_plan(plan: Plan, title: str, interval: str) -> Any:
    """A rich Table of the plan's rows."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("layer")
    table.add_column("type")
    table.add_column("params", justify="right")
    table.add_column("FLOPs", justify="right")
    table.add_column("freezes after step", justify="right")
    last = len(plan.rows) - 1
    for row in plan.rows:
        if row.freeze_step is None:
            when = "never (last layer)" if row.index == last else "not in this run"
        else:
            when = str(row.freeze_step)
            if interval == "epoch" and plan.steps_per_epoch:
                when += f" (epoch {-(-row.freeze_step // plan.steps_per_epoch)})"
            if row.freeze_step == plan.steps:
                when += ", run over"
        table.add_row(str(row.index), row.name or "(root)", row.type, f"{row.params:,}",
                      f"{100 * row.flops_share:.1f}%", when)
    return table


def summary_line(plan: Plan, model_name: str) -> str:
    """The one-line verdict: size, compute, and the predicted saving over the run."""
    frozen_final = max(plan.depth_per_step) if plan.depth_per_step else 0
    return (
        f"{model_name}: {len(plan.rows)} layers, {_count(plan.total_params)} parameters, "
        f"{_count(plan.total_flops)}FLOPs forward per example. Over {plan.steps} steps up to {frozen_final} "
        f"layers ({100 * plan.prefix_share(frozen_final):.0f}% of forward FLOPs) freeze; predicted compute "
        f"saving {100 * plan.saving:.1f}% (speedup {plan.speedup:.2f}x), counting a step as 1 + 2(1 - f) "
        f"forward passes with f the frozen share." + _cached_line(plan)
    )


def _cached_line(plan: Plan) -> str:
    saving = plan.cached_saving
    if saving is None:
        return " With the frozen prefix cached: pass --steps-per-epoch for a prediction."
    return (f" With the frozen prefix cached (fixed inputs; EncoderCache or PrefixCache): saving {100 * saving:.1f}% "
            f"(speedup {1 / (1 - saving):.2f}x), a step costing 3(1 - f) once its examples' prefix is stored "
            "(the first epoch after a freeze computes it).")


def plot_plan(plan: Plan, path: str, title: str) -> None:
    """Freeze timeline (layers against steps) above the predicted cost of each step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(1, plan.steps + 1))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), dpi=110, sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    count = len(plan.rows)
    for row in plan.rows:
        if row.freeze_step is not None and row.freeze_step < plan.steps:
            top.barh(row.index, plan.steps - row.freeze_step, left=row.freeze_step + 0.5, height=0.85,
                     color="C0", alpha=0.75)
    top.set_ylim(count - 0.5, -0.5)
    top.set_xlim(0.5, plan.steps + 0.5)
    top.set_ylabel("layer (freeze order)")
    if count <= 30:
        top.set_yticks(range(count))
        top.set_yticklabels([row.name or "(root)" for row in plan.rows], fontsize=6)
    top.set_title(textwrap.fill(title, 100) + "\nbars: steps during which each layer is frozen", fontsize=9)
    costs = plan.step_costs()
    bottom.step(steps, costs, where="mid", color="C1", label="with freezing")
    bottom.axhline(3.0, color="gray", linestyle="--", label="no freezing")
    bottom.set_ylim(0.9, 3.2)
    bottom.set_ylabel("predicted cost\n(forward passes / step)")
    bottom.set_xlabel("optimizer step")
    bottom.legend(fontsize=8, loc="lower left")
    bottom.text(0.99, 0.05, f"run-average saving {100 * plan.saving:.1f}% ({plan.speedup:.2f}x)",
                transform=bottom.transAxes, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

