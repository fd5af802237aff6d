import pytest
import torch
from torch import nn

import layerfreeze as lf
from layerfreeze.layers import ExecutionTracer, definition_order, execution_order, layer_flops, total_flops

from conftest import ConvBN, OwnsParams, Swapped, Tied, TinyEncoder, batch_for


def names(layers):
    return [layer.name for layer in layers]


def test_leaf_layers_skip_parameterless_leaves():
    assert names(definition_order(ConvBN())) == ["features.0", "features.1", "features.3", "features.4", "head"]


def test_leaf_unit_leaves_out_parameters_owned_beside_children():
    layers = definition_order(OwnsParams())
    assert names(layers) == ["first", "block.0", "block.2", "last"]
    assert "scale" not in {n for layer in layers for n in layer.param_names}


def test_owner_unit_includes_every_parameter_once():
    model = OwnsParams()
    layers = definition_order(model, unit="owner")
    assert names(layers) == ["", "first", "block.0", "block.2", "last"]
    assert layers[0].param_names == ("scale",)
    owned = [n for layer in layers for n in layer.param_names]
    assert sorted(owned) == sorted(n for n, _ in model.named_parameters())


def test_encoder_attention_input_projection_is_not_a_leaf_parameter():
    model = TinyEncoder()
    leaf_params = {n for layer in definition_order(model) for n in layer.param_names}
    assert "encoder.layers.0.self_attn.in_proj_weight" not in leaf_params
    owner_params = {n for layer in definition_order(model, unit="owner") for n in layer.param_names}
    assert "encoder.layers.0.self_attn.in_proj_weight" in owner_params


def test_tied_parameter_uses_its_first_name():
    layers = definition_order(Tied())
    assert names(layers) == ["embed", "mid", "out"]
    assert layers[0].param_names == ("embed.weight",)
    assert layers[2].param_names == ("embed.weight",)


def test_ddp_style_wrapper_is_looked_through():
    inner = ConvBN()
    wrapped = nn.DataParallel(inner)
    assert names(definition_order(wrapped)) == names(definition_order(inner))


def test_module_reused_under_two_parents_is_listed_twice_like_composer():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(nn.Sequential(shared), nn.Sequential(shared), nn.Linear(3, 1))
    assert names(definition_order(model)) == ["0.0", "1.0", "2"]


def test_unknown_unit_is_refused():
    with pytest.raises(ValueError, match="unit must be one of 'leaf', 'owner', got 'block'"):
        definition_order(ConvBN(), unit="block")


def test_execution_order_follows_forward_and_restores_buffers():
    model = Swapped()
    assert names(definition_order(model)) == ["a", "b", "c"]
    assert names(execution_order(model, lambda m: m(torch.randn(2, 5)))) == ["c", "a", "b"]

    bn = ConvBN()
    before = [b.clone() for b in bn.buffers()]
    execution_order(bn, lambda m: m(batch_for(bn)))
    assert all(torch.equal(a, b) for a, b in zip(before, bn.buffers()))


def test_tracer_fixes_order_on_first_forward_and_removes_its_hooks():
    model = Swapped()
    tracer = ExecutionTracer(model, definition_order(model))
    assert not tracer.done
    model(torch.randn(2, 5))
    assert tracer.done
    assert names(tracer.order()) == ["c", "a", "b"]
    assert not model.a._forward_pre_hooks and not model._forward_hooks


def test_layer_flops_match_linear_formula_and_sum_to_model():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    layers = definition_order(model)
    x = torch.randn(3, 4)
    flops = layer_flops(model, layers, lambda m: m(x))
    assert flops == [2 * 3 * 4 * 8, 2 * 3 * 8 * 2]
    assert sum(flops) == total_flops(model, lambda m: m(x))


def test_owner_flops_are_exclusive_of_nested_layers():
    model = OwnsParams()
    layers = definition_order(model, unit="owner")
    x = torch.randn(3, 6)
    flops = layer_flops(model, layers, lambda m: m(x))
    assert flops[1:] == layer_flops(model, layers[1:], lambda m: m(x))
    assert sum(flops) == total_flops(model, lambda m: m(x))
