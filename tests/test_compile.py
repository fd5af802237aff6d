"""torch.compile under freezing: one recompilation per freeze change at most, bounded by max_changes."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import layerfreeze as lf

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend  # noqa: E402


def small_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)
    )


def train(model: nn.Module, opt: torch.optim.Optimizer, freezing: lf.LayerFreezing, run: nn.Module,
          steps: int, shape: tuple[int, ...] = (5, 4)) -> list[int]:
    """Train ``steps`` steps through ``run``; returns the frozen depth at each forward pass."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    depths = []
    for _ in range(steps):
        depths.append(freezing.frozen_depth)
        run(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        freezing.step()
    return depths


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def test_one_compilation_per_frozen_set_with_aot_eager():
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezing = lf.LayerFreezing(freeze_start=0.0, interval="step").attach(model, opt, total_steps=8)
    counter = CompileCounterWithBackend("aot_eager")
    depths = train(model, opt, freezing, torch.compile(model, backend=counter), steps=8)
    assert freezing.frozen_depth == 3 and freezing.metrics[lf.LAYERS_FROZEN] == 3
    # Each frozen set seen by a forward pass compiled exactly once: a recompile per change, no more.
    assert counter.frame_count == len(set(depths)) == 3
    assert counter.frame_count <= 1 + freezing.state_dict()["changes"]


def test_frozen_attention_relayout_adds_no_recompilation():
    # unit="owner" freezes nn.MultiheadAttention's own weights, and the freezer then
    # gives the frozen attention its relaying forward (Freezer._update_attention): still one
    # compilation per frozen set, and the same values as eager.
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2,
                                  enable_nested_tensor=False)
    twin = copy.deepcopy(model)
    counter = CompileCounterWithBackend("aot_eager")
    depths = []
    for net, run in ((model, torch.compile(model, backend=counter)), (twin, twin)):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        freezing = lf.LayerFreezing(freeze_start=0.0, interval="step", unit="owner").attach(net, opt, total_steps=6)
        depths.append(train(net, opt, freezing, run, steps=6, shape=(3, 5, 16)))
        assert any("forward" in m.__dict__ for m in net.modules() if isinstance(m, nn.MultiheadAttention))
    assert depths[0] == depths[1] and len(set(depths[0])) == 6
    assert counter.frame_count == len(set(depths[0]))
    torch.testing.assert_close(model.state_dict(), twin.state_dict())


def test_compiled_training_matches_eager_bit_for_bit():
    eager, compiled = small_mlp(), small_mlp()
    results = []
    for model, wrap in ((eager, lambda m: m), (compiled, lambda m: torch.compile(m, backend=CompileCounter()))):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        freezing = lf.LayerFreezing(freeze_start=0.0, interval="step").attach(model, opt, total_steps=8)
        results.append((train(model, opt, freezing, wrap(model), steps=8), copy.deepcopy(model.state_dict())))
    (eager_depths, eager_state), (compiled_depths, compiled_state) = results
    assert eager_depths == compiled_depths
    for name in eager_state:
        assert torch.equal(eager_state[name], compiled_state[name]), name


def test_frozen_weights_do_not_move_under_compile():
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    freezing = lf.LayerFreezing(interval="step").attach(model, opt, total_steps=100)
    compiled = torch.compile(model, backend=CompileCounter())
    train(model, opt, freezing, compiled, steps=2)
    freezing.set_depth(2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, opt, freezing, compiled, steps=3)
    for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
        assert torch.equal(model.get_parameter(name), before[name]), name
    assert not torch.equal(model.get_parameter("6.weight"), before["6.weight"])


def test_one_compilation_per_frozen_set_after_an_eager_first_forward():
    # An eager training forward first (once the workaround for GradientBridge's probes, now gone
    # for models without activation checkpointing) must not change the compile count either.
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezing = lf.LayerFreezing(freeze_start=0.0, interval="step").attach(model, opt, total_steps=8)
    model(torch.randn(2, 4))
    counter = CompileCounterWithBackend("aot_eager")
    depths = train(model, opt, freezing, torch.compile(model, backend=counter), steps=8)
    assert counter.frame_count == len(set(depths)) == 3


def test_returning_to_an_earlier_depth_reuses_its_compilation():
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezing = lf.LayerFreezing(interval="epoch").attach(model, opt, total_steps=100)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(3, 4)
    for depth in (0, 2, 0, 2, 0):
        freezing.set_depth(depth)
        compiled(x).sum().backward()
        opt.zero_grad()
    assert counter.frame_count == 2


def test_max_changes_bounds_recompilations():
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezing = lf.LayerFreezing(freeze_start=0.0, interval="step", max_changes=1).attach(model, opt, total_steps=8)
    counter = CompileCounter()
    depths = train(model, opt, freezing, torch.compile(model, backend=counter), steps=8)
    assert freezing.state_dict()["changes"] == 1
    assert sorted(set(depths)) == [0, 1]  # the schedule asked for 3; one change was allowed
    assert counter.frame_count == 2


def test_max_changes_below_the_recompile_limit_keeps_every_frozen_set_compiled():
    # Past torch._dynamo.config.recompile_limit compiled frozen sets, dynamo stops compiling the
    # model and runs it eagerly; max_changes = limit - 1 keeps the whole run compiled.
    limit = dynamo.config.recompile_limit
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(limit + 6)])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    freezing = lf.LayerFreezing(freeze_start=0.0, interval="step", max_changes=limit - 1)
    freezing.attach(model, opt, total_steps=limit + 5)
    counter = CompileCounter()
    depths = train(model, opt, freezing, torch.compile(model, backend=counter), steps=limit + 5)
    assert len(set(depths)) == limit
    assert counter.frame_count == limit


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("LAYERFREEZE_TEST_INDUCTOR") != "1",
    reason="inductor builds C++ kernels: about a minute on a 2-core CPU; set LAYERFREEZE_TEST_INDUCTOR=1 to run",
)
def test_inductor_recompiles_once_per_change():
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezing = lf.LayerFreezing(freeze_start=0.0, interval="step").attach(model, opt, total_steps=8)
    counter = CompileCounterWithBackend("inductor")
    depths = train(model, opt, freezing, torch.compile(model, backend=counter), steps=8)
    assert counter.frame_count == len(set(depths)) == 3
