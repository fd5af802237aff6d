"""FixedDepth: a fixed set of leading layers frozen once, at a given share of training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import layerfreeze as lf
from layerfreeze.policies import FixedDepth

from conftest import TinyEncoder, mlp


def attach(model: nn.Module, policy: FixedDepth, total: int = 8, **kwargs) -> lf.LayerFreezing:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return lf.LayerFreezing(policy=policy, interval="step", **kwargs).attach(model, opt, total_steps=total)


def depths_over(freezing: lf.LayerFreezing, model: nn.Module, steps: int) -> list[int]:
    depths = []
    for _ in range(steps):
        model(torch.randn(2, 6)).sum().backward()
        for opt in freezing._freezer.optimizers:
            opt.step(), opt.zero_grad()
        freezing.step()
        depths.append(freezing.frozen_depth)
    return depths


def test_freezes_once_at_start_and_never_changes_again():
    model = mlp(5, 6)  # layers 0..4, the last never frozen
    freezing = attach(model, FixedDepth(3, start=0.5))
    assert depths_over(freezing, model, 8) == [0, 0, 0, 3, 3, 3, 3, 3]
    assert freezing.metrics[lf.LAYERS_FROZEN] == 3 and freezing.frozen_fraction == 0.75
    assert [p.requires_grad for p in model.parameters()] == [False] * 6 + [True] * 4
    assert freezing._changes == 1


def test_start_zero_freezes_at_the_first_decision_and_keeps_a_depth_set_after_attach():
    model = mlp(5, 6)
    policy = FixedDepth(2)
    freezing = attach(model, policy)
    freezing.set_depth(policy.target(freezing.layers))
    assert freezing.frozen_depth == 2
    assert depths_over(freezing, model, 3) == [2, 2, 2]


def test_through_names_a_module_and_covers_every_layer_under_it():
    # Layers under unit="owner": embed, then 6 per encoder layer (self_attn,
    # self_attn.out_proj, linear1, linear2, norm1, norm2), then head.
    model = TinyEncoder(depth=3)
    freezing = attach(model, FixedDepth(through="encoder.layers.1"), unit="owner")
    assert FixedDepth(through="encoder.layers.1").target(freezing.layers) == 13
    assert FixedDepth(through="encoder.layers.0.self_attn").target(freezing.layers) == 3
    assert FixedDepth(through="embed").target(freezing.layers) == 1
    freezing.step()
    assert freezing.frozen_depth == 13
    assert freezing.frozen_parameters[-1] == "encoder.layers.1.self_attn.out_proj.weight"
    assert not any(p.requires_grad for p in model.encoder.layers[1].parameters())
    assert all(p.requires_grad for p in model.encoder.layers[2].parameters())


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"give exactly one of depth, through and fraction, got depth=None, "
                                         r"through=None, fraction=None"):
        FixedDepth()
    with pytest.raises(ValueError, match=r"give exactly one of depth, through and fraction, got depth=2, through='a'"):
        FixedDepth(2, through="a")
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\], got 1.5"):
        FixedDepth(fraction=1.5)
    with pytest.raises(ValueError, match=r"depth must be a positive int, got 0"):
        FixedDepth(0)
    with pytest.raises(ValueError, match=r"depth must be a positive int, got True"):
        FixedDepth(True)
    with pytest.raises(ValueError, match=r"start must be in \[0, 1\), got 1.0"):
        FixedDepth(1, start=1.0)
    with pytest.raises(ValueError, match=r"through must be a non-empty module name, got ''"):
        FixedDepth(through="")


def test_attach_refuses_depths_the_model_does_not_have_and_changes_nothing():
    model = mlp(5, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    groups = [list(g["params"]) for g in opt.param_groups]
    with pytest.raises(ValueError, match=r"depth=5 is more than this model's 4 freezable layers"):
        lf.LayerFreezing(policy=FixedDepth(5)).attach(model, opt, total_steps=4)
    with pytest.raises(ValueError, match=r"through='encoder' names no layer of this model \(its layers: '0', '2', '4', '6', \.\.\.\)"):
        lf.LayerFreezing(policy=FixedDepth(through="encoder")).attach(model, opt, total_steps=4)
    with pytest.raises(ValueError, match=r"through='8' reaches the last layer \('8'\), which is never frozen"):
        lf.LayerFreezing(policy=FixedDepth(through="8")).attach(model, opt, total_steps=4)
    assert [list(g["params"]) for g in opt.param_groups] == groups
    assert all(p.requires_grad for p in model.parameters())


def test_describe_and_state_round_trip():
    policy = FixedDepth(through="encoder.layers.0", start=0.2)
    assert policy.describe() == {"policy": "FixedDepth", "depth": None, "through": "encoder.layers.0",
                                 "fraction": None, "start": 0.2}
    assert policy.state_dict() == {}


def test_fraction_counts_layers_as_composer_does():
    layers = lf.definition_order(mlp(5, 6))  # 5 layers: int(fraction * 4) freeze
    assert [FixedDepth(fraction=f).target(layers) for f in (0.25, 0.5, 0.74, 0.75, 1.0)] == [1, 2, 2, 3, 4]
    with pytest.raises(ValueError, match=r"fraction=0.2 of this model's 4 freezable layers is 0 layers; "
                                         r"HINT: raise fraction to at least 0.25"):
        FixedDepth(fraction=0.2).target(layers)
