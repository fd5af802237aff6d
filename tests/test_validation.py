"""Numbers, counts and choices: numpy scalars accepted wherever Python's are, arrays refused
naming the argument, and what is stored from them plain Python (loads with weights_only=True)."""

import io

import numpy as np
import pytest
import torch

import layerfreeze as lf
from layerfreeze.policies import Convergence, FreezeOut, GradientChange, Linear
from layerfreeze.validation import check_bool, check_choice, check_int, check_number

from conftest import ConvBN, batch_for, mlp, train_step


@pytest.mark.parametrize("value, expected", [
    (3, 3), (np.int64(3), 3), (np.int32(3), 3), (np.uint8(3), 3), (np.array(3), 3), (torch.tensor(3), 3),
])
def test_check_int_accepts_python_and_numpy_integers_as_plain_int(value, expected):
    checked = check_int("every", value)
    assert checked == expected and type(checked) is int


@pytest.mark.parametrize("value", [0, -2, 2.0, 2.5, True, np.bool_(True), "3", None, np.array([3]), np.array(3.0),
                                   torch.tensor([3]), torch.tensor(True), torch.tensor(-1)])
def test_check_int_refuses_everything_else_naming_the_argument(value):
    with pytest.raises(ValueError, match=r"^every must be a positive int, got "):
        check_int("every", value)


@pytest.mark.parametrize("value, expected", [
    (0.5, 0.5), (1, 1.0), (np.float32(0.5), 0.5), (np.float64(0.25), 0.25), (np.int64(1), 1.0),
    (np.float16(0.5), 0.5), (np.array(0.5), 0.5), (torch.tensor(0.5), 0.5),
    (torch.tensor(0.5, dtype=torch.float64), 0.5),
])
def test_check_number_accepts_python_and_numpy_reals_as_plain_float(value, expected):
    checked = check_number("t0", value, 0.0, 1.0, low_open=True)
    assert checked == expected and type(checked) is float


@pytest.mark.parametrize("value, error, message", [
    (np.array([0.1, 0.2]), TypeError, r"t0 must be a number in \(0, 1\], got array\(\[0.1, 0.2\]\)"),
    (np.array([0.5]), TypeError, r"t0 must be a number in \(0, 1\], got array\(\[0.5\]\)"),
    (torch.tensor([0.5]), TypeError, r"t0 must be a number in \(0, 1\], got tensor\(\[0.5000\]\)"),
    (np.array(True), TypeError, r"t0 must be a number in \(0, 1\], got array\(True\)"),
    ("0.5", TypeError, r"t0 must be a number in \(0, 1\], got '0.5'"),
    (np.bool_(True), TypeError, r"t0 must be a number in \(0, 1\], got np.True_"),
    (0.0, ValueError, r"t0 must be in \(0, 1\], got 0.0"),
    (np.float32(1.5), ValueError, r"t0 must be in \(0, 1\], got np.float32\(1.5\)"),
    (np.float64("nan"), ValueError, r"t0 must be in \(0, 1\], got np.float64\(nan\)"),
])
def test_check_number_refuses_non_scalars_and_values_out_of_range(value, error, message):
    with pytest.raises(error, match=message):
        check_number("t0", value, 0.0, 1.0, low_open=True)


def test_check_choice_returns_a_plain_str_and_refuses_arrays():
    checked = check_choice("interval", np.str_("step"), ("epoch", "step"))
    assert checked == "step" and type(checked) is str
    with pytest.raises(ValueError, match=r"interval must be one of 'epoch', 'step', got array\(\['epoch'\]"):
        check_choice("interval", np.array(["epoch"]), ("epoch", "step"))
    with pytest.raises(ValueError, match=r"interval must be one of 'epoch', 'step', got \['epoch'\]"):
        check_choice("interval", ["epoch"], ("epoch", "step"))


def test_check_bool_accepts_numpy_bool_as_plain_bool():
    assert check_bool("scale_lr", np.bool_(False)) is False
    with pytest.raises(TypeError, match="scale_lr must be a bool, got int"):
        check_bool("scale_lr", 0)


# -- the same values through every public entry point ------------------------------------

def test_policies_accept_numpy_scalars_and_store_plain_python_values():
    policies = [
        FreezeOut(t0=np.float32(0.5), scale_lr=np.bool_(False)),
        GradientChange(every=np.int64(10), percentile=np.float32(40.0), samples=np.int32(5)),
        Convergence(threshold=np.float64(0.95), every=np.int64(10), max_samples=np.int16(8), patience=np.int64(2)),
        Linear(np.float32(0.25), np.float64(0.5), np.str_("layers")),
    ]
    assert [p.describe() for p in policies] == [
        {"policy": "FreezeOut", "t0": 0.5, "spacing": "cubic", "scale_lr": False},
        {"policy": "GradientChange", "every": 10, "percentile": 40.0, "samples": 5},
        {"policy": "Convergence", "metric": "cka", "threshold": 0.95, "every": 10, "max_samples": 8, "patience": 2},
        {"policy": "Linear", "freeze_start": 0.25, "freeze_level": 0.5, "measure": "layers"},
    ]
    for policy in policies:
        assert all(type(v) in (str, int, float, bool) for v in policy.describe().values()), policy.describe()


def test_layerfreezing_accepts_numpy_scalars_as_python_values():
    freezing = lf.LayerFreezing(freeze_start=np.float32(0.25), freeze_level=np.float64(0.5),
                                interval=np.str_("step"), order=np.str_("definition"), batchnorm=np.str_("eval"),
                                shared=np.str_("trainable"), unit=np.str_("owner"), max_changes=np.int64(3))
    assert (freezing.interval, freezing.order, freezing.batchnorm, freezing.shared, freezing.unit) == (
        "step", "definition", "eval", "trainable", "owner")
    assert all(type(v) is str for v in (freezing.interval, freezing.order, freezing.batchnorm, freezing.shared,
                                        freezing.unit))
    assert freezing.max_changes == 3 and type(freezing.max_changes) is int


@pytest.mark.parametrize("build, error, message", [
    (lambda: lf.LayerFreezing(freeze_start=np.array([0.1, 0.2])), TypeError,
     r"freeze_start must be a number in \[0, 1\], got array\(\[0.1, 0.2\]\)"),
    (lambda: lf.LayerFreezing(freeze_level=np.array([0.5, 1.0])), TypeError,
     r"freeze_level must be a number in \[0, 1\], got array\(\[0.5, 1. \]\)"),
    (lambda: lf.LayerFreezing(interval=np.array(["epoch"])), ValueError,
     r"interval must be one of 'epoch', 'step', got array\(\['epoch'\], dtype='<U5'\)"),
    (lambda: lf.LayerFreezing(max_changes=np.array([3])), ValueError,
     r"max_changes must be a positive int or None, got array\(\[3\]\)"),
    (lambda: lf.LayerFreezing(policy=Linear(), freeze_start=np.array([0.1, 0.2])), ValueError,
     r"pass either policy=\.\.\. or freeze_start/freeze_level/measure, not both \(got freeze_start beside policy\)"),
    (lambda: FreezeOut(t0=np.array([0.5, 0.6])), TypeError, r"t0 must be a number in \(0, 1\], got array"),
    (lambda: FreezeOut(spacing=np.array(["cubic"])), ValueError, r"spacing must be one of 'linear', 'squared', 'cubic'"),
    (lambda: GradientChange(every=np.array([10, 20])), ValueError, r"every must be a positive int, got array"),
    (lambda: GradientChange(percentile=np.array([50.0])), TypeError, r"percentile must be a number in \[0, 100\]"),
    (lambda: Convergence(every=np.array([10])), ValueError, r"every must be a positive int, got array\(\[10\]\)"),
    (lambda: Convergence(threshold=np.array([0.9, 0.99])), TypeError, r"threshold must be a number in \(0, 1\]"),
    (lambda: Convergence(metric=np.array(["cka"])), ValueError, r"metric must be one of 'cka', got array"),
    (lambda: Linear(measure=np.array(["layers"])), ValueError, r"measure must be one of 'layers', 'flops', got array"),
])
def test_arrays_are_refused_naming_the_argument(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_attach_accepts_numpy_counts_and_refuses_arrays():
    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"total_steps must be a positive int, got array\(\[8, 8\]\)"):
        lf.LayerFreezing().attach(model, opt, total_steps=np.array([8, 8]))
    with pytest.raises(ValueError, match=r"steps_per_epoch must be a positive int or None, got array\(\[2\]\)"):
        lf.LayerFreezing().attach(model, opt, total_steps=8, steps_per_epoch=np.array([2]))
    assert all(p.requires_grad for p in model.parameters())
    freezing = lf.LayerFreezing().attach(model, opt, total_steps=np.int64(8), steps_per_epoch=np.int64(2))
    with pytest.raises(ValueError, match=r"depth must be an int in \[0, 2\], got array\(\[1\]\)"):
        freezing.set_depth(np.array([1]))
    assert freezing.frozen_depth == 0


@pytest.mark.parametrize("kwargs, error, message", [
    ({"current_duration": np.array([0.5, 0.9])}, TypeError,
     r"current_duration must be a number in \[0, 1\], got array\(\[0.5, 0.9\]\)"),
    ({"freeze_start": np.array([0.1, 0.2])}, TypeError, r"freeze_start must be a number in \[0, 1\], got array"),
    ({"freeze_level": np.array([1.0, 1.0])}, TypeError, r"freeze_level must be a number in \[0, 1\], got array"),
])
def test_freeze_layers_refuses_arrays_naming_the_argument_and_changes_nothing(kwargs, error, message):
    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = {"current_duration": 1.0, "freeze_start": 0.0, "freeze_level": 1.0, **kwargs}
    with pytest.raises(error, match=message):
        lf.freeze_layers(model, opt, **args)
    assert all(p.requires_grad for p in model.parameters()) and len(opt.param_groups[0]["params"]) == 6


def test_freeze_layers_accepts_numpy_durations():
    model = mlp(depth=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert lf.freeze_layers(model, opt, np.float64(0.75), np.float64(0.5), np.float64(1.0)) == (2, 0.5)


POLICIES = {
    "linear": lambda: Linear(np.float32(0.0), np.float64(1.0)),
    "freezeout": lambda: FreezeOut(t0=np.float32(0.25), spacing=np.str_("linear"), scale_lr=np.bool_(True)),
    "gradient": lambda: GradientChange(every=np.int64(2), percentile=np.float32(90.0), samples=np.int64(2)),
    "convergence": lambda: Convergence(threshold=np.float32(0.9999), every=np.int64(2), max_samples=np.int64(8)),
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_state_of_every_policy_loads_with_weights_only(name):
    torch.manual_seed(0)
    model = ConvBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    freezing = lf.LayerFreezing(policy=POLICIES[name](), interval=np.str_("step"), batchnorm=np.str_("eval"),
                                max_changes=np.int64(10))
    freezing.attach(model, opt, total_steps=np.int64(8), steps_per_epoch=np.int64(2))
    for step in range(5):
        train_step(model, [opt], batch_for(model, 4, torch.Generator().manual_seed(step)))
        freezing.step()
    buffer = io.BytesIO()
    torch.save({"freezing": freezing.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # refuses numpy scalars and strings
    torch.manual_seed(1)
    fresh = ConvBN()
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
    resumed = lf.LayerFreezing(policy=POLICIES[name](), interval="step", batchnorm="eval")
    resumed.attach(fresh, fresh_opt, total_steps=8, steps_per_epoch=2)
    resumed.load_state_dict(saved["freezing"])
    fresh_opt.load_state_dict(saved["opt"])
    assert resumed.frozen_parameters == freezing.frozen_parameters
    assert (resumed.frozen_depth, resumed.state_dict()["step"]) == (freezing.frozen_depth, 5)
