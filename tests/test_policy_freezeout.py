"""FreezeOut against the paper's formulas (Brock et al. 2017, ajbrock/FreezeOut)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import layerfreeze as lf
from layerfreeze.policies import FreezeOut
from layerfreeze.policies.freezeout import GROUP_KEY, freeze_times, lr_factor

from conftest import mlp


def paper_times(count: int, t0_pre: float, power: int) -> list[float]:
    # The reference code's rule: t_i = scale(t_0 + (1 - t_0) * i / (N - 1)), with
    # t_0 given "pre-cubed" and scale(x) = x ** power.
    return [(t0_pre + (1 - t0_pre) * i / (count - 1)) ** power for i in range(count)]


@pytest.mark.parametrize("spacing, power", [("linear", 1), ("squared", 2), ("cubic", 3)])
@pytest.mark.parametrize("count", [2, 5, 13])
def test_freeze_times_match_the_paper(spacing, power, count):
    t0_pre = 0.8  # the paper's default for cubic: the first layer freezes at 0.512
    ours = freeze_times(count, t0_pre ** power, spacing)
    assert ours == pytest.approx(paper_times(count, t0_pre, power), rel=1e-12)
    assert ours[0] == t0_pre ** power and ours[-1] == 1.0


def test_linear_spacing_is_the_stated_formula():
    t0, n = 0.5, 5
    assert freeze_times(n, t0, "linear") == [t0 + (1 - t0) * i / (n - 1) for i in range(n)]


def test_lr_factor_is_the_cosine_with_the_half_and_the_scaling():
    # lr_i(t) = 0.5 * lr0 * (1 + cos(pi * t / t_i)), divided by t_i with scale_lr.
    for t_i in (0.3, 0.75, 1.0):
        for t in (0.0, 0.1, 0.29, t_i / 2):
            expected = 0.5 * (1 + math.cos(math.pi * t / t_i))
            assert lr_factor(t, t_i, scale_lr=False) == expected
            assert lr_factor(t, t_i, scale_lr=True) == expected / t_i
        assert lr_factor(t_i, t_i) == 0.0 and lr_factor(1.0, t_i) == 0.0


@settings(max_examples=60, deadline=None)
@given(count=st.integers(1, 40), t0=st.floats(0.01, 1.0), spacing=st.sampled_from(["linear", "squared", "cubic"]))
def test_freeze_times_rise_from_t0_to_one(count, t0, spacing):
    times = freeze_times(count, t0, spacing)
    assert len(times) == count and times[0] == t0
    assert all(a <= b for a, b in zip(times, times[1:]))
    if count > 1:
        assert times[-1] == 1.0


@settings(max_examples=60, deadline=None)
@given(t=st.floats(0.0, 1.0), t_i=st.floats(0.01, 1.0), scale=st.booleans())
def test_lr_factor_is_bounded_and_zero_after_the_freeze_time(t, t_i, scale):
    factor = lr_factor(t, t_i, scale)
    assert 0.0 <= factor <= (1.0 / t_i if scale else 1.0)
    if t >= t_i:
        assert factor == 0.0


def attached(t0=0.5, spacing="linear", scale_lr=True, total_steps=8, interval="step", **opt_kwargs):
    torch.manual_seed(0)
    net = mlp(4, 6)  # layers 0, 2, 4, 6: three freezable
    opt = torch.optim.SGD(net.parameters(), lr=0.1, **opt_kwargs)
    freezing = lf.LayerFreezing(policy=FreezeOut(t0, spacing, scale_lr), interval=interval)
    freezing.attach(net, opt, total_steps=total_steps, steps_per_epoch=4 if interval == "epoch" else None)
    return net, opt, freezing


def test_each_layer_has_its_own_param_group_during_the_step_only():
    torch.manual_seed(0)
    net = mlp(4, 6)
    params = list(net.parameters())
    opt = torch.optim.SGD([{"params": params[:4], "lr": 0.1}, {"params": params[4:], "lr": 0.2}], momentum=0.9)
    original = [(g, list(g["params"]), dict((k, v) for k, v in g.items() if k != "params")) for g in opt.param_groups]
    freezing = lf.LayerFreezing(policy=FreezeOut(0.5), interval="step").attach(net, opt, total_steps=8)
    layer_params = {layer.name: [p for p in layer.module.parameters()] for layer in freezing.layers}
    during = []
    opt.register_step_pre_hook(lambda o, a, k: during.append([(g.get(GROUP_KEY), g["params"], g["momentum"])
                                                             for g in o.param_groups]))
    net(torch.randn(3, 6)).sum().backward()
    opt.step()
    # during the step: one group per layer, settings copied from the group it is in
    assert [name for name, _, _ in during[0]] == ["0", "2", "4", "6"]
    assert all(ps == layer_params[name] and m == 0.9 for name, ps, m in during[0])
    # between steps: the user's groups, the same objects with the same contents
    assert len(opt.param_groups) == 2
    for group, (same_group, ps, settings) in zip(opt.param_groups, original):
        assert group is same_group and group["params"] == ps
        assert {k: v for k, v in group.items() if k != "params"} == settings
    freezing.step()
    freezing.detach()
    assert len(opt._optimizer_step_pre_hooks) == 1 and not opt._optimizer_step_post_hooks  # only the test's


def effective_lrs(opt):
    seen = []

    def record(optimizer, args, kwargs):
        seen.append({g[GROUP_KEY]: g["lr"] for g in optimizer.param_groups if GROUP_KEY in g})

    opt.register_step_pre_hook(record)  # runs after FreezeOut's, which was registered first
    return seen


@pytest.mark.parametrize("scale_lr", [True, False])
@pytest.mark.parametrize("spacing", ["linear", "cubic"])
def test_learning_rate_during_each_step_follows_the_paper(scale_lr, spacing):
    net, opt, freezing = attached(t0=0.5, spacing=spacing, scale_lr=scale_lr, total_steps=8)
    seen = effective_lrs(opt)
    # the paper's freeze times, its t_0 given "pre-cubed": the first layer at 0.5 either way
    power = {"linear": 1, "cubic": 3}[spacing]
    times = dict(zip(["0", "2", "4"], paper_times(3, 0.5 ** (1 / power), power)))
    times["6"] = 1.0  # the last layer follows the whole-run cosine, as the paper's classifier
    for step in range(8):
        net(torch.randn(3, 6)).sum().backward()
        opt.step()
        opt.zero_grad()
        # between steps the group keeps its own rate: schedulers see what they set
        assert all(g["lr"] == 0.1 for g in opt.param_groups)
        freezing.step()
    assert len(seen) == 8 and sorted(seen[0]) == ["0", "2", "4", "6"]
    for step, lrs in enumerate(seen):
        for name, lr in lrs.items():
            # 0.5 * lr0 * (1 + cos(pi * t / t_i)) before t_i, divided by t_i with scale_lr; 0 after
            t, t_i = step / 8, times[name]
            paper = 0.0 if t >= t_i else 0.5 * 0.1 * (1 + math.cos(math.pi * t / t_i)) / (t_i if scale_lr else 1.0)
            assert lr == pytest.approx(paper, rel=1e-12, abs=1e-15), (step, name)


def test_layer_freezes_at_the_first_step_reaching_its_time():
    net, opt, freezing = attached(t0=0.5, spacing="linear", total_steps=8)  # times 0.5, 0.75, 1.0
    depths = []
    for _ in range(8):
        net(torch.randn(3, 6)).sum().backward()
        opt.step()
        opt.zero_grad()
        freezing.step()
        depths.append(freezing.frozen_depth)
    assert depths == [0, 0, 0, 1, 1, 2, 2, 3]
    assert freezing.frozen_fraction == 1.0


def test_layers_past_their_time_stay_still_until_the_epoch_end_freezes_them():
    # interval="epoch": layer "0" reaches t=0.25 at step 2 but freezes only at step 4.
    # Its rate is exactly 0 meanwhile, so momentum and weight decay cannot move it.
    net, opt, freezing = attached(t0=0.25, spacing="linear", total_steps=8, interval="epoch",
                                  momentum=0.9, weight_decay=0.1)
    for step in range(4):
        if step == 2:
            before = net[0].weight.detach().clone()
        net(torch.randn(3, 6)).sum().backward()
        opt.step()
        opt.zero_grad()
        freezing.step()
        if step < 3:
            assert freezing.frozen_depth == 0
    assert torch.equal(net[0].weight, before)
    assert freezing.frozen_depth >= 1


# Freeze times of mlp(4, 6)'s layers under FreezeOut(0.5, "linear") over 8 steps.
LINEAR_TIMES = {"0": 0.5, "2": 0.75, "4": 1.0, "6": 1.0}


def _halving_run(net, opt, scheduler, freezing, steps):
    """Train ``steps`` steps with a scheduler halving the LR each step; the LRs each step used."""
    seen = effective_lrs(opt)
    for _ in range(steps):
        net(torch.randn(3, 6)).sum().backward()
        opt.step()
        opt.zero_grad()
        scheduler.step()
        freezing.step()
    return [(step, name, lr, 0.1 * 0.5 ** step * lr_factor(step / 8, LINEAR_TIMES[name], False))
            for step, lrs in enumerate(seen) for name, lr in lrs.items()]


def test_scheduler_built_after_attach_composes_multiplicatively():
    net, opt, freezing = attached(t0=0.5, spacing="linear", scale_lr=False, total_steps=8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5 ** epoch)
    for step, name, lr, expected in _halving_run(net, opt, scheduler, freezing, 4):
        assert lr == pytest.approx(expected, rel=1e-15), (step, name)


def test_scheduler_built_before_attach_still_drives_every_layer():
    # What trainers do (Hugging Face, Lightning, the bench): the scheduler exists
    # first. torch 2.13's schedulers zip strictly over the groups, so their number
    # must never change between steps.
    torch.manual_seed(0)
    net = mlp(4, 6)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    freezing = lf.LayerFreezing(policy=FreezeOut(0.5, "linear", False), interval="step")
    freezing.attach(net, opt, total_steps=8)
    results = _halving_run(net, opt, scheduler, freezing, 3)
    assert results
    for step, name, lr, expected in results:
        assert lr == expected, (step, name)


def test_values_an_optimizer_writes_into_its_groups_are_kept():
    class Counting(torch.optim.SGD):
        # keeps a running value in the group, as some adaptive optimizers do
        def step(self, closure=None):
            for group in self.param_groups:
                group["seen"] = group.get("seen", 0) + 1
            return super().step(closure)

    net = mlp(3, 6)
    opt = Counting(net.parameters(), lr=0.1)
    freezing = lf.LayerFreezing(policy=FreezeOut(), interval="step").attach(net, opt, total_steps=8)
    for _ in range(3):
        net(torch.randn(3, 6)).sum().backward()
        opt.step()
        opt.zero_grad()
        freezing.step()
    assert opt.param_groups[0]["seen"] == 3 and opt.param_groups[0]["lr"] == 0.1


def during_step_groups(net, opt):
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append([(g.get(GROUP_KEY), g["params"]) for g in o.param_groups]))
    net_input = torch.randint(0, 7, (2, 3)) if hasattr(net, "embed") else torch.randn(2, 6)
    net(net_input).float().sum().backward()
    opt.step()
    return seen[0]


def test_tied_parameter_goes_to_the_group_of_the_first_layer_holding_it():
    from conftest import Tied

    net = Tied()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    lf.LayerFreezing(policy=FreezeOut(), interval="step").attach(net, opt, total_steps=4)
    groups = dict(during_step_groups(net, opt))
    assert any(p is net.embed.weight for p in groups["embed"])
    assert "out" not in groups  # its only parameter is the tied one
    assert sum(len(ps) for ps in groups.values()) == len(list(net.parameters()))


def test_parameters_outside_every_layer_get_a_group_of_their_own():
    from conftest import OwnsParams

    net = OwnsParams()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    lf.LayerFreezing(policy=FreezeOut(), interval="step").attach(net, opt, total_steps=4)
    groups = during_step_groups(net, opt)
    assert groups[0][0] is None and groups[0][1] == [net.scale]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"t0": 0.0}, ValueError, r"t0 must be in \(0, 1\], got 0.0"),
        ({"t0": 1.5}, ValueError, r"t0 must be in \(0, 1\], got 1.5"),
        ({"t0": True}, TypeError, r"t0 must be a number in \(0, 1\], got True"),
        ({"spacing": "quartic"}, ValueError, r"spacing must be one of 'linear', 'squared', 'cubic', got 'quartic'"),
        ({"scale_lr": "yes"}, TypeError, r"scale_lr must be a bool, got str"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        FreezeOut(**kwargs)


def test_describe_is_plain_settings():
    assert FreezeOut(0.4, "linear", False).describe() == {
        "policy": "FreezeOut", "t0": 0.4, "spacing": "linear", "scale_lr": False,
    }


def test_optimizer_state_dict_is_as_without_freezeout():
    net, opt, freezing = attached(total_steps=8, momentum=0.9)
    for _ in range(5):
        net(torch.randn(3, 6)).sum().backward()
        opt.step()
        opt.zero_grad()
        freezing.step()
    groups = opt.state_dict()["param_groups"]
    assert len(groups) == 1 and GROUP_KEY not in groups[0] and groups[0]["lr"] == 0.1
    assert freezing.policy.state_dict() == {"step": 5}
