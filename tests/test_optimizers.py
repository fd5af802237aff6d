"""Freezing with every torch.optim optimizer, and with what keeps parameters outside param groups.

The parametrized tests run every optimizer torch ships, with the variants this
machine can run (foreach, fused; capturable ones need CUDA and run where it is
present; ``differentiable=True`` cannot step a module's leaf parameters at all,
freezing or not). For each: frozen weights never move, bit for bit, through
freezes and an unfreeze; ``state_dict`` works after every change and labels the
right parameters; a run checkpointed mid-way and resumed into fresh objects ends
bit-identical to the uninterrupted one, optimizer state included.
"""

from __future__ import annotations

import copy
import io
import os
from typing import Any, Callable, Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import layerfreeze as lf
from layerfreeze import distributed

O = torch.optim
CUDA = torch.cuda.is_available()
# LAYERFREEZE_TEST_DEVICE=cuda runs every configuration on the GPU (fused and foreach CUDA kernels).
ALL_ON_CUDA = CUDA and os.environ.get("LAYERFREEZE_TEST_DEVICE") == "cuda"

# name -> (factory of the optimizers for a model, where it runs: "any", "cuda" or "cpu")
Factory = Callable[[nn.Module], list[torch.optim.Optimizer]]


def _one(cls: type, **kwargs: Any) -> Factory:
    return lambda model: [cls(model.parameters(), **kwargs)]


def _sparse_adam(model: nn.Module) -> list[torch.optim.Optimizer]:
    # SparseAdam takes sparse gradients only: the embedding; the rest trains with Adam.
    # Freezing the embedding empties SparseAdam, as separate backbone/head optimizers do.
    return [O.SparseAdam(model[0].parameters(), lr=0.05), O.Adam(model[1:].parameters(), lr=0.01)]


CONFIGS: dict[str, tuple[Factory, str]] = {
    "sgd": (_one(O.SGD, lr=0.05), "any"),
    "sgd_nesterov_wd": (_one(O.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01), "any"),
    "sgd_foreach": (_one(O.SGD, lr=0.05, momentum=0.9, foreach=True), "any"),
    "sgd_fused": (_one(O.SGD, lr=0.05, momentum=0.9, fused=True), "any"),
    "adam": (_one(O.Adam, lr=0.01), "any"),
    "adam_amsgrad_maximize": (_one(O.Adam, lr=0.01, amsgrad=True, maximize=True), "any"),
    "adam_foreach": (_one(O.Adam, lr=0.01, foreach=True), "any"),
    "adam_fused": (_one(O.Adam, lr=0.01, fused=True), "any"),
    "adam_capturable": (_one(O.Adam, lr=0.01, capturable=True), "cuda"),
    "adamw": (_one(O.AdamW, lr=0.01, weight_decay=0.1), "any"),
    "adamw_foreach": (_one(O.AdamW, lr=0.01, weight_decay=0.1, foreach=True), "any"),
    "adamw_fused": (_one(O.AdamW, lr=0.01, weight_decay=0.1, fused=True), "any"),
    "adamw_capturable": (_one(O.AdamW, lr=0.01, weight_decay=0.1, capturable=True, foreach=True), "cuda"),
    "adagrad": (_one(O.Adagrad, lr=0.05, lr_decay=0.01, weight_decay=0.01), "any"),
    "adagrad_foreach": (_one(O.Adagrad, lr=0.05, foreach=True), "any"),
    "adagrad_fused": (_one(O.Adagrad, lr=0.05, fused=True), "cpu"),  # no CUDA kernel
    "adadelta": (_one(O.Adadelta, lr=0.5), "any"),
    "adadelta_foreach": (_one(O.Adadelta, lr=0.5, foreach=True), "any"),
    "adadelta_capturable": (_one(O.Adadelta, lr=0.5, capturable=True), "cuda"),
    "adamax": (_one(O.Adamax, lr=0.01), "any"),
    "adamax_foreach": (_one(O.Adamax, lr=0.01, foreach=True), "any"),
    "asgd": (_one(O.ASGD, lr=0.05, t0=2.0), "any"),
    "asgd_foreach": (_one(O.ASGD, lr=0.05, t0=2.0, foreach=True), "any"),
    "asgd_capturable": (_one(O.ASGD, lr=0.05, t0=2.0, capturable=True), "cuda"),
    "nadam": (_one(O.NAdam, lr=0.01), "any"),
    "nadam_foreach_decoupled": (_one(O.NAdam, lr=0.01, weight_decay=0.01, decoupled_weight_decay=True,
                                     foreach=True), "any"),
    "nadam_capturable": (_one(O.NAdam, lr=0.01, capturable=True), "cuda"),
    "radam": (_one(O.RAdam, lr=0.01), "any"),
    "radam_foreach_decoupled": (_one(O.RAdam, lr=0.01, weight_decay=0.01, decoupled_weight_decay=True,
                                     foreach=True), "any"),
    "rmsprop_centered_momentum": (_one(O.RMSprop, lr=0.01, centered=True, momentum=0.5), "any"),
    "rmsprop_foreach": (_one(O.RMSprop, lr=0.01, foreach=True), "any"),
    "rmsprop_capturable": (_one(O.RMSprop, lr=0.01, capturable=True), "cuda"),
    "rprop": (_one(O.Rprop, lr=0.01), "any"),
    "rprop_foreach": (_one(O.Rprop, lr=0.01, foreach=True), "any"),
    "adafactor": (_one(O.Adafactor, lr=0.01), "any"),
    "adafactor_foreach": (_one(O.Adafactor, lr=0.01, foreach=True), "any"),
    "muon": (_one(O.Muon, lr=0.02), "any"),
    "lbfgs": (_one(O.LBFGS, lr=0.5, max_iter=4), "any"),
    "lbfgs_strong_wolfe": (_one(O.LBFGS, lr=1.0, max_iter=4, line_search_fn="strong_wolfe"), "any"),
    "sparse_adam": (_sparse_adam, "any"),
}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    bias = name != "muon"  # Muon takes 2-D parameters only
    head: list[nn.Module] = [nn.Linear(6, 6, bias=bias), nn.Tanh(), nn.Linear(6, 6, bias=bias), nn.Tanh(),
                             nn.Linear(6, 2, bias=bias)]
    if name == "sparse_adam":
        return nn.Sequential(nn.Embedding(10, 6, sparse=True), nn.Flatten(), *head)
    return nn.Sequential(nn.Linear(6, 6, bias=bias), nn.Tanh(), *head)


def _batch(name: str, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    if name == "sparse_adam":
        return torch.randint(0, 10, (5, 1), generator=g)
    return torch.randn(5, 6, generator=g)


def _device(name: str) -> torch.device:
    where = CONFIGS[name][1]
    return torch.device("cuda" if where == "cuda" or (ALL_ON_CUDA and where == "any") else "cpu")


def _build(name: str) -> tuple[nn.Module, list[torch.optim.Optimizer], lf.LayerFreezing]:
    model = _model(name).to(_device(name))
    optimizers = CONFIGS[name][0](model)
    freezing = lf.LayerFreezing(freeze_start=0.0, interval="step").attach(model, optimizers, total_steps=8)
    return model, optimizers, freezing


def _train(name: str, model: nn.Module, optimizers: list, freezing: lf.LayerFreezing, steps: range,
           check_frozen: bool = False, thaw_at: Optional[int] = 5) -> None:
    """One closure step per optimizer (LBFGS needs it, the others accept it), then freezing.step().

    After step ``thaw_at`` a move back to depth 1 thaws a layer, so every optimizer
    also takes parameters back. With ``check_frozen``, every step checks that no frozen
    weight moved and that the last layer did.
    """
    for step in steps:
        x = _batch(name, step).to(_device(name))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        frozen = set(freezing.frozen_parameters)
        for opt in optimizers:
            def closure() -> torch.Tensor:
                for o in optimizers:
                    o.zero_grad()
                loss = model(x).pow(2).mean()
                loss.backward()
                return loss
            opt.step(closure)
        if check_frozen:
            moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
            assert not moved & frozen, step
            assert moved, step  # the optimizers did train
        freezing.step()
        if step == thaw_at:
            freezing.set_depth(1)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index in a["state"]:
        left, right = a["state"][index], b["state"][index]
        assert left.keys() == right.keys(), index
        for key in left:
            if isinstance(left[key], torch.Tensor):  # (a loaded scalar may sit on another device)
                assert torch.equal(left[key].cpu(), right[key].cpu()), (index, key)
            elif isinstance(left[key], list):  # LBFGS history
                assert len(left[key]) == len(right[key]) and all(
                    torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v for u, v in zip(left[key], right[key])
                ), (index, key)
            else:
                assert left[key] == right[key], (index, key)


def _configs() -> list:
    return [pytest.param(name, marks=pytest.mark.skipif(where == "cuda" and not CUDA, reason="capturable needs CUDA"))
            for name, (_, where) in CONFIGS.items()]


@pytest.mark.parametrize("name", _configs())
def test_frozen_weights_never_move_and_state_dict_works(name):
    model, optimizers, freezing = _build(name)
    depths = []
    for step in range(8):
        _train(name, model, optimizers, freezing, range(step, step + 1), check_frozen=True)
        depths.append(freezing.frozen_depth)
        for opt in optimizers:
            state = opt.state_dict()  # Composer's KeyError (its issue #1002) would raise here
            held = [p for g in opt.param_groups for p in g["params"]]
            assert not any(not p.requires_grad for p in held)
            assert set(state["state"]) <= set(range(len(held)))
            assert {id(p) for p in opt.state} <= {id(p) for p in held}  # no state of a frozen parameter
    assert depths == [0, 0, 1, 1, 1, 1, 2, 3]  # int(step / 8 * 3), with the thaw to 1 after step 5


@pytest.mark.parametrize("name", _configs())
def test_resume_is_bit_identical_to_the_uninterrupted_run(name):
    model, optimizers, freezing = _build(name)
    _train(name, model, optimizers, freezing, range(8))
    straight, straight_states = _params(model), [opt.state_dict() for opt in optimizers]

    model, optimizers, freezing = _build(name)
    _train(name, model, optimizers, freezing, range(4))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opts": [opt.state_dict() for opt in optimizers],
                "freezing": freezing.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    model, optimizers, freezing = _build(name)  # fresh objects, as after a restart
    model.load_state_dict(saved["model"])
    freezing.load_state_dict(saved["freezing"])
    for opt, state in zip(optimizers, saved["opts"]):
        opt.load_state_dict(state)
    assert freezing.frozen_depth == 1
    _train(name, model, optimizers, freezing, range(4, 8))
    resumed = _params(model)
    assert straight.keys() == resumed.keys()
    for n in straight:
        assert torch.equal(straight[n], resumed[n]), n
    for a, b in zip(straight_states, [opt.state_dict() for opt in optimizers]):
        _assert_same_state(a, b)


# -- LBFGS: its own parameter list, and its history under the first parameter ---------------
def _lbfgs_run(steps: int) -> tuple[nn.Module, torch.optim.LBFGS, lf.LayerFreezing, dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                          nn.Linear(6, 2))
    opt = O.LBFGS(model.parameters(), max_iter=4)
    freezing = lf.LayerFreezing(freeze_start=0.0, interval="step").attach(model, opt, total_steps=6)
    x = torch.randn(8, 6)
    frozen_at: dict[str, torch.Tensor] = {}

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
        freezing.step()
        for name in freezing.frozen_parameters:
            frozen_at.setdefault(name, dict(model.named_parameters())[name].detach().clone())
    return model, opt, freezing, frozen_at


def test_lbfgs_state_dict_after_freezes_and_later_frozen_layers_do_not_move():
    # The reproduction: LBFGS(max_iter=4), freeze_start=0.0, interval="step", six steps.
    model, opt, freezing, frozen_at = _lbfgs_run(6)
    assert freezing.frozen_depth == 3
    assert sorted(frozen_at) == ["0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight"]
    for name, value in frozen_at.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name
    opt.state_dict()  # KeyError before: the history lived under the frozen first parameter
    assert opt._params is opt.param_groups[0]["params"]
    assert [p is q for p, q in zip(opt._params, model[6].parameters())] == [True, True]


def test_lbfgs_restarts_its_history_over_the_remaining_parameters():
    model, opt, freezing, _ = _lbfgs_run(1)
    assert len(opt.state) == 1  # history under the first parameter, over all 140 elements
    assert opt.state[model[0].weight]["prev_flat_grad"].numel() == 3 * 42 + 14
    freezing.set_depth(1)
    assert len(opt.state) == 0  # restarted, as at its first step
    x = torch.randn(8, 6)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    state = opt.state[model[2].weight]  # the new first parameter
    assert state["n_iter"] == 4 and state["prev_flat_grad"].numel() == 2 * 42 + 14
    freezing.set_depth(0)  # thawed: back over all parameters, restarted again
    assert len(opt.state) == 0 and opt._params[0] is model[0].weight
    opt.step(closure)
    assert opt.state[model[0].weight]["prev_flat_grad"].numel() == 3 * 42 + 14


def test_lbfgs_follows_composer_style_freeze_layers():
    model, opt, _, _ = _lbfgs_run(1)
    assert lf.freeze_layers(model, opt, current_duration=1.0, freeze_start=0.5, freeze_level=0.5) == (1, 0.5)
    assert opt._params is opt.param_groups[0]["params"] and opt._params[0] is model[2].weight
    assert len(opt.state) == 0 and opt._numel_cache is None


# -- optimizers built from named_parameters(): torch's param_names -------------------------
def test_param_names_follow_freezes_and_unfreezes_and_label_the_right_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    opt = O.Adam([{"params": list(model.named_parameters())[:4]},
                  {"params": list(model.named_parameters())[4:], "lr": 0.1}], lr=0.01)
    freezing = lf.LayerFreezing(interval="step").attach(model, opt, total_steps=10)
    x = torch.randn(3, 4)
    model(x).sum().backward()
    opt.step()
    freezing.set_depth(1)
    assert [g["param_names"] for g in opt.param_groups] == [["1.weight", "1.bias"], ["2.weight", "2.bias"]]
    state = opt.state_dict()
    assert [g["param_names"] for g in state["param_groups"]] == [["1.weight", "1.bias"], ["2.weight", "2.bias"]]
    by_name = dict(model.named_parameters())
    for group in state["param_groups"]:
        for index, name in zip(group["params"], group["param_names"]):
            assert state["state"][index]["exp_avg"] is opt.state[by_name[name]]["exp_avg"], name

    saved = copy.deepcopy(state)
    freezing.set_depth(0)  # unfrozen: names back in their original places, beside their parameters
    assert [g["param_names"] for g in opt.param_groups] == [["0.weight", "0.bias", "1.weight", "1.bias"],
                                                            ["2.weight", "2.bias"]]
    assert [p for g in opt.param_groups for p in g["params"]] == list(model.parameters())

    fresh = O.Adam([{"params": list(model.named_parameters())[:4]},
                    {"params": list(model.named_parameters())[4:], "lr": 0.1}], lr=0.01)
    other = lf.LayerFreezing(interval="step").attach(model, fresh, total_steps=10)
    other.set_depth(1)
    fresh.load_state_dict(saved)
    assert [g["param_names"] for g in fresh.param_groups] == [["1.weight", "1.bias"], ["2.weight", "2.bias"]]
    assert torch.equal(fresh.state[model[1].weight]["exp_avg"], saved["state"][0]["exp_avg"])


# -- GradScaler with an optimizer that freezing empties ------------------------------------
def _backbone_and_head() -> tuple[nn.Module, list[torch.optim.Optimizer]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                          nn.Linear(6, 2))
    return model, [O.SGD(model[:4].parameters(), lr=0.1, momentum=0.9), O.Adam(model[4:].parameters(), lr=0.01)]


def test_grad_scaler_skips_an_emptied_optimizer_as_documented(caplog):
    model, optimizers = _backbone_and_head()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    freezing = lf.LayerFreezing(freeze_start=0.0, interval="step").attach(model, optimizers, total_steps=6)
    frozen_at: dict[str, torch.Tensor] = {}
    head_before = model[6].weight.detach().clone()
    emptied_at = None
    for step in range(6):
        loss = model(_batch("mlp", step)).pow(2).mean()
        scaler.scale(loss).backward()
        for opt in optimizers:
            if any(group["params"] for group in opt.param_groups):  # docs/optimizers.md: skip an emptied one
                scaler.step(opt)
        scaler.update()
        for opt in optimizers:
            opt.zero_grad()
        with caplog.at_level("WARNING", logger="layerfreeze"):
            freezing.step()
        for name in freezing.frozen_parameters:
            frozen_at.setdefault(name, dict(model.named_parameters())[name].detach().clone())
        if emptied_at is None and not optimizers[0].param_groups[0]["params"]:
            emptied_at = step
    assert emptied_at == 3 and freezing.frozen_depth == 3  # two steps ran with the backbone optimizer empty
    assert scaler.get_scale() == 2.0 ** 8  # no step was skipped for infs
    assert len(frozen_at) == 6
    for name, value in frozen_at.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name
    assert not torch.equal(model[6].weight, head_before)
    assert "optimizers[0] (SGD) holds no parameters now" in caplog.text and "GradScaler" in caplog.text
    assert caplog.text.count("holds no parameters now") == 1


def test_grad_scaler_step_on_an_emptied_optimizer_is_what_torch_refuses():
    # Why the guard above: torch's GradScaler asserts that every optimizer it steps had gradients.
    model, optimizers = _backbone_and_head()
    scaler = torch.amp.GradScaler("cpu")
    freezing = lf.LayerFreezing(interval="step").attach(model, optimizers, total_steps=4)
    freezing.set_depth(2)
    scaler.scale(model(_batch("mlp", 0)).pow(2).mean()).backward()
    scaler.step(optimizers[1])
    with pytest.raises(AssertionError, match="No inf checks were recorded for this optimizer"):
        scaler.step(optimizers[0])


# -- SWA and LR schedulers -----------------------------------------------------------------
def test_update_bn_on_an_averaged_copy_recomputes_frozen_batchnorm_statistics():
    from conftest import ConvBN

    torch.manual_seed(0)
    model = ConvBN()
    opt = O.SGD(model.parameters(), lr=0.05, momentum=0.9)
    freezing = lf.LayerFreezing(interval="step", batchnorm="eval").attach(model, opt, total_steps=10)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 1, 6, 6, generator=g) for _ in range(3)]
    for x in batches:
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    freezing.set_depth(2)  # features.0 (conv) and features.1 (BatchNorm), pinned in eval mode
    live_stats = model.features[1].running_mean.clone(), model.features[1].running_var.clone()
    swa = O.swa_utils.AveragedModel(model)
    for x in batches:
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        swa.update_parameters(model)

    O.swa_utils.update_bn(batches, swa)

    conv, bn = swa.module.features[0], swa.module.features[1]
    with torch.no_grad():
        outputs = [conv(x) for x in batches]
    # momentum=None during update_bn: the plain average of the per-batch statistics.
    expected_mean = torch.stack([h.mean((0, 2, 3)) for h in outputs]).mean(0)
    expected_var = torch.stack([h.var((0, 2, 3), unbiased=True) for h in outputs]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, expected_var, rtol=1e-5, atol=1e-6)
    assert not torch.equal(bn.running_var, torch.ones(4))
    # The live model keeps its pinned layer and statistics.
    model.train()
    assert not model.features[1].training and model.features[4].training
    assert torch.equal(model.features[1].running_mean, live_stats[0])
    assert torch.equal(model.features[1].running_var, live_stats[1])


SCHEDULERS = {
    "swalr": lambda opt: O.swa_utils.SWALR(opt, swa_lr=0.01, anneal_epochs=3, anneal_strategy="cos"),
    "onecycle": lambda opt: O.lr_scheduler.OneCycleLR(opt, max_lr=[0.2, 0.4], total_steps=10),
    "cyclic": lambda opt: O.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=2),
    "plateau": lambda opt: O.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5),
    "sequential": lambda opt: O.lr_scheduler.SequentialLR(
        opt, [O.lr_scheduler.LinearLR(opt, 0.5, total_iters=2), O.lr_scheduler.StepLR(opt, 2, 0.5)], [3]),
    "lambda": lambda opt: O.lr_scheduler.LambdaLR(opt, [lambda e: 0.9 ** e, lambda e: 1.0 / (1 + e)]),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_lr_schedulers_give_the_same_rates_through_freezes_and_unfreezes(name):
    def run(freeze: bool) -> list[list[float]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))
        opt = O.SGD([{"params": model[:4].parameters()}, {"params": model[4:].parameters(), "lr": 0.2}],
                    lr=0.1, momentum=0.9)
        scheduler = SCHEDULERS[name](opt)
        freezing = lf.LayerFreezing(interval="step").attach(model, opt, total_steps=10) if freeze else None
        rates = []
        for step, depth in enumerate([0, 1, 2, 2, 0, 1, 2, 1]):
            if freezing is not None:
                freezing.set_depth(depth)
            model(_batch("mlp", step)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            scheduler.step(*([1.0] if name == "plateau" else []))
            rates.append([g["lr"] for g in opt.param_groups] + [g["momentum"] for g in opt.param_groups])
        if freezing is not None:  # the scheduler's own checkpoint round trip
            other = SCHEDULERS[name](opt)
            other.load_state_dict(scheduler.state_dict())
            assert other.state_dict() == scheduler.state_dict()
        return rates

    assert run(freeze=True) == run(freeze=False)


# -- wrappers: DeepSpeed refused, wrappers with groups of their own refused -----------------
def _stand_in(name: str, module: str, base: type = object) -> type:
    # DeepSpeed is never imported: detection goes by class name, as these stand-ins have.
    return type(name, (base,), {"__module__": module})


def _untouched(model: nn.Module, opt: torch.optim.Optimizer, count: int) -> None:
    assert all(p.requires_grad for p in model.parameters())
    assert len(opt.param_groups[0]["params"]) == count


def test_deepspeed_engine_is_refused_at_attach():
    Engine = _stand_in("DeepSpeedEngine", "deepspeed.runtime.engine", nn.Module)
    Pipeline = _stand_in("PipelineEngine", "deepspeed.runtime.pipe.engine", Engine)
    for cls in (Engine, Pipeline):
        engine = cls()
        engine.module = _model("mlp")
        opt = O.SGD(engine.parameters(), lr=0.1)
        with pytest.raises(ValueError, match=rf"model is a DeepSpeed engine \({cls.__name__}\): DeepSpeed fixes the "
                           r"trainable parameters at deepspeed.initialize.*#5639.*HINT: train with "
                           r"DistributedDataParallel, FSDP2"):
            lf.LayerFreezing().attach(engine, opt, total_steps=10)
        _untouched(engine, opt, 8)
        with pytest.raises(ValueError, match="DeepSpeed engine"):
            lf.freeze_layers(engine, opt, current_duration=1.0)
        _untouched(engine, opt, 8)


def test_deepspeed_optimizer_and_zero3_parameters_are_refused_at_attach():
    model = _model("mlp")
    opt = O.SGD(model.parameters(), lr=0.1)
    ZeroOptimizer = _stand_in("DeepSpeedZeroOptimizer", "deepspeed.runtime.zero.stage_1_and_2",
                              _stand_in("ZeROOptimizer", "deepspeed.runtime.base_optimizer"))
    BF16 = _stand_in("BF16_Optimizer", "deepspeed.runtime.bf16_optimizer")
    for wrapper in (ZeroOptimizer(), BF16()):
        with pytest.raises(TypeError, match=rf"optimizers\[1\] is a DeepSpeed optimizer \({type(wrapper).__name__}\)"
                           r".*HINT: train with DistributedDataParallel"):
            lf.LayerFreezing().attach(model, [opt, wrapper], total_steps=10)
    model[0].weight.ds_id = 0  # what ZeRO-3 sets on every parameter it partitions
    with pytest.raises(ValueError, match=r"parameter '0.weight' is partitioned by DeepSpeed ZeRO-3 \(it has ds_id\)"):
        lf.LayerFreezing().attach(model, opt, total_steps=10)
    _untouched(model, opt, 8)


def test_a_wrapper_with_param_groups_of_its_own_is_refused_and_one_that_shares_them_is_not():
    class Averaging(O.Optimizer):  # keeps a separate inner optimizer, as ZeRO does
        def __init__(self, params):
            params = list(params)
            super().__init__(params, {})
            self.inner = O.SGD(params, lr=0.1)

    class Sharing(O.Optimizer):  # shares its inner optimizer's groups (LightningOptimizer, PostLocalSGD)
        def __init__(self, inner):
            self.inner = inner
            self.param_groups = inner.param_groups
            self.state = inner.state
            self.defaults = inner.defaults

    model = _model("mlp")
    opt = Averaging(model.parameters())
    with pytest.raises(ValueError, match=r"optimizers\[0\] \(Averaging\) wraps another optimizer \(.inner, SGD\) "
                       r"with param groups of its own.*HINT: pass the inner optimizer \(optimizer.inner\)"):
        lf.LayerFreezing().attach(model, opt, total_steps=10)
    _untouched(model, opt.inner, 8)
    sharing = Sharing(O.SGD(model.parameters(), lr=0.1))
    freezing = lf.LayerFreezing().attach(model, sharing, total_steps=10)
    freezing.set_depth(1)
    assert sharing.inner.param_groups[0]["params"] == list(model[2:].parameters())


def test_an_optimizer_keeping_its_own_parameter_list_is_warned_about(caplog):
    class Listing(O.SGD):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            self.everything = [p for g in self.param_groups for p in g["params"]]

    model = _model("mlp")
    with caplog.at_level("WARNING", logger="layerfreeze"):
        lf.LayerFreezing().attach(model, Listing(model.parameters(), lr=0.1), total_steps=10)
    assert "optimizers[0] (Listing) keeps parameters in .everything besides its param groups" in caplog.text
    assert "HINT" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="layerfreeze"):  # LBFGS's _params is its group's own list
        lf.LayerFreezing().attach(model, O.LBFGS(model.parameters()), total_steps=10)
    assert "besides its param groups" not in caplog.text


def test_named_optimizer_keys_state_by_the_right_names():
    from torch.distributed.optim import _NamedOptimizer

    model = _model("mlp")
    opt = _NamedOptimizer(model.named_parameters(), O.Adam, lr=0.01)
    freezing = lf.LayerFreezing().attach(model, opt, total_steps=10)
    model(_batch("mlp", 0)).sum().backward()
    opt.step()
    freezing.set_depth(1)
    state = opt.state_dict()
    assert sorted(state["state"]) == ["2.bias", "2.weight", "4.bias", "4.weight", "6.bias", "6.weight"]
    assert state["state"]["2.weight"]["exp_avg"] is opt.state[model[2].weight]["exp_avg"]
    freezing.set_depth(0)
    assert opt.ordered_param_keys == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias",
                                      "6.weight", "6.bias"]


def test_lightning_and_accelerate_wrappers_share_their_groups_and_freeze_the_inner_optimizer():
    from lightning.pytorch.core.optimizer import LightningOptimizer

    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    model = _model("mlp")
    inner = O.Adam(model.parameters(), lr=0.01)
    wrapped = [LightningOptimizer(inner)]
    accelerator = accelerate.Accelerator(cpu=True)
    try:
        other_inner = O.Adam(model.parameters(), lr=0.01)
        wrapped.append(accelerator.prepare_optimizer(other_inner))
        for wrapper, opt in zip(wrapped, (inner, other_inner)):
            freezing = lf.LayerFreezing().attach(model, wrapper, total_steps=10)
            model(_batch("mlp", 0)).sum().backward()
            opt.step()
            opt.zero_grad()
            freezing.set_depth(1)
            assert opt.param_groups[0]["params"] == list(model[2:].parameters())
            assert {id(p) for p in opt.state} == {id(p) for p in model[2:].parameters()}
            assert sorted(wrapper.state_dict()["state"]) == list(range(6))
            freezing.detach()
    finally:
        AcceleratorState._reset_state(True)


# -- any sequence of freezes and unfreezes, resumed at any point ----------------------------
PROPERTY_OPTIMIZERS = ["sgd_nesterov_wd", "sgd_fused", "adam_amsgrad_maximize", "adagrad", "rprop_foreach",
                       "nadam", "lbfgs", "adafactor"]


def _grouped(name: str, model: nn.Module, named: bool) -> list[torch.optim.Optimizer]:
    # Two groups, the second with its own learning rate, optionally named (param_names).
    items = list(model.named_parameters()) if named else list(model.parameters())
    if name.startswith("lbfgs"):  # LBFGS takes one group
        return [O.LBFGS(items, lr=0.5, max_iter=3)]
    cls, kwargs = {
        "sgd_nesterov_wd": (O.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
        "sgd_fused": (O.SGD, dict(lr=0.05, momentum=0.9, fused=True)),
        "adam_amsgrad_maximize": (O.Adam, dict(lr=0.01, amsgrad=True, maximize=True)),
        "adagrad": (O.Adagrad, dict(lr=0.05)),
        "rprop_foreach": (O.Rprop, dict(lr=0.01, foreach=True)),
        "nadam": (O.NAdam, dict(lr=0.01)),
        "adafactor": (O.Adafactor, dict(lr=0.01)),
    }[name]
    return [cls([{"params": items[:4]}, {"params": items[4:], "lr": kwargs["lr"] / 2}], **kwargs)]


def _moves(name: str, named: bool, depths: list[int], start: int = 0, saved: Any = None):
    model = _model("mlp")
    optimizers = _grouped(name, model, named)
    freezing = lf.LayerFreezing(interval="epoch").attach(model, optimizers, total_steps=100)
    if saved is not None:
        model.load_state_dict(saved["model"])
        freezing.load_state_dict(saved["freezing"])
        for opt, state in zip(optimizers, saved["opts"]):
            opt.load_state_dict(state)
    name_of = {id(p): n for n, p in model.named_parameters()}
    for step in range(start, len(depths)):
        freezing.set_depth(depths[step])
        for opt in optimizers:
            for group in opt.param_groups:
                assert all(p.requires_grad for p in group["params"])
                if named:
                    assert group["param_names"] == [name_of[id(p)] for p in group["params"]]
            opt.state_dict()
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n in freezing.frozen_parameters}
        _train(name, model, optimizers, freezing, range(step, step + 1), thaw_at=None)
        for n, value in frozen.items():
            assert torch.equal(dict(model.named_parameters())[n], value), (step, n)
    return model, optimizers, freezing


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(PROPERTY_OPTIMIZERS), named=st.booleans(),
       depths=st.lists(st.integers(0, 3), min_size=2, max_size=7), data=st.data())
def test_any_freeze_sequence_keeps_frozen_weights_and_resumes_exactly(name, named, depths, data):
    cut = data.draw(st.integers(1, len(depths) - 1), label="checkpoint after step")
    straight, straight_opts, _ = _moves(name, named, depths)
    model, optimizers, freezing = _moves(name, named, depths[:cut])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opts": [o.state_dict() for o in optimizers],
                "freezing": freezing.state_dict()}, buffer)
    buffer.seek(0)
    resumed, resumed_opts, _ = _moves(name, named, depths, cut, torch.load(buffer, weights_only=True))
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    for a, b in zip(straight_opts, resumed_opts):
        _assert_same_state(a.state_dict(), b.state_dict())
