"""Small statistics for bench summaries: medians and t-based confidence intervals."""

from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence

__all__ = ["t_quantile_95", "mean_ci95", "median"]


def t_quantile_95(df: int) -> float:
    """Two-sided 95% quantile of Student's t with ``df`` degrees of freedom (scipy.stats.t).

    Example:
        >>> round(t_quantile_95(2), 3)
        4.303
    """
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an int >= 1, got {df!r}")
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def mean_ci95(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and the half-width of its 95% confidence interval (None with one value).

    Example:
        >>> mean, half = mean_ci95([1.0, 2.0, 3.0])
        >>> mean, round(half, 3)
        (2.0, 2.484)
    """
    if not values:
        raise ValueError("mean_ci95 needs at least one value")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    half = t_quantile_95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, half


def median(values: Sequence[float]) -> float:
    """Median (mean of the two middle values for an even count)."""
    if not values:
        raise ValueError("median needs at least one value")
    return statistics.median(values)
