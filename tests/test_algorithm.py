import logging
import math

import pytest
import torch
from torch import nn

import layerfreeze as lf

from conftest import ConvBN, Swapped, batch_for, mlp, train_step


def run(freezing, model, opt, steps, epoch_every=None):
    depths = []
    for step in range(1, steps + 1):
        train_step(model, [opt], batch_for(model))
        freezing.step()
        if epoch_every and step % epoch_every == 0:
            freezing.epoch_end()
        depths.append(freezing.frozen_depth)
    return depths


def test_epoch_interval_freezes_only_at_epoch_ends_like_composer():
    model = mlp(depth=5)  # 5 layers: depth = int(fraction * 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    freezing = lf.LayerFreezing(freeze_start=0.0).attach(model, opt, total_steps=12, steps_per_epoch=3)
    depths = run(freezing, model, opt, 12)
    # epoch ends at steps 3, 6, 9, 12: fractions 0.25, 0.5, 0.75, 1.0
    assert depths == [0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4]
    assert freezing.frozen_fraction == 1.0


def test_epoch_ends_from_calls_when_steps_per_epoch_is_unknown():
    model = mlp(depth=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    freezing = lf.LayerFreezing(freeze_start=0.0).attach(model, opt, total_steps=12)
    assert run(freezing, model, opt, 12, epoch_every=6) == [0] * 5 + [2] * 6 + [4]


def test_step_interval_follows_schedule_every_step():
    model = mlp(depth=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    freezing = lf.LayerFreezing(freeze_start=0.5, interval="step").attach(model, opt, total_steps=8)
    depths = run(freezing, model, opt, 8)
    # after step s of 8: int((s/8 - 0.5) / 0.5 * 4)
    assert depths == [0, 0, 0, 0, 1, 2, 3, 4]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["8.weight", "8.bias"]


def test_matches_functional_form_at_every_epoch_end():
    torch.manual_seed(0)
    a, b = ConvBN(), ConvBN()
    b.load_state_dict(a.state_dict())
    opt_a = torch.optim.SGD(a.parameters(), lr=0.01)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.01)
    freezing = lf.LayerFreezing(freeze_start=0.2, freeze_level=0.8).attach(a, opt_a, 10, steps_per_epoch=2)
    for step in range(1, 11):
        freezing.step()
        if step % 2 == 0:
            depth, fraction = lf.freeze_layers(b, opt_b, step / 10, 0.2, 0.8)
            assert (freezing.frozen_depth, freezing.frozen_fraction) == (depth, fraction)
            assert [p.requires_grad for p in a.parameters()] == [p.requires_grad for p in b.parameters()]


def test_logs_composer_keys_through_log_fn_and_logging(caplog):
    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = []
    freezing = lf.LayerFreezing(freeze_start=0.0, interval="step", log_fn=seen.append)
    freezing.attach(model, opt, total_steps=2)
    with caplog.at_level(logging.INFO, logger="layerfreeze"):
        freezing.step()
        freezing.step()
    assert seen == [
        {"layer_freezing/layers_frozen": 1, "layer_freezing/percentage_frozen": 0.5, "layer_freezing/params_frozen": 2},
        {"layer_freezing/layers_frozen": 2, "layer_freezing/percentage_frozen": 1.0, "layer_freezing/params_frozen": 4},
    ]
    assert "frozen depth 0 -> 1 of 3 layers" in caplog.text
    assert freezing.metrics == seen[-1]


def test_execution_order_traced_from_first_training_forward():
    model = Swapped()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    freezing = lf.LayerFreezing(freeze_start=0.0, order="execution", interval="step").attach(model, opt, 2)
    train_step(model, [opt], batch_for(model))
    freezing.step()
    assert [layer.name for layer in freezing.layers] == ["c", "a", "b"]
    assert freezing.frozen_parameters == ["c.bias", "c.weight"]
    assert model.a.weight.requires_grad


def test_execution_order_from_example_inputs():
    model = Swapped()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    freezing = lf.LayerFreezing(order="execution").attach(model, opt, 2, example_inputs=torch.randn(1, 5))
    assert [layer.name for layer in freezing.layers] == ["c", "a", "b"]


def test_execution_order_without_forward_refuses_to_guess():
    model = Swapped()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    freezing = lf.LayerFreezing(freeze_start=0.0, order="execution", interval="step").attach(model, opt, 1)
    with pytest.raises(RuntimeError, match="order='execution' needs one forward pass"):
        freezing.step()
    assert all(p.requires_grad for p in model.parameters())


def test_set_depth_unfreezes_into_original_groups():
    model = mlp(depth=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    original = list(opt.param_groups[0]["params"])
    freezing = lf.LayerFreezing().attach(model, opt, 10)
    freezing.set_depth(3)
    assert len(opt.param_groups[0]["params"]) == 2
    freezing.set_depth(1)
    assert opt.param_groups[0]["params"] == original[2:]
    freezing.detach()
    assert opt.param_groups[0]["params"] == original
    with pytest.raises(ValueError, match=r"depth must be an int in \[0, 3\], got 4"):
        lf.LayerFreezing().attach(model, opt, 10).set_depth(4)


def test_monotone_policy_never_shrinks_after_manual_depth():
    model = mlp(depth=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    freezing = lf.LayerFreezing(freeze_start=0.5, interval="step").attach(model, opt, 10)
    freezing.set_depth(3)
    freezing.step()  # schedule says 0; the depth is kept
    assert freezing.frozen_depth == 3


def test_max_changes_bounds_freeze_events():
    model = mlp(depth=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    freezing = lf.LayerFreezing(freeze_start=0.0, interval="step", max_changes=2).attach(model, opt, 4)
    assert run(freezing, model, opt, 4) == [1, 2, 2, 2]


def test_progress_past_total_steps_is_held_at_one(caplog):
    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    freezing = lf.LayerFreezing(freeze_start=0.0, interval="step").attach(model, opt, 1)
    with caplog.at_level(logging.WARNING, logger="layerfreeze"):
        freezing.step()
        freezing.step()
    assert freezing.frozen_depth == 2
    assert "progress is held at 1.0" in caplog.text


def test_warns_when_configuration_freezes_nothing(caplog):
    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with caplog.at_level(logging.WARNING, logger="layerfreeze"):
        lf.LayerFreezing(freeze_level=0.4).attach(model, opt, 10)
    assert "freeze_level=0.4 with 3 layers freezes nothing" in caplog.text


def test_warns_one_epoch_runs_with_epoch_interval(caplog):
    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with caplog.at_level(logging.WARNING, logger="layerfreeze"):
        lf.LayerFreezing().attach(model, opt, 10, steps_per_epoch=10)
    assert "HINT: pass interval='step'" in caplog.text


def test_batchnorm_hint_when_frozen_statistics_move(caplog):
    model = ConvBN()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with caplog.at_level(logging.WARNING, logger="layerfreeze"):
        lf.LayerFreezing().attach(model, opt, 10).set_depth(2)
    assert "HINT: pass batchnorm='eval'" in caplog.text


# -- bad input -----------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    ({"freeze_start": 1.5}, ValueError, r"freeze_start must be in \[0, 1\], got 1.5"),
    ({"freeze_level": math.nan}, ValueError, r"freeze_level must be in \[0, 1\], got nan"),
    ({"freeze_start": 1.0}, ValueError, "freeze_start=1.0 leaves no training"),
    ({"interval": "batch"}, ValueError, "interval must be one of 'epoch', 'step', got 'batch'"),
    ({"order": "forward"}, ValueError, "order must be one of 'definition', 'execution', got 'forward'"),
    ({"batchnorm": "frozen"}, ValueError, "batchnorm must be one of 'train', 'eval', got 'frozen'"),
    ({"shared": "x"}, ValueError, "shared must be one of 'freeze', 'trainable', got 'x'"),
    ({"unit": "x"}, ValueError, "unit must be one of 'leaf', 'owner', got 'x'"),
    ({"measure": "params"}, ValueError, "measure must be one of 'layers', 'flops', got 'params'"),
    ({"max_changes": 0}, ValueError, "max_changes must be a positive int or None, got 0"),
    ({"log_fn": 3}, TypeError, "log_fn must be callable, got int"),
    ({"policy": "linear"}, TypeError, "policy must be a layerfreeze.policies.Policy, got str"),
    ({"policy": lf.policies.Linear(), "freeze_start": 0.1}, ValueError, "pass either policy=... or freeze_start"),
])
def test_bad_constructor_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        lf.LayerFreezing(**kwargs)


def _opt(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


@pytest.mark.parametrize("args, error, message", [
    (lambda m, o: ("model", o, 10), TypeError, "model must be a torch.nn.Module, got str"),
    (lambda m, o: (nn.ReLU(), o, 10), ValueError, "model must have at least one parameter"),
    (lambda m, o: (m, None, 10), TypeError, "optimizers must be a torch.optim.Optimizer"),
    (lambda m, o: (m, _opt(mlp()), 10), ValueError, r"optimizers\[0\] \(SGD\) holds none"),
    (lambda m, o: (m, [o, _opt(mlp())], 10), ValueError, r"optimizers\[1\] \(SGD\) holds none"),
    (lambda m, o: (m, o, 0), ValueError, "total_steps must be a positive int, got 0"),
    (lambda m, o: (m, o, -5), ValueError, "total_steps must be a positive int, got -5"),
    (lambda m, o: (m, o, 2.5), ValueError, "total_steps must be a positive int, got 2.5"),
    (lambda m, o: (m, o, 10, 0), ValueError, "steps_per_epoch must be a positive int or None, got 0"),
    (lambda m, o: ("model", None, 0), TypeError, "model must be"),  # signature order: model first
    (lambda m, o: (m, None, 0), TypeError, "optimizers must be"),
])
def test_bad_attach_arguments_change_nothing(args, error, message):
    model = ConvBN()
    opt = _opt(model)
    train_step(model, [opt], batch_for(model))
    groups = [list(g["params"]) for g in opt.param_groups]
    freezing = lf.LayerFreezing(freeze_start=0.0, interval="step")
    with pytest.raises(error, match=message):
        freezing.attach(*args(model, opt))
    assert all(p.requires_grad for p in model.parameters())
    assert [list(g["params"]) for g in opt.param_groups] == groups and len(opt.state) == 10
    with pytest.raises(RuntimeError, match=r"step\(\) called before attach\(\)"):
        freezing.step()


def test_flops_measure_needs_example_inputs():
    model = ConvBN()
    with pytest.raises(ValueError, match="example_inputs is required with measure='flops'"):
        lf.LayerFreezing(measure="flops").attach(model, _opt(model), 10)


def test_attach_twice_is_refused():
    model = ConvBN()
    freezing = lf.LayerFreezing().attach(model, _opt(model), 10)
    with pytest.raises(RuntimeError, match="already attached; call detach"):
        freezing.attach(model, _opt(model), 10)


@pytest.mark.parametrize("method", ["step", "epoch_end", "state_dict"])
def test_events_before_attach_are_refused(method):
    with pytest.raises(RuntimeError, match=rf"{method}\(\) called before attach\(\)"):
        getattr(lf.LayerFreezing(), method)()


def test_warns_when_epoch_end_is_never_called(caplog):
    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    freezing = lf.LayerFreezing(freeze_start=0.0).attach(model, opt, total_steps=4)
    with caplog.at_level(logging.WARNING, logger="layerfreeze"):
        for _ in range(4):
            freezing.step()
    assert caplog.text.count("epoch_end() was never called") == 1
    assert freezing.frozen_depth == 0


def test_numpy_integers_are_accepted_as_step_counts():
    np = pytest.importorskip("numpy")
    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    freezing = lf.LayerFreezing().attach(model, opt, total_steps=np.int64(8), steps_per_epoch=np.int32(2))
    assert freezing.total_steps == 8 and type(freezing.total_steps) is int


def test_checkpoint_before_the_execution_trace_keeps_tracing_after_resume():
    model = Swapped()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    source = lf.LayerFreezing(freeze_start=0.0, order="execution", interval="step").attach(model, opt, 2)
    state = source.state_dict()
    assert state["traced"] is False
    fresh = Swapped()
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.01)
    resumed = lf.LayerFreezing(freeze_start=0.0, order="execution", interval="step")
    resumed.load_state_dict(state)
    resumed.attach(fresh, fresh_opt, 2)
    train_step(fresh, [fresh_opt], batch_for(fresh))
    resumed.step()
    assert [layer.name for layer in resumed.layers] == ["c", "a", "b"]


def test_bad_example_inputs_name_the_argument_and_leave_no_flop_counter_behind():
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    freezing = lf.LayerFreezing(measure="flops")
    with pytest.raises(ValueError, match="example_inputs could not be run through the model"):
        freezing.attach(model, opt, 10, example_inputs=torch.randn(2, 7))
    assert _get_current_dispatch_mode_stack() == []
    assert all(p.requires_grad for p in model.parameters())
    freezing.attach(model, opt, 10, example_inputs=torch.randn(2, 6))  # a corrected call works


def test_attach_after_detach_starts_a_fresh_run():
    freezing = lf.LayerFreezing(freeze_start=0.5, interval="step")
    for _ in range(2):
        model = mlp(depth=4)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        freezing.attach(model, opt, total_steps=4)
        assert freezing.frozen_depth == 0
        assert run(freezing, model, opt, 4) == [0, 0, 1, 3]
        freezing.detach()


def test_a_policy_serves_one_layerfreezing_at_a_time():
    policy = lf.policies.Linear(0.0)
    first, second = lf.LayerFreezing(policy=policy), lf.LayerFreezing(policy=policy)
    a, b = mlp(), mlp()
    first.attach(a, torch.optim.SGD(a.parameters(), lr=0.1), 4)
    with pytest.raises(ValueError, match="policy Linear is attached through another LayerFreezing"):
        second.attach(b, torch.optim.SGD(b.parameters(), lr=0.1), 4)
    assert all(p.requires_grad for p in b.parameters())
    first.detach()
    second.attach(b, torch.optim.SGD(b.parameters(), lr=0.1), 4)


def test_set_depth_accepts_numpy_integers():
    np = pytest.importorskip("numpy")
    model = mlp(depth=4)
    freezing = lf.LayerFreezing().attach(model, torch.optim.SGD(model.parameters(), lr=0.1), 4)
    freezing.set_depth(np.int64(2))
    assert freezing.frozen_depth == 2 and type(freezing.state_dict()["depth"]) is int


@pytest.mark.parametrize("policy", [None, "gradient", "convergence"])
def test_one_epoch_run_deciding_at_epoch_ends_is_warned_whatever_the_policy(policy, caplog):
    policies = {None: lambda: None, "gradient": lambda: lf.policies.GradientChange(every=2),
                "convergence": lambda: lf.policies.Convergence(every=2)}
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = {} if policy is None else {"policy": policies[policy]()}
    with caplog.at_level("WARNING", logger="layerfreeze"):
        lf.LayerFreezing(interval="epoch", **kwargs).attach(model, opt, total_steps=10, steps_per_epoch=10)
    assert "one-epoch run with interval='epoch' freezes only after its last step" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="layerfreeze"):
        lf.LayerFreezing(interval="epoch", **({} if policy is None else {"policy": policies[policy]()})).attach(
            model, opt, total_steps=10, steps_per_epoch=5)
    assert "one-epoch" not in caplog.text


def _encoder() -> nn.TransformerEncoder:
    torch.manual_seed(0)
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2,
                                 enable_nested_tensor=False)


@pytest.mark.parametrize("unit, model, warned", [("leaf", _encoder, True), ("owner", _encoder, False),
                                                 ("leaf", mlp, False)])
def test_parameters_no_leaf_layer_holds_are_named_at_attach_with_a_hint(unit, model, warned, caplog):
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with caplog.at_level("WARNING", logger="layerfreeze"):
        lf.LayerFreezing(unit=unit).attach(net, opt, total_steps=10)
    text = caplog.text
    assert ("belong to no layer" in text) == warned
    if warned:  # in_proj_weight and in_proj_bias of 2 attention modules
        assert "4 trainable parameter(s) belong to no layer under unit='leaf'" in text
        assert "layers.0.self_attn.in_proj_weight" in text and "HINT: unit='owner'" in text


def test_policy_objects_carry_no_bookkeeping_of_the_algorithm():
    policy = lf.policies.Linear(0.0)
    before = set(vars(policy))
    freezing = lf.LayerFreezing(policy=policy)
    model = mlp()
    freezing.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), 4)
    assert set(vars(policy)) - before == {"context"}  # what Policy.bind keeps, nothing else
    freezing.detach()
    assert set(vars(policy)) - before == {"context"}


def test_an_unhashable_policy_serves_one_layerfreezing_at_a_time():
    import dataclasses

    @dataclasses.dataclass  # eq=True: instances are unhashable
    class Halfway(lf.policies.Policy):
        at: float = 0.5

        def decide(self, progress):
            depth = len(self.context.layers) // 2 if progress.current_duration >= self.at else 0
            return depth, float(depth)

    policy = Halfway()
    first, second = lf.LayerFreezing(policy=policy, interval="step"), lf.LayerFreezing(policy=policy)
    a, b = mlp(depth=5), mlp(depth=5)
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    first.attach(a, opt, 4)
    with pytest.raises(ValueError, match="policy Halfway is attached through another LayerFreezing"):
        second.attach(b, torch.optim.SGD(b.parameters(), lr=0.1), 4)
    assert run(first, a, opt, 4) == [0, 2, 2, 2]
    first.detach()
    second.attach(b, torch.optim.SGD(b.parameters(), lr=0.1), 4)


def test_a_policys_hints_are_logged_at_attach(caplog):
    class Never(lf.policies.Policy):
        def decide(self, progress):
            return 0, 0.0

        def hints(self, context):
            return [f"Never freezes any of {len(context.layers)} layers. HINT: pick another policy"]

    model = mlp(depth=3)
    with caplog.at_level(logging.WARNING, logger="layerfreeze"):
        lf.LayerFreezing(policy=Never()).attach(model, torch.optim.SGD(model.parameters(), lr=0.1), 4)
    assert "layerfreeze: Never freezes any of 3 layers. HINT: pick another policy" in caplog.text


def test_a_policys_numpy_fraction_is_stored_as_a_plain_float():
    np = pytest.importorskip("numpy")

    class Half(lf.policies.Policy):
        def decide(self, progress):
            return np.int64(1), np.float32(0.5)

    model = mlp(depth=3)
    freezing = lf.LayerFreezing(policy=Half(), interval="step").attach(
        model, torch.optim.SGD(model.parameters(), lr=0.1), 4)
    freezing.step()
    assert freezing.frozen_depth == 1 and type(freezing.frozen_fraction) is float
    assert type(freezing.state_dict()["fraction"]) is float
