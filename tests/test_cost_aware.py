"""Cost-aware freezing: measure="flops" freezes a share of forward compute, not of layer count."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import layerfreeze as lf
from layerfreeze.layers import total_flops
from layerfreeze.schedule import depth_for_cost

from conftest import TinyEncoder

WIDTHS = (16, 64, 64, 8, 8, 2)  # Linear(16, 64) ... Linear(8, 2): very unequal costs
BATCH = 3


def uneven() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(a, b) for a, b in zip(WIDTHS[:-1], WIDTHS[1:])])


def linear_flops() -> list[int]:
    """Forward FLOPs of each Linear for one batch: a (BATCH x in) @ (in x out) product."""
    return [2 * BATCH * a * b for a, b in zip(WIDTHS[:-1], WIDTHS[1:])]


def expected_depth(fraction: float) -> int:
    costs, total = linear_flops(), sum(linear_flops())
    depth, spent = 0, 0
    for cost in costs[:-1]:
        if spent + cost > fraction * total:
            break
        spent, depth = spent + cost, depth + 1
    return depth


def frozen_share(depth: int) -> float:
    return sum(linear_flops()[:depth]) / sum(linear_flops())


def attach(measure: str, freeze_level: float, total_steps: int = 10, **options) -> tuple[nn.Module, lf.LayerFreezing]:
    model = uneven()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezing = lf.LayerFreezing(freeze_start=0.0, freeze_level=freeze_level, interval="step", measure=measure,
                                **options)
    freezing.attach(model, opt, total_steps=total_steps, example_inputs=torch.randn(BATCH, WIDTHS[0]))
    return model, freezing


def run_to_end(model: nn.Module, freezing: lf.LayerFreezing, steps: int = 10) -> list[int]:
    depths = []
    for _ in range(steps):
        freezing.step()
        depths.append(freezing.frozen_depth)
    return depths


def test_layer_flops_are_the_linear_products():
    model = uneven()
    run = lambda m: m(torch.randn(BATCH, WIDTHS[0]))  # noqa: E731
    assert lf.layer_flops(model, lf.definition_order(model), run) == linear_flops()


@pytest.mark.parametrize("level", [0.1, 0.2, 0.5, 0.9, 0.95, 1.0])
def test_flops_measure_freezes_the_largest_prefix_within_the_share(level):
    model, freezing = attach("flops", level)
    run_to_end(model, freezing)
    depth = freezing.frozen_depth
    assert depth == expected_depth(level)
    assert frozen_share(depth) <= level + 1e-12
    if depth < len(WIDTHS) - 2:  # one more layer would pass the share
        assert frozen_share(depth + 1) > level
    frozen = {f"{i}.{kind}" for i in range(depth) for kind in ("weight", "bias")}
    assert set(freezing.frozen_parameters) == frozen
    assert all(p.requires_grad == (name not in frozen) for name, p in model.named_parameters())


def test_flops_and_layers_measures_differ_as_documented():
    # Composer counts layers: half of 4 freezable layers is 2, which is 90% of the compute here.
    model, by_layers = attach("layers", 0.5)
    run_to_end(model, by_layers)
    assert by_layers.frozen_depth == 2 and frozen_share(2) == (1024 + 4096) / 5712
    # Counting FLOPs, half the compute is just the first layer (18%); the second would reach 90%.
    model, by_flops = attach("flops", 0.5)
    run_to_end(model, by_flops)
    assert by_flops.frozen_depth == 1 and frozen_share(1) == 1024 / 5712


def test_flops_schedule_never_exceeds_the_linear_share_at_any_step():
    model, freezing = attach("flops", 1.0, total_steps=20)
    for step in range(1, 21):
        freezing.step()
        fraction = step / 20
        assert freezing.frozen_fraction == pytest.approx(fraction)
        assert frozen_share(freezing.frozen_depth) <= fraction + 1e-12
        assert freezing.frozen_depth == expected_depth(fraction)


def test_flops_measure_needs_example_inputs():
    model = uneven()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="example_inputs is required with measure='flops'"):
        lf.LayerFreezing(measure="flops").attach(model, opt, total_steps=10)
    assert all(torch.equal(p, q) and p.requires_grad for p, q in zip(model.parameters(), before))


def test_bad_measure_is_refused():
    with pytest.raises(ValueError, match="measure must be one of 'layers', 'flops', got 'time'"):
        lf.LayerFreezing(measure="time")


def test_owner_unit_counts_every_forward_flop_of_a_transformer():
    # With unit="owner" nn.MultiheadAttention is a layer holding in_proj and the attention
    # products, so per-layer FLOPs add up to the whole model's; with Composer's leaf unit
    # that compute belongs to no layer and is never frozen.
    model = TinyEncoder()
    x = torch.randint(0, 11, (2, 5))
    run = lambda m: m(x)  # noqa: E731
    whole = total_flops(model, run)
    owner = lf.layer_flops(model, lf.definition_order(model, "owner"), run)
    leaf = lf.layer_flops(model, lf.definition_order(model, "leaf"), run)
    assert sum(owner) == whole
    assert sum(leaf) < whole


def test_flops_measure_with_owner_unit_freezes_attention():
    model = TinyEncoder()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    freezing = lf.LayerFreezing(freeze_start=0.0, freeze_level=1.0, interval="step", unit="owner", measure="flops")
    freezing.attach(model, opt, total_steps=4, example_inputs=torch.randint(0, 11, (2, 5)))
    for _ in range(4):
        freezing.step()
    assert "encoder.layers.0.self_attn.in_proj_weight" in freezing.frozen_parameters
    assert "head.weight" not in freezing.frozen_parameters


@settings(max_examples=200, deadline=None)
@given(
    costs=st.lists(st.integers(min_value=0, max_value=1000), min_size=1, max_size=12),
    fraction=st.floats(min_value=0.0, max_value=1.0),
)
def test_depth_for_cost_is_the_largest_prefix_within_budget(costs, fraction):
    depth = depth_for_cost(fraction, costs)
    total = sum(costs)
    assert 0 <= depth <= max(len(costs) - 1, 0)
    if total == 0:
        assert depth == 0
        return
    assert sum(costs[:depth]) <= fraction * total * (1 + 1e-12)
    if depth < len(costs) - 1:
        assert sum(costs[: depth + 1]) > fraction * total * (1 + 1e-12)
