import math

import pytest

from layerfreeze.schedule import (
    check_fraction,
    check_schedule,
    depth_for_cost,
    depth_for_fraction,
    linear_fraction,
)

# (current_duration, freeze_start, freeze_level, expected fraction)
LINEAR_TARGETS = [
    (0.0, 0.5, 1.0, 0.0),
    (0.5, 0.5, 1.0, 0.0),  # at the start: still nothing (<=)
    (0.75, 0.5, 1.0, 0.5),
    (1.0, 0.5, 1.0, 1.0),
    (1.0, 0.5, 0.5, 0.5),
    (0.55, 0.1, 1.0, 0.5),
    (1.0, 0.0, 1.0, 1.0),
    (0.25, 0.0, 0.8, 0.2),
    (1.0, 1.0, 0.0, 0.0),
]


@pytest.mark.parametrize("duration, start, level, expected", LINEAR_TARGETS)
def test_linear_fraction_table(duration, start, level, expected):
    assert linear_fraction(duration, start, level) == pytest.approx(expected, abs=1e-12)


def test_linear_fraction_divides_first_like_composer():
    # level * ((d - s) / (1 - s)) and (level * (d - s)) / (1 - s) differ in the last
    # bit here, and that moves the depth of an 11-layer model from 5 to 4.
    d, s, level = 0.72, 0.02, 0.7
    assert linear_fraction(d, s, level) == 0.5
    assert (level * (d - s)) / (1.0 - s) < 0.5
    assert depth_for_fraction(linear_fraction(d, s, level), 11) == 5


@pytest.mark.parametrize("fraction, layers, depth", [
    (0.0, 10, 0), (0.5, 11, 5), (1.0, 11, 10), (0.999, 11, 9), (1.0, 1, 0), (0.3, 4, 0), (0.34, 4, 1),
])
def test_depth_for_fraction_table(fraction, layers, depth):
    assert depth_for_fraction(fraction, layers) == depth


@pytest.mark.parametrize("fraction, costs, depth", [
    (0.5, [1, 1, 2, 4], 3),  # 1 + 1 + 2 is exactly half of 8
    (0.25, [1, 1, 2, 4], 2),  # 2 of 8 is exactly a quarter
    (0.2, [1, 1, 2, 4], 1),
    (1.0, [1, 1, 2, 4], 3),  # the last layer is never frozen
    (0.0, [0, 1, 1], 1),  # free layers at the front join the prefix
    (0.5, [], 0),
    (0.5, [0, 0], 0),
])
def test_depth_for_cost_table(fraction, costs, depth):
    assert depth_for_cost(fraction, costs) == depth


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), float("inf")])
def test_check_fraction_rejects(value):
    with pytest.raises(ValueError, match=r"freeze_start must be in \[0, 1\]"):
        check_fraction("freeze_start", value)


@pytest.mark.parametrize("value", ["0.5", None, True, [0.5]])
def test_check_fraction_rejects_non_numbers(value):
    with pytest.raises(TypeError, match="current_duration must be a number"):
        check_fraction("current_duration", value)


def test_check_schedule_refuses_start_one_with_level():
    with pytest.raises(ValueError, match="freeze_start=1.0 leaves no training"):
        check_schedule(1.0, 0.5)
    assert check_schedule(1.0, 0.0) == (1.0, 0.0)


def test_check_schedule_checks_in_signature_order():
    with pytest.raises(ValueError, match="freeze_start"):
        check_schedule(2.0, math.nan)
