"""GradientChange: what it measures and the prefix rule it applies (after AutoFreeze)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import layerfreeze as lf
from layerfreeze.policies import GradientChange
from layerfreeze.policies.gradient import leading_below, relative_changes

from conftest import mlp

changes_strategy = st.lists(
    st.one_of(st.floats(0.0, 10.0), st.just(math.inf)), min_size=0, max_size=30
)


@settings(max_examples=100, deadline=None)
@given(changes=changes_strategy, percentile=st.floats(0.0, 100.0))
def test_leading_below_counts_a_prefix_strictly_below_the_percentile(changes, percentile):
    count = leading_below(changes, percentile)
    finite = [c if math.isfinite(c) else 1e300 for c in changes]
    threshold = np.percentile(finite, percentile) if changes else 0.0
    assert 0 <= count <= len(changes)
    assert all(c < threshold for c in finite[:count])
    if count < len(changes):
        assert not finite[count] < threshold
    if changes:
        assert count < len(changes)  # the largest change is never below its own percentile


@settings(max_examples=100, deadline=None)
@given(pairs=st.lists(st.tuples(st.floats(0.0, 1e3), st.floats(0.0, 1e3)), max_size=20))
def test_relative_changes_are_the_stated_ratio(pairs):
    now, before = [a for a, _ in pairs], [b for _, b in pairs]
    for (a, b), change in zip(pairs, relative_changes(now, before)):
        if b > 0:
            assert change == abs(a - b) / b
        else:
            assert change == (0.0 if a == 0 else math.inf)


def run(policy, steps, total=40, seed=0, lr=0.05):
    torch.manual_seed(seed)
    net = mlp(5, 6)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    freezing = lf.LayerFreezing(policy=policy, interval="step").attach(net, opt, total_steps=total)
    grads = []  # per step: each layer's gradient norm, computed by hand
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        net(torch.randn(8, 6, generator=gen)).pow(2).mean().backward()
        row = {}
        for layer in freezing.layers:
            gs = [p.grad for p in layer.module.parameters() if p.grad is not None]
            row[layer.name] = math.sqrt(sum(float(g.double().pow(2).sum()) for g in gs)) if gs else 0.0
        grads.append(row)
        opt.step()
        opt.zero_grad()
        freezing.step()
    return net, opt, freezing, grads


def test_window_means_are_each_layers_gradient_norm_averaged_over_the_window():
    policy = GradientChange(every=3, percentile=0.0)
    _, _, freezing, grads = run(policy, 6)
    previous = freezing.state_dict()["policy"]["previous"]  # the window of steps 4..6
    for name, value in previous.items():
        expected = sum(row[name] for row in grads[3:6]) / 3
        assert value == pytest.approx(expected, rel=1e-6)


def test_samples_measure_evenly_spaced_steps_ending_each_window():
    policy = GradientChange(every=6, percentile=0.0, samples=3)  # window positions 2, 4, 6
    _, _, freezing, grads = run(policy, 12)
    previous = freezing.state_dict()["policy"]["previous"]  # the window of steps 7..12
    for name, value in previous.items():
        expected = (grads[7][name] + grads[9][name] + grads[11][name]) / 3
        assert value == pytest.approx(expected, rel=1e-6)


def test_decision_freezes_the_leading_layers_below_the_percentile():
    policy = GradientChange(every=3, percentile=60.0)
    _, _, freezing, grads = run(policy, 6)
    names = [layer.name for layer in freezing.layers]
    before = [sum(row[n] for row in grads[0:3]) / 3 for n in names]
    now = [sum(row[n] for row in grads[3:6]) / 3 for n in names]
    expected_changes = relative_changes(now, before)
    assert [policy.changes[n] for n in names] == pytest.approx(expected_changes, rel=1e-5)
    assert freezing.frozen_depth == min(leading_below(expected_changes, 60.0), len(names) - 1)
    assert freezing.frozen_depth > 0  # this seed freezes some layers, so the rule was exercised


def test_percentile_zero_never_freezes_and_nothing_happens_before_two_windows():
    _, _, freezing, _ = run(GradientChange(every=2, percentile=0.0), 12)
    assert freezing.frozen_depth == 0
    _, _, freezing, _ = run(GradientChange(every=4, percentile=100.0), 7)
    assert freezing.frozen_depth == 0 and freezing.policy.changes is None


def test_frozen_layers_leave_the_statistics():
    _, _, freezing, _ = run(GradientChange(every=2, percentile=100.0), 12)
    depth = freezing.frozen_depth
    assert depth > 0
    frozen = {layer.name for layer in freezing.layers[:depth]}
    assert frozen.isdisjoint(freezing.policy.changes)


def test_observes_after_gradient_clipping():
    # The pre-hook runs inside optimizer.step, so it sees the clipped gradients.
    torch.manual_seed(0)
    net = mlp(3, 6)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    policy = GradientChange(every=1, percentile=0.0)
    freezing = lf.LayerFreezing(policy=policy, interval="step").attach(net, opt, total_steps=4)
    (net(torch.randn(8, 6)) * 1e3).pow(2).mean().backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    freezing.step()
    means = freezing.state_dict()["policy"]["previous"]
    assert math.sqrt(sum(v * v for v in means.values())) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"every": 0}, r"every must be a positive int, got 0"),
        ({"every": 2.5}, r"every must be a positive int, got 2.5"),
        ({"samples": 0}, r"samples must be a positive int, got 0"),
        ({"percentile": -1}, r"percentile must be in \[0, 100\], got -1"),
        ({"percentile": 101.0}, r"percentile must be in \[0, 100\], got 101.0"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradientChange(**kwargs)


@pytest.mark.parametrize("percentile, warned", [(0.5, True), (1, True), (0.0, False), (50, False), (1.5, False)])
def test_a_fraction_given_as_percentile_gets_a_hint(percentile, warned, caplog):
    with caplog.at_level("WARNING", logger="layerfreeze"):
        policy = GradientChange(percentile=percentile)
    assert policy.percentile == float(percentile)
    assert ("HINT: if you meant a fraction, pass it times 100" in caplog.text) == warned
