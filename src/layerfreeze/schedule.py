"""Pure functions from training progress to the fraction and depth to freeze.

Nothing here holds state or touches a model: each function is a formula, tested
against a table of targets (like nanoGPT's ``get_lr(it)``).
"""

from __future__ import annotations

from typing import Optional, Sequence

from .validation import check_number

__all__ = [
    "check_fraction",
    "linear_fraction",
    "depth_for_fraction",
    "depth_for_cost",
    "check_schedule",
]


def check_fraction(name: str, value: object, *, allow_one: bool = True) -> float:
    """Return ``value`` as a float after checking that it lies in [0, 1] (see :mod:`layerfreeze.validation`).

    Raises:
        TypeError: if ``value`` is not a real number (Python or numpy scalar).
        ValueError: if it is NaN or outside the interval.
    """
    return check_number(name, value, 0.0, 1.0, high_open=not allow_one)


def check_schedule(freeze_start: object, freeze_level: object) -> tuple[float, float]:
    """Validate a linear schedule's two knobs, in that order.

    ``freeze_start == 1`` with a non-zero ``freeze_level`` would never freeze
    anything (there is no training left after the start), so it is refused rather
    than silently doing nothing.
    """
    start = check_fraction("freeze_start", freeze_start)
    level = check_fraction("freeze_level", freeze_level)
    if start == 1.0 and level != 0.0:
        raise ValueError(
            f"freeze_start=1.0 leaves no training in which to freeze, so freeze_level={level!r} "
            "would never take effect; use freeze_start in [0, 1) or freeze_level=0"
        )
    return start, level


def linear_fraction(current_duration: float, freeze_start: float, freeze_level: float) -> float:
    """Fraction of layers to freeze at ``current_duration`` (Composer's linear schedule).

    Zero while ``current_duration <= freeze_start``; then rises linearly to
    ``freeze_level`` at the end of training. The operations run in Composer's
    order (the division first): another order differs in the last bit, and that
    moves the depth at boundaries.

    Example:
        >>> linear_fraction(0.75, freeze_start=0.5, freeze_level=1.0)
        0.5
    """
    if current_duration <= freeze_start:
        return 0.0
    total_freezing_time = 1.0 - freeze_start
    freezing_time_elapsed = current_duration - freeze_start
    freezing_time_elapsed_frac = freezing_time_elapsed / total_freezing_time
    return freeze_level * freezing_time_elapsed_frac


def depth_for_fraction(fraction: float, num_layers: int) -> int:
    """Number of leading layers to freeze for ``fraction`` (Composer's count).

    The last layer is never frozen, so the fraction applies to ``num_layers - 1``.

    Example:
        >>> depth_for_fraction(0.5, num_layers=11)
        5
    """
    return int(fraction * max(num_layers - 1, 0))


def depth_for_cost(fraction: float, costs: Sequence[float], *, total: Optional[float] = None) -> int:
    """Largest depth whose frozen prefix holds at most ``fraction`` of the cost.

    ``costs`` are per-layer costs (forward FLOPs, say) in freeze order. The share
    is of the whole model's cost (``total``, default the sum of ``costs``); the
    last layer is never frozen. Zero-cost layers right after the prefix join it,
    since freezing them saves nothing but costs nothing either.

    Example:
        >>> depth_for_cost(0.5, [1.0, 1.0, 2.0, 4.0])
        3
    """
    if total is None:
        total = float(sum(costs))
    if total <= 0 or len(costs) <= 1:
        return 0
    budget = fraction * total
    spent = 0.0
    depth = 0
    for cost in costs[:-1]:
        if spent + cost > budget * (1 + 1e-12):
            break
        spent += cost
        depth += 1
    return depth
