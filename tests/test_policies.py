"""What every policy promises through LayerFreezing(policy=...): the frozen set is a
prefix of the layer order, it never shrinks, frozen weights stay still bit for bit,
and a run checkpointed at step k and resumed in fresh objects continues bit-identically."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import layerfreeze as lf
from layerfreeze.policies import Convergence, FixedDepth, FreezeOut, GradientChange, Linear, Policy

from conftest import ConvBN, Swapped, TinyEncoder, batch_for, mlp

STEPS = 12


def make_policy(name: str) -> Policy:
    # Settings that freeze something within STEPS tiny steps.
    return {
        "linear": lambda: Linear(0.2, 1.0),
        "freezeout": lambda: FreezeOut(t0=0.3, spacing="cubic"),
        "freezeout_linear": lambda: FreezeOut(t0=0.25, spacing="linear", scale_lr=False),
        "gradient": lambda: GradientChange(every=2, percentile=90.0),
        "gradient_sampled": lambda: GradientChange(every=4, percentile=90.0, samples=2),
        "convergence": lambda: Convergence(threshold=0.9999, every=2, max_samples=8),
        "fixed": lambda: FixedDepth(2, start=0.25),
    }[name]()


POLICIES = ["linear", "freezeout", "freezeout_linear", "gradient", "gradient_sampled", "convergence", "fixed"]
MODELS = {"mlp": lambda: mlp(5, 6), "convbn": ConvBN, "encoder": TinyEncoder, "swapped": Swapped}


def build(model_name: str, policy: str, interval: str, seed: int = 0):
    torch.manual_seed(seed)
    model = MODELS[model_name]()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    order = "execution" if model_name == "swapped" else "definition"
    freezing = lf.LayerFreezing(policy=make_policy(policy), interval=interval, order=order)
    freezing.attach(model, opt, total_steps=STEPS, steps_per_epoch=3 if interval == "epoch" else None)
    return model, opt, freezing


def batch(model: nn.Module, step: int) -> torch.Tensor:
    return batch_for(model, 4, torch.Generator().manual_seed(1000 + step))


def one_step(model, opt, freezing, step) -> None:
    out = model(batch(model, step))
    out.float().pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    freezing.step()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("interval", ["step", "epoch"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_frozen_set_is_a_growing_prefix_and_frozen_weights_stay_still(model_name, policy, interval):
    model, opt, freezing = build(model_name, policy, interval)
    depths, frozen_at = [], {}
    for step in range(STEPS):
        one_step(model, opt, freezing, step)
        depth = freezing.frozen_depth
        depths.append(depth)
        layers = freezing.layers
        expected = {n for layer in layers[:depth] for n in layer.param_names}
        assert set(freezing.frozen_parameters) == expected  # a prefix of the layer order
        in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
        for name, p in model.named_parameters():
            if name in expected:
                assert not p.requires_grad and p.grad is None and id(p) not in in_groups
                frozen_at.setdefault(name, p.detach().clone())
                assert torch.equal(p, frozen_at[name]), f"{name} moved after freezing"
    assert depths == sorted(depths), f"depth shrank: {depths}"
    assert depths[-1] > 0, f"{policy} froze nothing on {model_name}: {depths}"


def same(a, b) -> bool:
    """Equal as data: tensors bit for bit, containers element-wise."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def _checkpoint(model, opt, freezing) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "freezing": freezing.state_dict(),
                "rng": torch.get_rng_state()}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("interval", ["step", "epoch"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("model_name", ["convbn", "swapped"])
def test_resumed_run_continues_bit_identically(model_name, policy, interval):
    model, opt, freezing = build(model_name, policy, interval)
    depths, states = [], []
    for step in range(STEPS):
        one_step(model, opt, freezing, step)
        depths.append(freezing.frozen_depth)
        states.append(freezing.state_dict())
    reference = snapshot(model)

    for cut in (5, 7):  # inside a GradientChange window (odd) and right after a probe
        model, opt, freezing = build(model_name, policy, interval)
        for step in range(cut):
            one_step(model, opt, freezing, step)
        saved = torch.load(io.BytesIO(_checkpoint(model, opt, freezing)), weights_only=False)

        model, opt, freezing = build(model_name, policy, interval, seed=123)  # other initial weights
        model.load_state_dict(saved["model"])
        freezing.load_state_dict(saved["freezing"])
        opt.load_state_dict(saved["opt"])
        torch.set_rng_state(saved["rng"])
        resumed = depths[:cut]
        for step in range(cut, STEPS):
            one_step(model, opt, freezing, step)
            resumed.append(freezing.frozen_depth)
            # the policy's observations (sums, grams, steps) match after every step
            assert same(freezing.state_dict(), states[step]), f"state differs at step {step}"
        assert resumed == depths
        final = snapshot(model)
        for name in reference:
            assert torch.equal(final[name], reference[name]), f"{name} differs after resume at step {cut}"


@pytest.mark.parametrize("policy", ["freezeout", "gradient", "convergence"])
def test_state_dict_round_trips_into_a_fresh_policy(policy):
    model, opt, freezing = build("convbn", policy, "step")
    for step in range(7):
        one_step(model, opt, freezing, step)
    state = freezing.state_dict()
    _, _, other = build("convbn", policy, "step", seed=5)
    other.load_state_dict(state)
    again = other.state_dict()

    assert same(state, again)


@pytest.mark.parametrize("policy, message", [
    ("freezeout", r"state_dict\.policy is not from FreezeOut\.state_dict\(\): missing key 'step'"),
    ("gradient", r"state_dict\.policy is not from GradientChange\.state_dict\(\): missing key 'count'"),
    ("convergence", r"state_dict\.policy is not from Convergence\.state_dict\(\): missing key 'probe'"),
])
def test_malformed_policy_state_is_refused(policy, message):
    _, _, freezing = build("mlp", policy, "step")
    state = freezing.state_dict()
    state["policy"] = {"nonsense": 1}
    with pytest.raises(ValueError, match=message):
        freezing.load_state_dict(state)


@pytest.mark.parametrize("policy", ["freezeout", "gradient", "convergence"])
def test_detach_removes_every_hook(policy):
    model, opt, freezing = build("mlp", policy, "step")
    one_step(model, opt, freezing, 0)
    freezing.detach()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert not model._forward_pre_hooks and all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("policy", ["freezeout", "gradient", "convergence"])
def test_describe_names_the_policy_in_checkpoint_config(policy):
    _, _, freezing = build("mlp", policy, "step")
    config = freezing.state_dict()["config"]
    assert config["policy"] == type(freezing.policy).__name__


# -- loading is all-or-nothing ------------------------------------------------------------

def _edit(field, value):
    def edit(policy_state):
        policy_state[field] = value(policy_state) if callable(value) else value
    return edit


@pytest.mark.parametrize("policy, edit, message", [
    ("freezeout", _edit("step", -1), r"state_dict\.policy\.step must be a non-negative int, got -1"),
    ("freezeout", _edit("step", "7"), r"state_dict\.policy\.step must be a non-negative int, got '7'"),
    ("gradient", _edit("previous", "abc"), r"state_dict\.policy\.previous must be a dict of names or None, got 'abc'"),
    ("gradient", _edit("changes", 3), r"state_dict\.policy\.changes must be a dict of names or None, got 3"),
    ("gradient", _edit("changes", [0.1]), r"state_dict\.policy\.changes must be a dict of names or None, got \[0.1\]"),
    ("gradient", _edit("count", "x"), r"state_dict\.policy\.count must be a non-negative int, got 'x'"),
    ("gradient", _edit("target", 1.0), r"state_dict\.policy\.target must be a non-negative int, got 1.0"),
    ("gradient", _edit("sums", {"features.0": "b"}),
     r"state_dict\.policy\.sums\['features.0'\] must be a number, got 'b'"),
    ("gradient", _edit("previous", lambda s: {**s["previous"], "head": None}),
     r"state_dict\.policy\.previous\['head'\] must be a number, got None"),
    ("gradient", _edit("measured", lambda s: s["count"] + 1),
     r"state_dict\.policy\.measured must be at most state_dict\.policy\.count \(1\), got 2"),
    ("convergence", _edit("probe", "abc"),
     r"state_dict\.policy\.probe must be None or a pair \(positional inputs, keyword inputs\) holding a tensor, got str"),
    ("convergence", _edit("grams", {"features.0": torch.zeros(2, 3)}),
     r"state_dict\.policy\.grams\['features.0'\] must be a square matrix \(a 2-d tensor\), got a tensor of shape \(2, 3\)"),
    ("convergence", _edit("streaks", {"features.0": -1}),
     r"state_dict\.policy\.streaks\['features.0'\] must be a non-negative int, got -1"),
    ("convergence", _edit("similarity", {"features.0": "high"}),
     r"state_dict\.policy\.similarity\['features.0'\] must be a number, got 'high'"),
    # a valid new probe before a bad field: the probe is not replaced either
    ("convergence", lambda s: s.update(probe=((torch.ones(2, 1, 6, 6),), {}), target="x"),
     r"state_dict\.policy\.target must be a non-negative int, got 'x'"),
])
def test_a_bad_policy_field_is_refused_by_path_and_nothing_is_loaded(policy, edit, message):
    twin_model, twin_opt, twin = build("convbn", policy, "step")  # never sees the refused state
    expected = []
    for step in range(STEPS):
        one_step(twin_model, twin_opt, twin, step)
        expected.append(twin.state_dict())

    model, opt, freezing = build("convbn", policy, "step")
    for step in range(7):
        one_step(model, opt, freezing, step)
    source = freezing.state_dict()
    for step in range(7, 9):  # this run moves on; the refused load must leave it here
        one_step(model, opt, freezing, step)
    before = freezing.state_dict()
    groups = [list(g["params"]) for g in opt.param_groups]
    edit(source["policy"])
    with pytest.raises(ValueError, match=message):
        freezing.load_state_dict(source)
    assert same(freezing.state_dict(), before)
    assert [list(g["params"]) for g in opt.param_groups] == groups

    for step in range(9, STEPS):  # the next steps act on the run's own state, not on part of the refused one
        one_step(model, opt, freezing, step)
        assert same(freezing.state_dict(), expected[step]), f"state differs at step {step}"


def test_a_refused_state_before_attach_is_not_kept():
    _, _, source = build("convbn", "gradient", "step")
    state = source.state_dict()
    state["policy"]["previous"] = "abc"
    pending = lf.LayerFreezing(policy=make_policy("gradient"), interval="step")
    with pytest.raises(ValueError, match=r"state_dict\.policy\.previous must be a dict of names or None"):
        pending.load_state_dict(state)
    model = ConvBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pending.attach(model, opt, total_steps=STEPS)  # starts fresh: nothing pending
    assert pending.state_dict()["policy"]["previous"] is None


@pytest.mark.parametrize("policy, state, message", [
    (lambda: GradientChange(), {"count": 0, "measured": 0, "sums": {}, "previous": "abc", "target": 0,
                                "changes": None}, r"^policy\.previous must be a dict of names or None, got 'abc'"),
    (lambda: FreezeOut(), {"step": None}, r"^policy\.step must be a non-negative int, got None"),
    (lambda: Convergence(), [], r"^policy must be a dict from Convergence\.state_dict\(\), got list"),
])
def test_policy_load_state_dict_called_directly_names_the_field(policy, state, message):
    with pytest.raises(ValueError, match=message):
        policy().load_state_dict(state)


@pytest.mark.parametrize("policy, total, message", [
    (lambda: GradientChange(every=50), 60, "GradientChange(every=50) compares two windows of 50 steps before its "
     "first decision, at step 100, but the run has 60 steps: nothing will freeze. HINT: pass every <= 30"),
    (lambda: Convergence(every=40), 60, "Convergence(every=40) compares its first two probes at step 80, but the "
     "run has 60 steps: nothing will freeze. HINT: pass every <= 30"),
    (lambda: GradientChange(every=30), 60, None),
    (lambda: Convergence(every=30), 60, None),
])
def test_adaptive_policies_say_when_the_run_is_too_short_to_decide(policy, total, message, caplog):
    model = mlp(5, 6)
    with caplog.at_level("WARNING", logger="layerfreeze"):
        lf.LayerFreezing(policy=policy(), interval="step").attach(
            model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=total)
    if message is None:
        assert "nothing will freeze" not in caplog.text
    else:
        assert message in caplog.text
