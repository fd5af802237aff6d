"""Equal-time comparison: does a freezing run beat the baseline simply trained for less time?

The baseline (no freezing) is trained, for each seed, at several budgets (shares of
the full run's steps, its learning-rate schedule compressed to each). Its runs give,
per seed, points (training time, test accuracy); linear interpolation in time between
them is that seed's *frontier*. A freezing run of seed ``s`` that took ``t`` seconds is
compared with seed ``s``'s frontier at ``t``:

    delta = accuracy(run) - frontier_s(t)

positive when freezing beat a baseline given the same time. Runs are paired by seed
(same initial weights and batch order), so the seed-to-seed spread cancels. Across
seeds, the mean delta and its 95% confidence interval (Student's t) give the verdict:

- ``ahead``: the interval lies above 0;
- ``behind``: the interval lies below 0;
- ``no difference detected``: the interval holds 0 (or there is one seed only);
- ``outside the frontier``: some run's time lies outside its seed's frontier (faster
  than the smallest budget or slower than the full one), where the frontier says
  nothing; ``frontier_side`` says which way. The delta and interval are still given
  for the runs inside, with ``equal_time_runs`` counting them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .stats import mean_ci95

__all__ = ["Point", "frontier_points", "interpolate", "run_delta", "equal_time_row", "verdict",
           "AHEAD", "BEHIND", "NO_DIFFERENCE", "OUTSIDE", "FASTER", "SLOWER"]

AHEAD, BEHIND, NO_DIFFERENCE, OUTSIDE = "ahead", "behind", "no difference detected", "outside the frontier"
FASTER, SLOWER = "faster", "slower"


@dataclass(frozen=True)
class Point:
    """One baseline run on a seed's frontier."""

    seconds: float
    accuracy: float
    budget: float


def frontier_points(runs: Sequence[Any], seed: int, baseline: str) -> list[Point]:
    """The baseline's runs of ``seed``, one point per budget, sorted by time (then budget).

    ``runs`` hold ``variant``, ``seed``, ``budget``, ``train_seconds`` and
    ``test_accuracy`` (RunRecords or their JSON dicts).
    """
    points = [Point(_get(r, "train_seconds"), _get(r, "test_accuracy"), _get(r, "budget"))
              for r in runs if _get(r, "variant") == baseline and _get(r, "seed") == seed]
    return sorted(points, key=lambda p: (p.seconds, p.budget))


def interpolate(points: Sequence[Point], seconds: float) -> tuple[Optional[float], Optional[str]]:
    """The frontier's accuracy at ``seconds``: ``(accuracy, None)`` inside its time range,
    ``(None, "faster")`` before its first point, ``(None, "slower")`` past its last.

    Example:
        >>> pts = [Point(10.0, 0.80, 0.5), Point(20.0, 0.90, 1.0)]
        >>> interpolate(pts, 15.0)
        (0.8500000000000001, None)
        >>> interpolate(pts, 25.0)
        (None, 'slower')
    """
    if not points:
        raise ValueError("the frontier needs at least one baseline run")
    if seconds < points[0].seconds:
        return None, FASTER
    if seconds > points[-1].seconds:
        return None, SLOWER
    for left, right in zip(points, points[1:]):
        if left.seconds <= seconds <= right.seconds:
            if right.seconds == left.seconds:
                return max(left.accuracy, right.accuracy), None
            share = (seconds - left.seconds) / (right.seconds - left.seconds)
            return left.accuracy + share * (right.accuracy - left.accuracy), None
    return points[0].accuracy, None  # a single point, hit exactly


def run_delta(run: Any, runs: Sequence[Any], baseline: str) -> tuple[Optional[float], Optional[str]]:
    """``(accuracy minus the same seed's frontier at the run's time, None)``, or
    ``(None, "faster" | "slower")`` outside the frontier, or ``(None, None)`` when the
    seed has no baseline run."""
    points = frontier_points(runs, _get(run, "seed"), baseline)
    if not points:
        return None, None
    accuracy, side = interpolate(points, _get(run, "train_seconds"))
    if accuracy is None:
        return None, side
    return _get(run, "test_accuracy") - accuracy, None


def verdict(mean: float, half: Optional[float]) -> str:
    """``ahead`` / ``behind`` when the 95% interval ``mean ± half`` excludes 0, else
    ``no difference detected`` (also with one seed: ``half`` None).

    Example:
        >>> verdict(0.02, 0.01), verdict(-0.02, 0.01), verdict(0.02, 0.03), verdict(0.5, None)
        ('ahead', 'behind', 'no difference detected', 'no difference detected')
    """
    if half is None:
        return NO_DIFFERENCE
    if mean - half > 0:
        return AHEAD
    if mean + half < 0:
        return BEHIND
    return NO_DIFFERENCE


def equal_time_row(variant_runs: Sequence[Any], runs: Sequence[Any], baseline: str,
                   budgets: Sequence[float]) -> dict[str, Any]:
    """The equal-time fields of one freezing variant's summary row.

    Returns:
        ``equal_time_delta`` (mean over the runs inside their frontier, None if none),
        ``equal_time_ci95`` (half-width, None with fewer than two), ``equal_time_runs``,
        ``frontier_side`` (None, or which way runs fell outside, in words) and ``verdict``
        (None when no seed has a baseline run).
    """
    deltas, sides = [], []
    for run in variant_runs:
        delta, side = run_delta(run, runs, baseline)
        if delta is not None:
            deltas.append(delta)
        elif side is not None:
            sides.append(side)
    mean, half = mean_ci95(deltas) if deltas else (None, None)
    row: dict[str, Any] = {"equal_time_delta": mean, "equal_time_ci95": half, "equal_time_runs": len(deltas),
                           "frontier_side": _side_text(sides, len(variant_runs), budgets)}
    if sides:
        row["verdict"] = OUTSIDE
    elif deltas:
        row["verdict"] = verdict(mean, half)  # type: ignore[arg-type]
    else:
        row["verdict"] = None
    return row


def _side_text(sides: Sequence[str], total: int, budgets: Sequence[float]) -> Optional[str]:
    if not sides:
        return None
    parts = []
    for side, words in ((FASTER, f"faster than the smallest budget ({min(budgets):g})"),
                        (SLOWER, f"slower than the full budget ({max(budgets):g})")):
        count = sides.count(side)
        if count:
            parts.append(f"{words} in {count} of {total} runs")
    return "; ".join(parts)


def _get(run: Any, key: str) -> Any:
    return run[key] if isinstance(run, dict) else getattr(run, key)
