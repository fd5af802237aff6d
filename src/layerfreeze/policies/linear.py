"""The default policy: Composer's linear schedule, by layer count or by compute."""

from __future__ import annotations

from typing import Any

from ..schedule import check_schedule, depth_for_cost, depth_for_fraction, linear_fraction
from ..validation import check_choice
from .base import Context, Progress, Policy

__all__ = ["Linear"]

MEASURES = ("layers", "flops")


class Linear(Policy):
    """Freeze a linearly growing share of the network after ``freeze_start``.

    The fraction is 0 until ``freeze_start`` of training is done, then grows
    linearly to ``freeze_level`` at the end (Composer's schedule, bit for bit).

    Args:
        freeze_start: fraction of training before freezing begins, in [0, 1]. Default 0.5.
        freeze_level: fraction frozen at the end of training, in [0, 1]. Default 1.0.
        measure: ``"layers"`` counts layers as Composer does; ``"flops"`` counts the
            layers' forward FLOPs, so ``freeze_level=0.5`` freezes half the compute.

    Example:
        >>> Linear(0.5, 1.0).describe()["freeze_start"]
        0.5
    """

    def __init__(self, freeze_start: float = 0.5, freeze_level: float = 1.0, measure: str = "layers"):
        self.freeze_start, self.freeze_level = check_schedule(freeze_start, freeze_level)
        self.measure = check_choice("measure", measure, MEASURES)
        self.needs_costs = measure == "flops"

    def decide(self, progress: Progress) -> tuple[int, float]:
        fraction = linear_fraction(progress.current_duration, self.freeze_start, self.freeze_level)
        layers = self.context.layers
        if self.measure == "flops":
            costs = self.context.costs
            if costs is None:
                raise RuntimeError("measure='flops' needs layer costs; pass example_inputs to attach()")
            return depth_for_cost(fraction, costs), fraction
        return depth_for_fraction(fraction, len(layers)), fraction

    def hints(self, context: Context) -> list[str]:
        count = len(context.layers)
        if self.measure != "layers" or self.freeze_level == 0 or depth_for_fraction(self.freeze_level, count) > 0:
            return []
        return [
            f"freeze_level={self.freeze_level} with {count} layers freezes nothing: "
            f"int({self.freeze_level} * {count - 1}) = 0. HINT: raise freeze_level to at least "
            f"{1 / max(count - 1, 1):.3g}"
        ]

    def describe(self) -> dict[str, Any]:
        return {
            "policy": "Linear",
            "freeze_start": self.freeze_start,
            "freeze_level": self.freeze_level,
            "measure": self.measure,
        }
