"""freeze_layers against Composer's semantics, written out independently here."""

import math

import pytest
import torch
from torch import nn

import layerfreeze as lf

from conftest import MODEL_FACTORIES, ConvBN, batch_for, train_step


def reference(model, current_duration, freeze_start, freeze_level):
    """Composer's freeze_layers outcome: (depth, fraction, names of frozen parameters)."""
    leaves = []

    def visit(module):
        kids = list(module.children())
        if not kids and len(list(module.parameters())) > 0:
            leaves.append(module)
        else:
            for kid in kids:
                visit(kid)

    visit(model)
    if current_duration <= freeze_start:
        fraction = 0.0
    else:
        fraction = freeze_level * ((current_duration - freeze_start) / (1.0 - freeze_start))
    depth = int(fraction * len(leaves[0:-1]))
    frozen = {id(p) for leaf in leaves[:depth] for p in leaf.parameters()}
    named = {n for n, p in model.named_parameters() if id(p) in frozen}
    return depth, fraction, named


DURATIONS = [i / 40 for i in range(41)] + [0.72, 0.999, 1e-9]
SCHEDULES = [(0.5, 1.0), (0.1, 1.0), (0.0, 0.5), (0.02, 0.7), (0.9, 0.3)]


@pytest.mark.parametrize("start, level", SCHEDULES)
def test_parity_with_composer_semantics(model_name, start, level):
    for duration in DURATIONS:
        torch.manual_seed(0)
        model = MODEL_FACTORIES[model_name]()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        expected_depth, expected_fraction, expected_frozen = reference(model, duration, start, level)
        depth, fraction = lf.freeze_layers(model, opt, duration, start, level)
        assert (depth, fraction) == (expected_depth, expected_fraction)
        assert type(depth) is int and type(fraction) is float
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert frozen == expected_frozen
        in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
        assert all((id(p) in in_groups) == (n not in frozen) for n, p in model.named_parameters())


def test_several_optimizers_and_groups():
    model = ConvBN()
    convs = [p for n, p in model.named_parameters() if n.startswith("features.0")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("features.0") and not n.startswith("head")]
    opt_a = torch.optim.SGD([{"params": convs}, {"params": rest, "lr": 0.01}], lr=0.1, momentum=0.9)
    opt_b = torch.optim.Adam(model.head.parameters())
    train_step(model, [opt_a, opt_b], batch_for(model))
    depth, _ = lf.freeze_layers(model, [opt_a, opt_b], 1.0, 0.0, 1.0)
    assert depth == 4
    assert [len(g["params"]) for g in opt_a.param_groups] == [0, 0]  # groups kept, even empty
    assert len(opt_b.param_groups[0]["params"]) == 2
    assert not opt_a.state
    opt_a.state_dict(), opt_b.state_dict()  # Composer raises KeyError here (its issue #1002)


def test_never_unfreezes_like_composer():
    model = ConvBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert lf.freeze_layers(model, opt, 1.0)[0] == 4
    assert lf.freeze_layers(model, opt, 0.0) == (0, 0.0)
    assert sum(not p.requires_grad for p in model.parameters()) == 8


@pytest.mark.parametrize("kwargs, error, message", [
    ({"current_duration": 1.5}, ValueError, r"current_duration must be in \[0, 1\], got 1.5"),
    ({"current_duration": -0.1}, ValueError, r"current_duration must be in \[0, 1\]"),
    ({"current_duration": math.nan}, ValueError, r"current_duration must be in \[0, 1\]"),
    ({"freeze_start": 1.1}, ValueError, r"freeze_start must be in \[0, 1\], got 1.1"),
    ({"freeze_start": math.nan}, ValueError, r"freeze_start must be in \[0, 1\]"),
    ({"freeze_level": -1}, ValueError, r"freeze_level must be in \[0, 1\], got -1"),
    ({"freeze_start": 1.0, "freeze_level": 0.5}, ValueError, "freeze_start=1.0 leaves no training"),
    ({"optimizers": []}, TypeError, "optimizers must be a torch.optim.Optimizer or a non-empty list"),
    ({"optimizers": "sgd"}, TypeError, "optimizers must be a torch.optim.Optimizer"),
    ({"model": "net"}, TypeError, "model must be a torch.nn.Module, got str"),
])
def test_bad_input_raises_and_changes_nothing(kwargs, error, message):
    model = ConvBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_step(model, [opt], batch_for(model))
    groups_before = [list(g["params"]) for g in opt.param_groups]
    state_before = {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in opt.state.items()}
    args = {"model": model, "optimizers": opt, "current_duration": 1.0, "freeze_start": 0.0, "freeze_level": 1.0}
    args.update(kwargs)
    with pytest.raises(error, match=message):
        lf.freeze_layers(**args)
    assert all(p.requires_grad for p in model.parameters())
    assert [list(g["params"]) for g in opt.param_groups] == groups_before
    assert set(opt.state) == set(state_before)


def test_optimizer_of_another_model_is_refused():
    model, other = ConvBN(), ConvBN()
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"optimizers\[0\] \(SGD\) holds none of the model's parameters"):
        lf.freeze_layers(model, opt, 1.0)
    assert all(p.requires_grad for p in model.parameters())


def test_model_without_parameters_is_refused():
    opt = torch.optim.SGD(ConvBN().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="model must have at least one parameter; Sequential has none"):
        lf.freeze_layers(nn.Sequential(nn.ReLU()), opt, 1.0)


def test_numpy_float32_knobs_compute_as_composer_does():
    np = pytest.importorskip("numpy")
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(11)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    depth, fraction = lf.freeze_layers(model, opt, 0.8, np.float32(0.3), np.float32(0.7))
    reference_fraction = np.float32(0.7) * ((0.8 - np.float32(0.3)) / (1.0 - np.float32(0.3)))
    assert fraction == reference_fraction and depth == int(reference_fraction * 10) == 5


def test_lazy_modules_freeze_like_composer():
    model = nn.Sequential(nn.Linear(3, 3), nn.LazyLinear(3), nn.Linear(3, 3), nn.Linear(3, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert lf.freeze_layers(model, opt, 1.0) == (3, 1.0)
    assert [p.requires_grad for p in model.parameters()] == [False] * 6 + [True] * 2
    assert len(opt.param_groups[0]["params"]) == 2


@pytest.mark.parametrize("depth_of", [0, 1, 2, 3, 4])
def test_freeze_layers_and_layerfreezing_freeze_the_same_parameters_at_each_depth(model_name, depth_of):
    """One rule (freezer.names_for_depth) decides for both forms, tied and shared models included."""
    torch.manual_seed(0)
    functional_model, algorithm_model = MODEL_FACTORIES[model_name](), MODEL_FACTORIES[model_name]()
    count = len(lf.definition_order(functional_model))
    depth = min(depth_of, count - 1)
    # current_duration (depth + 0.5) / (count - 1) gives fraction just past depth / (count - 1): depth itself
    duration = min((depth + 0.5) / (count - 1), 1.0)
    opt = torch.optim.SGD(functional_model.parameters(), lr=0.1)
    assert lf.freeze_layers(functional_model, opt, duration, 0.0, 1.0)[0] == depth
    freezing = lf.LayerFreezing().attach(algorithm_model, torch.optim.SGD(algorithm_model.parameters(), lr=0.1), 10)
    freezing.set_depth(depth)
    frozen = sorted(n for n, p in functional_model.named_parameters() if not p.requires_grad)
    if (model_name, depth) == ("tied", 2):
        # Everything trainable would freeze (out.weight is embed.weight): Composer's function
        # freezes it all; LayerFreezing keeps the last layer's (tied) weight trainable.
        assert frozen == ["embed.weight", "mid.bias", "mid.weight"]
        assert freezing.frozen_parameters == ["mid.bias", "mid.weight"]
    else:
        assert freezing.frozen_parameters == frozen


def test_freeze_layers_warns_when_it_leaves_nothing_to_train(caplog):
    from conftest import Tied

    model = Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level("WARNING", logger="layerfreeze"):
        assert lf.freeze_layers(model, opt, 0.75, 0.5, 1.0) == (1, 0.5)
    assert "froze every trainable parameter" not in caplog.text
    with caplog.at_level("WARNING", logger="layerfreeze"):
        assert lf.freeze_layers(model, opt, 1.0, 0.5, 1.0) == (2, 1.0)
    assert not any(p.requires_grad for p in model.parameters())  # Composer's outcome, kept
    assert "freeze_layers froze every trainable parameter of Tied (its last layer, out, holds only" in caplog.text
    assert "HINT: use layerfreeze.LayerFreezing" in caplog.text


def test_zero_dim_tensor_knobs_compute_in_their_own_type_as_composer_does():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(11)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    depth, fraction = lf.freeze_layers(model, opt, 0.75, torch.tensor(0.5), 1.0)
    assert depth == 5 and isinstance(fraction, torch.Tensor) and fraction.item() == 0.5
    assert [p.requires_grad for p in model.parameters()] == [False] * 10 + [True] * 12
