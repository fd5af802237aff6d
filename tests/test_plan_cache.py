"""layerfreeze plan: the predicted saving with the frozen prefix cached, beside the one without."""

from __future__ import annotations

import pytest

from layerfreeze.bench.plan import Plan, PlanRow, summary_line


def plan(depths: list[int], steps_per_epoch) -> Plan:
    rows = [PlanRow(0, "a", "Linear", 10, 6.0, 0.6, 1), PlanRow(1, "b", "Linear", 10, 4.0, 0.4, None)]
    return Plan(rows, depths, 10.0, 20, len(depths), steps_per_epoch)


def test_cached_costs_by_hand():
    # 60% of the forward frozen from the start, 2 steps an epoch: epoch 1 computes the
    # prefix (1.8 forward passes a step, as without a cache), epoch 2 reads it (3 x 0.4).
    frozen = plan([1, 1, 1, 1], 2)
    assert frozen.step_costs() == pytest.approx([1.8, 1.8, 1.8, 1.8])
    assert frozen.cached_step_costs() == pytest.approx([1.8, 1.8, 1.2, 1.2])
    assert frozen.saving == pytest.approx(0.4) and frozen.cached_saving == pytest.approx(0.5)
    # Frozen after the first step: half of epoch 2's examples were stored at depth 1.
    late = plan([0, 1, 1, 1], 2)
    assert late.cached_step_costs() == pytest.approx([3.0, 1.8, 1.5, 1.5])
    assert late.cached_saving == pytest.approx(1 - 7.8 / 12)


def test_summary_gives_both_predictions_or_says_what_it_needs():
    line = summary_line(plan([1, 1, 1, 1], 2), "toy")
    assert "saving 40.0% (speedup 1.67x)" in line
    assert "With the frozen prefix cached (fixed inputs; EncoderCache or PrefixCache): saving 50.0% (speedup 2.00x)" in line
    assert plan([1, 1], None).cached_saving is None
    assert "pass --steps-per-epoch for a prediction" in summary_line(plan([1, 1], None), "toy")
