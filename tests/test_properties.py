"""Property tests (hypothesis) for the schedule and the freezer."""

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import layerfreeze as lf
from layerfreeze.layers import definition_order
from layerfreeze.schedule import depth_for_fraction, linear_fraction

unit = st.floats(0.0, 1.0, allow_nan=False)


@given(start=st.floats(0.0, 0.999), level=unit, a=unit, b=unit, layers=st.integers(1, 200))
def test_depth_is_monotone_in_duration_and_never_reaches_the_last_layer(start, level, a, b, layers):
    lo, hi = sorted((a, b))
    d_lo = depth_for_fraction(linear_fraction(lo, start, level), layers)
    d_hi = depth_for_fraction(linear_fraction(hi, start, level), layers)
    assert 0 <= d_lo <= d_hi <= max(layers - 1, 0)


@given(start=st.floats(0.0, 0.999), level=unit, duration=unit)
def test_fraction_stays_within_level(start, level, duration):
    assert 0.0 <= linear_fraction(duration, start, level) <= level * (1 + 1e-12)


def _model(widths):
    layers = []
    for w_in, w_out in zip(widths, widths[1:]):
        layers += [nn.Linear(w_in, w_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


model_widths = st.lists(st.integers(1, 4), min_size=3, max_size=8)


@settings(max_examples=40, deadline=None)
@given(widths=model_widths, depths=st.lists(st.integers(0, 10), min_size=1, max_size=6),
       shared=st.sampled_from(["freeze", "trainable"]))
def test_frozen_set_is_a_prefix_and_last_layer_trains(widths, depths, shared):
    model = _model(widths)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezing = lf.LayerFreezing(shared=shared).attach(model, opt, total_steps=10)
    layers = definition_order(model)
    for depth in depths:
        depth = min(depth, len(layers) - 1)
        freezing.set_depth(depth)
        frozen = set(freezing.frozen_parameters)
        flags = [all(n in frozen for n in layer.param_names) for layer in layers]
        assert flags == [True] * depth + [False] * (len(layers) - depth)
        assert not flags[-1]
        in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
        for name, p in model.named_parameters():
            assert (name in frozen) == (not p.requires_grad) == (id(p) not in in_groups)


@settings(max_examples=40, deadline=None)
@given(widths=model_widths, depth=st.integers(0, 10), other=st.integers(0, 10))
def test_apply_is_idempotent_and_state_round_trips(widths, depth, other):
    model = _model(widths)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    freezing = lf.LayerFreezing().attach(model, opt, total_steps=10)
    top = len(definition_order(model)) - 1
    depth, other = min(depth, top), min(other, top)
    freezing.set_depth(depth)
    groups = [list(g["params"]) for g in opt.param_groups]
    state = freezing.state_dict()
    freezing.set_depth(depth)
    assert [list(g["params"]) for g in opt.param_groups] == groups
    freezing.set_depth(other)
    freezing.load_state_dict(copy.deepcopy(state))
    assert freezing.state_dict() == state
    assert [list(g["params"]) for g in opt.param_groups] == groups


@settings(max_examples=30, deadline=None)
@given(start=st.floats(0.0, 0.95), level=unit, total=st.integers(1, 30), widths=model_widths)
def test_algorithm_step_interval_matches_functional(start, level, total, widths):
    a = _model(widths)
    b = copy.deepcopy(a)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    freezing = lf.LayerFreezing(start, level, interval="step").attach(a, opt_a, total_steps=total)
    for step in range(1, total + 1):
        freezing.step()
        depth, fraction = lf.freeze_layers(b, opt_b, step / total, start, level)
        assert (freezing.frozen_depth, freezing.frozen_fraction) == (depth, fraction)
        assert [p.requires_grad for p in a.parameters()] == [p.requires_grad for p in b.parameters()]
