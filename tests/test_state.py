"""state_dict / load_state_dict: plain data, exact inverse, refuses foreign state."""

import copy
import json

import numpy as np
import pytest
import torch

import layerfreeze as lf

from conftest import ConvBN, TinyEncoder, batch_for, mlp, train_step


def trained(freezing_kwargs, steps=6, model_factory=ConvBN):
    torch.manual_seed(0)
    model = model_factory()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    freezing = lf.LayerFreezing(**freezing_kwargs).attach(model, opt, total_steps=8, steps_per_epoch=2)
    for _ in range(steps):
        train_step(model, [opt], batch_for(model))
        freezing.step()
    return model, opt, freezing


def test_state_dict_is_plain_data_keyed_by_names():
    _, _, freezing = trained({"freeze_start": 0.0})
    state = freezing.state_dict()
    assert json.loads(json.dumps(state)) == state  # no tensors, modules or ids
    assert state["frozen"] == ["features.0.bias", "features.0.weight", "features.1.bias",
                               "features.1.weight", "features.3.bias", "features.3.weight"]
    assert state["layers"] == ["features.0", "features.1", "features.3", "features.4", "head"]
    assert state["step"] == 6 and state["epoch"] == 3 and state["depth"] == 3


def test_load_state_dict_is_exact_inverse():
    model, opt, source = trained({"freeze_start": 0.0, "batchnorm": "eval"})
    state = source.state_dict()
    torch.manual_seed(1)
    fresh = ConvBN()
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.01, momentum=0.9)
    target = lf.LayerFreezing(freeze_start=0.0, batchnorm="eval").attach(fresh, fresh_opt, 8, steps_per_epoch=2)
    target.load_state_dict(copy.deepcopy(state))
    assert target.state_dict() == state
    assert (target.frozen_depth, target.frozen_fraction, target.metrics) == (
        source.frozen_depth, source.frozen_fraction, source.metrics)
    assert [p.requires_grad for p in fresh.parameters()] == [p.requires_grad for p in model.parameters()]
    assert [len(g["params"]) for g in fresh_opt.param_groups] == [len(g["params"]) for g in opt.param_groups]
    assert [m.training for m in fresh.modules()] == [m.training for m in model.modules()]
    fresh_opt.load_state_dict(opt.state_dict())  # groups line up with the saved optimizer


def test_load_unfreezes_what_the_state_does_not_freeze():
    _, _, early = trained({"freeze_start": 0.0}, steps=2)
    model, opt, late = trained({"freeze_start": 0.0}, steps=8)
    assert late.frozen_depth == 4
    late.load_state_dict(early.state_dict())
    assert late.frozen_depth == early.frozen_depth == 1
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["features.0.weight", "features.0.bias"]
    assert len(opt.param_groups[0]["params"]) == 8


def test_load_before_attach_is_applied_by_attach():
    _, _, source = trained({"freeze_start": 0.0})
    model = ConvBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    freezing = lf.LayerFreezing(freeze_start=0.0)
    freezing.load_state_dict(source.state_dict())
    freezing.attach(model, opt, total_steps=8, steps_per_epoch=2)
    assert freezing.state_dict() == source.state_dict()


def test_state_from_a_different_model_is_refused_and_changes_nothing():
    _, _, source = trained({"freeze_start": 0.0})
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    freezing = lf.LayerFreezing(freeze_start=0.0).attach(model, opt, 8)
    freezing.set_depth(1)
    before = freezing.state_dict()
    with pytest.raises(ValueError, match="state_dict does not match this model: it names layer 'features.0'"):
        freezing.load_state_dict(source.state_dict())
    assert freezing.state_dict() == before
    assert len(opt.param_groups[0]["params"]) == 8


def test_state_with_unknown_parameter_is_refused():
    model, opt, freezing = trained({"freeze_start": 0.0}, steps=0)
    state = freezing.state_dict()
    state["frozen"] = ["features.0.weight", "features.9.weight"]
    with pytest.raises(ValueError, match="it freezes parameter 'features.9.weight', which this model lacks"):
        freezing.load_state_dict(state)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("state, message", [
    ({}, "missing key 'format'"),
    ([], "must be a dict from LayerFreezing.state_dict"),
    (None, "must be a dict"),
])
def test_malformed_state_is_refused(state, message):
    model = mlp()
    freezing = lf.LayerFreezing().attach(model, torch.optim.SGD(model.parameters(), lr=0.1), 8)
    with pytest.raises(ValueError, match=message):
        freezing.load_state_dict(state)


def test_malformed_state_before_attach_is_refused_at_once():
    with pytest.raises(ValueError, match=r"state_dict\.step must be a non-negative int"):
        lf.LayerFreezing().load_state_dict({
            "format": 1, "step": -1, "epoch": 0, "depth": 0, "fraction": 0.0, "changes": 0,
            "layers": [], "frozen": [], "policy": {},
        })


def test_pending_state_for_wrong_model_fails_attach_cleanly():
    _, _, source = trained({"freeze_start": 0.0})
    model = TinyEncoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    freezing = lf.LayerFreezing()
    freezing.load_state_dict(source.state_dict())
    with pytest.raises(ValueError, match="state_dict does not match this model"):
        freezing.attach(model, opt, 8)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(RuntimeError, match="before attach"):
        freezing.step()


def _state_of(steps=6, **kwargs):
    return trained({"freeze_start": 0.0, **kwargs}, steps=steps)[2].state_dict()


def _fresh(**kwargs):
    model = ConvBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, opt, lf.LayerFreezing(freeze_start=0.0, **kwargs).attach(model, opt, 8, steps_per_epoch=2)


def _load_is_refused(edit, message) -> dict:
    """Load a saved state changed by ``edit`` at depth 1: refused with ``message``, nothing changed. Returns the state."""
    state = copy.deepcopy(_state_of())
    edit(state)
    model, opt, freezing = _fresh()
    freezing.set_depth(1)
    before = freezing.state_dict()
    with pytest.raises(ValueError, match=message):
        freezing.load_state_dict(state)
    assert freezing.state_dict() == before
    assert len(opt.param_groups[0]["params"]) == 8
    return state


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(depth=1), r"state_dict is inconsistent: depth 1 freezes 2 parameter\(s\)"),
    (lambda s: s.update(layers=s["layers"][::-1]), "another order than this model's definition order"),
    (lambda s: s.update(fraction=float("nan")), r"state_dict\.fraction must be a finite number"),
    (lambda s: s.update(fraction="x"), r"state_dict\.fraction must be a finite number"),
    (lambda s: s.update(frozen=None), r"state_dict\.frozen must be a list of names"),
    (lambda s: s.update(frozen="features.0.weight"), r"state_dict\.frozen must be a list of names"),
    (lambda s: s.update(layers=None), r"state_dict\.layers must be a list of names"),
    (lambda s: s.update(policy=None), r"state_dict\.policy must be a dict"),
    (lambda s: s["config"].update(unit="owner"), "saved with unit='owner' but this LayerFreezing has unit='leaf'"),
    (lambda s: s["config"].update(shared="trainable"), "saved with shared='trainable'"),
])
def test_inconsistent_state_is_refused_and_changes_nothing(edit, message):
    _load_is_refused(edit, message)


def test_other_settings_in_checkpoint_warn(caplog):
    state = _state_of(interval="epoch", batchnorm="eval")
    _, _, freezing = _fresh(interval="step")
    with caplog.at_level("WARNING", logger="layerfreeze"):
        freezing.load_state_dict(state)
    assert "interval='epoch' (now 'step')" in caplog.text and "batchnorm='eval' (now 'train')" in caplog.text


def test_numpy_counters_in_state_are_accepted():
    np = pytest.importorskip("numpy")
    state = _state_of()
    state["step"], state["depth"] = np.int64(state["step"]), np.int64(state["depth"])
    _, _, freezing = _fresh()
    freezing.load_state_dict(state)
    assert freezing.state_dict()["step"] == 6 and type(freezing.state_dict()["step"]) is int


def test_optimizer_loaded_before_freezing_state_gets_a_hint():
    model, opt, source = trained({"freeze_start": 0.0})
    ckpt = {"opt": opt.state_dict(), "freezing": source.state_dict()}
    _, fresh_opt, freezing = _fresh()
    with pytest.raises(ValueError, match=r"HINT: call freezing.load_state_dict\(...\) BEFORE optimizer"):
        fresh_opt.load_state_dict(ckpt["opt"])
    freezing.load_state_dict(ckpt["freezing"])
    fresh_opt.load_state_dict(ckpt["opt"])  # the right order works


def test_pending_state_survives_a_refused_attach_and_resumes_on_the_right_model():
    _, _, source = trained({"freeze_start": 0.0})
    saved = source.state_dict()
    freezing = lf.LayerFreezing(freeze_start=0.0)
    freezing.load_state_dict(copy.deepcopy(saved))
    wrong = TinyEncoder()
    with pytest.raises(ValueError, match="state_dict does not match this model: it names layer 'features.0'"):
        freezing.attach(wrong, torch.optim.SGD(wrong.parameters(), lr=0.01), 8)
    assert all(p.requires_grad for p in wrong.parameters())
    model = ConvBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    freezing.attach(model, opt, total_steps=8, steps_per_epoch=2)
    assert (freezing.state_dict()["step"], freezing.state_dict()["epoch"], freezing.frozen_depth) == (6, 3, 3)
    assert freezing.frozen_parameters == ["features.0.bias", "features.0.weight", "features.1.bias",
                                          "features.1.weight", "features.3.bias", "features.3.weight"]
    train_step(model, [opt], batch_for(model))
    freezing.step()
    freezing.step()  # step 8: the end of epoch 4, fraction 1.0
    assert (freezing.state_dict()["step"], freezing.frozen_depth) == (8, 4)


def test_a_refused_attach_for_another_reason_keeps_the_pending_state_too():
    _, _, source = trained({"freeze_start": 0.0})
    freezing = lf.LayerFreezing(freeze_start=0.0)
    freezing.load_state_dict(source.state_dict())
    model = ConvBN()
    with pytest.raises(ValueError, match="total_steps must be a positive int, got 0"):
        freezing.attach(model, torch.optim.SGD(model.parameters(), lr=0.01), 0)
    freezing.attach(model, torch.optim.SGD(model.parameters(), lr=0.01), 8, steps_per_epoch=2)
    assert freezing.state_dict() == source.state_dict()


# -- FreezingState: the checkpoint state as plain data ------------------------------------

def test_freezing_state_round_trips_and_is_what_state_dict_returns():
    from layerfreeze.state import FreezingState

    _, _, freezing = trained({"freeze_start": 0.0})
    state = freezing.state_dict()
    checked = FreezingState.from_dict(state)
    assert (checked.step, checked.epoch, checked.depth, checked.fraction, checked.changes) == (6, 3, 3, 0.75, 3)
    assert checked.layers == ("features.0", "features.1", "features.3", "features.4", "head")
    assert checked.traced is True and checked.policy == {}
    assert checked.config == {"interval": "epoch", "order": "definition", "batchnorm": "train", "dropout": "train",
                              "shared": "freeze",
                              "unit": "leaf", "total_steps": 8, "policy": "Linear", "freeze_start": 0.0,
                              "freeze_level": 1.0, "measure": "layers"}
    assert checked.to_dict() == state


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(epoch=1.5), r"^state_dict\.epoch must be a non-negative int, got 1.5$"),
    (lambda s: s.update(depth=True), r"^state_dict\.depth must be a non-negative int, got True$"),
    (lambda s: s.update(changes="3"), r"^state_dict\.changes must be a non-negative int, got '3'$"),
    (lambda s: s.update(fraction=float("inf")), r"^state_dict\.fraction must be a finite number, got inf$"),
    (lambda s: s.update(layers=["a", 3]), r"^state_dict\.layers must be a list of names, got \['a', 3\]$"),
    (lambda s: s.update(traced="yes"), r"^state_dict\.traced must be a bool, got 'yes'$"),
    (lambda s: s.update(config=[1]), r"^state_dict\.config must be a dict, got list$"),
    (lambda s: s.update(config=torch.tensor([1.0, 2.0])), r"^state_dict\.config must be a dict, got Tensor$"),
    (lambda s: s.update(config=np.array([1, 2])), r"^state_dict\.config must be a dict, got ndarray$"),
    (lambda s: s["config"].update(unit=["leaf"]), r"^state_dict\.config\.unit must be a str, got \['leaf'\]$"),
    (lambda s: s["config"].update(total_steps=-8), r"^state_dict\.config\.total_steps must be a non-negative int"),
    (lambda s: s.update(format=2), r"^state_dict format 2 is not supported \(expected 1\)$"),
    (lambda s: s.pop("policy"), r"^state_dict is not from LayerFreezing\.state_dict\(\): missing key 'policy'$"),
])
def test_every_field_is_checked_and_named_by_its_path(edit, message):
    state = _load_is_refused(edit, message)
    with pytest.raises(ValueError, match=message):  # the same before attach
        lf.LayerFreezing(freeze_start=0.0).load_state_dict(state)
