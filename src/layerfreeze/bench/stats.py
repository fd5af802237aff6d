"""Small statistics for bench summaries: medians and t-based confidence intervals.

scipy is not a dependency, so the two-sided 95% Student-t quantiles come from a
table (values from any statistics textbook, to three decimals).
"""

from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence

__all__ = ["t_quantile_95", "mean_ci95", "median"]

# t_{0.975, df} for df = 1..30; beyond, the listed anchors, then the normal 1.960.
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)
_T95_LARGE = ((40, 2.021), (60, 2.000), (120, 1.980))


def t_quantile_95(df: int) -> float:
    """Two-sided 95% quantile of Student's t with ``df`` degrees of freedom (conservative
    between table rows: the value of the next smaller tabulated df).

    Example:
        >>> t_quantile_95(2)
        4.303
    """
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T95):
        return _T95[df - 1]
    value = _T95[-1]
    for anchor, quantile in _T95_LARGE:
        if df >= anchor:
            value = quantile
    return value if df < 1000 else 1.960


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
