"""torch.compile under freezing: one recompilation per freeze change at most, bounded by max_changes."""

from __future__ import annotations

import copy
import inspect
import os

import pytest
import torch
from torch import nn

import layerfreeze as lf
from conftest import train_depths

pytestmark = pytest.mark.slow  # torch.compile: seconds per test

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
    return train_depths(opt, freezing, run, [x] * steps)


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
    # model and runs it eagerly; max_changes = limit - 1 keeps a run that only trains compiled
    # (with evaluation see test_evaluating_the_compiled_model_needs_a_second_graph_per_frozen_set).
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


class Reordered(nn.Module):
    """Five layers defined 0..4 and run 3, 1, 4, 0, 2: execution order differs from definition order."""

    run_order = (3, 1, 4, 0, 2)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index in self.run_order:
            x = torch.tanh(self.layers[index](x))
        return x


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("compiled_how", ["torch.compile", "module.compile"])
def test_execution_order_traced_when_the_first_forward_is_compiled_fullgraph(compiled_how):
    # No example_inputs: the tracer's hooks meet dynamo in the first forward. Under fullgraph=True
    # they must not break the graph (removing a hook there is dynamo's "unregistered
    # RemovableHandle" error); the compiled call is replayed eagerly to get the order, and the
    # hooks leave at the first freeze, when dynamo recompiles anyway: one graph per frozen set.
    results = []
    for compiled in (True, False):
        model = Reordered()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        freezing = lf.LayerFreezing(freeze_start=0.0, interval="step", order="execution")
        freezing.attach(model, opt, total_steps=8)
        counter = CompileCounter()
        run = model
        if compiled and compiled_how == "torch.compile":
            run = torch.compile(model, backend=counter, fullgraph=True)
        elif compiled:
            model.compile(backend=counter, fullgraph=True)
        depths = train(model, opt, freezing, run, steps=8)
        assert [layer.name for layer in freezing.layers] == [
            "layers.3", "layers.1", "layers.4", "layers.0", "layers.2"]
        assert freezing.frozen_parameters == sorted(
            f"layers.{i}.{kind}" for i in (3, 1, 4, 0) for kind in ("weight", "bias"))
        assert hooks_left(model) == 0
        results.append((depths, counter.frame_count, model.state_dict()))
    (depths, graphs, state), (eager_depths, eager_graphs, eager_state) = results
    assert depths == eager_depths == [0, 0, 1, 1, 2, 2, 3, 3]
    assert graphs == 4 and eager_graphs == 0
    for name in state:
        assert torch.equal(state[name], eager_state[name]), name


def test_execution_order_traced_when_only_a_submodule_is_compiled():
    # The root forward runs eagerly but its first part is compiled: the eager hooks see only
    # the last layer, so that pass cannot fix the order; the replay traces all six.
    model = nn.Sequential(Reordered(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezing = lf.LayerFreezing(freeze_start=0.0, interval="step", order="execution")
    freezing.attach(model, opt, total_steps=10)
    counter = CompileCounter()
    model[0].compile(backend=counter, fullgraph=True)
    depths = train(model, opt, freezing, model, steps=10)
    assert [layer.name for layer in freezing.layers] == [
        "0.layers.3", "0.layers.1", "0.layers.4", "0.layers.0", "0.layers.2", "1"]
    assert depths == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert counter.frame_count == 5
    assert hooks_left(model) == 0


def test_execution_trace_from_a_compiled_forward_leaves_buffers_as_they_were():
    # The eager replay of a compiled forward runs under no_grad with buffers restored, like
    # example_inputs: BatchNorm statistics move once per training forward, not twice.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    twin = copy.deepcopy(model)
    x = torch.randn(6, 4)
    for net, run in ((model, torch.compile(model, backend=CompileCounter(), fullgraph=True)), (twin, twin)):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        freezing = lf.LayerFreezing(freeze_start=0.0, interval="step", order="execution")
        freezing.attach(net, opt, total_steps=4)
        run(x).sum().backward()
        opt.step()
        freezing.step()
        assert [layer.name for layer in freezing.layers] == ["0", "1", "2"]
    assert int(model[1].num_batches_tracked) == int(twin[1].num_batches_tracked) == 1
    torch.testing.assert_close(model.state_dict(), twin.state_dict(), rtol=0, atol=0)


def test_example_inputs_are_traced_and_counted_eagerly_on_a_model_compiled_in_place():
    # module.compile() routes every call through dynamo; the trace and the FLOP count must still
    # see each layer's own forward (a compiled pass runs the hooks only while tracing).
    model, plain = Reordered(), Reordered()
    counter = CompileCounter()
    model.compile(backend=counter, fullgraph=True)
    x = torch.randn(3, 4)
    assert [layer.name for layer in lf.execution_order(model, lambda m: m(x))] == [
        "layers.3", "layers.1", "layers.4", "layers.0", "layers.2"]
    # 2 * batch 3 * 4 inputs * 4 outputs per Linear, as for the same model not compiled
    assert lf.layer_flops(model, lf.definition_order(model), lambda m: m(x)) == [96] * 5
    assert lf.layer_flops(plain, lf.definition_order(plain), lambda m: m(x)) == [96] * 5
    assert counter.frame_count == 0 and hooks_left(model) == 0


def test_convergence_probe_passes_spend_no_graphs_of_a_model_compiled_in_place():
    # The probe pass (eval mode, no_grad, hooks of its own) runs eagerly: compiled, it would
    # cost dynamo a graph per probe and frozen set, out of recompile_limit.
    model = Reordered()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # outputs never change: every layer converges
    policy = lf.policies.Convergence(metric="cka", threshold=0.5, every=2, probe=torch.randn(6, 4))
    freezing = lf.LayerFreezing(policy=policy, interval="step").attach(model, opt, total_steps=12)
    counter = CompileCounter()
    model.compile(backend=counter)
    depths = train(model, opt, freezing, model, steps=12)
    assert depths == [0] * 4 + [4] * 8
    assert counter.frame_count == 2


class RunCounter:
    """A dynamo backend counting the graphs it compiles and the forward passes they run."""

    def __init__(self):
        self.graphs = 0
        self.runs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1

        def run(*args):
            self.runs += 1
            return gm.forward(*args)

        return run


def train_and_evaluate(max_changes, evaluate_compiled=True, **compile_options):
    """8 frozen sets (9 layers, depth = step // 2), 2 steps each, one evaluation per 2-step epoch.

    Returns (graphs, compiled training forwards of 16, compiled evaluations of 8, depths).
    """
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(9)])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    freezing = lf.LayerFreezing(freeze_start=0.0, interval="step", max_changes=max_changes)
    freezing.attach(model, opt, total_steps=16)
    backend = RunCounter()
    compiled = torch.compile(model, backend=backend, **compile_options)
    x = torch.randn(3, 4)
    trained = evaluated = 0
    depths = []
    for _ in range(8):
        for _ in range(2):
            depths.append(freezing.frozen_depth)
            before = backend.runs
            compiled(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            freezing.step()
            trained += backend.runs > before
        model.eval()
        with torch.no_grad():
            before = backend.runs
            (compiled if evaluate_compiled else model)(x)
            evaluated += backend.runs > before
        model.train()
    return backend.graphs, trained, evaluated, depths


EIGHT_SETS_WARNING = (
    "up to 8 frozen sets (max_changes=7): the model, if compiled, needs one graph per frozen set in training, "
    "and a loop that also evaluates it (model.eval() or torch.no_grad()) a second one per frozen set, up to 16 "
    "graphs, more than torch._dynamo.config.recompile_limit=8; past the limit dynamo runs the model eagerly for "
    "the rest of the run (its warning: 'hit config.recompile_limit'). HINT: evaluate with the uncompiled model "
    "(or under torch.compiler.set_stance('force_eager')); or pass max_changes=3 (recompile_limit // 2 - 1); "
    "or raise the limit: torch.compile(model, recompile_limit=16)"
)


def test_evaluating_the_compiled_model_needs_a_second_graph_per_frozen_set(caplog):
    # max_changes = recompile_limit - 1 keeps training alone compiled, not a loop that also
    # evaluates: the eval forward (eval mode, no_grad) fails the training graph's grad-mode and
    # training guards and compiles its own graph, which guards on requires_grad too. Dynamo's
    # 8 graphs are spent after 4 frozen sets; the rest of the run is eager.
    assert dynamo.config.recompile_limit == 8  # the figures below are for torch's default
    graphs, trained, evaluated, depths = train_and_evaluate(max_changes=7)
    assert depths == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]
    assert (graphs, trained, evaluated) == (8, 8, 4)
    assert caplog.text.count(EIGHT_SETS_WARNING) == 1


def test_what_keeps_a_loop_with_evaluation_compiled(caplog):
    # The warning's three remedies, each measured on the same loop.
    graphs, trained, evaluated, depths = train_and_evaluate(max_changes=3)  # recompile_limit // 2 - 1
    assert sorted(set(depths)) == [0, 1, 2, 3]
    # 4 training graphs; evaluation first runs after step 2, at depth 1: 3 evaluation graphs.
    assert (graphs, trained, evaluated) == (7, 16, 8)
    assert "recompile_limit" not in caplog.text

    dynamo.reset()
    graphs, trained, evaluated, _ = train_and_evaluate(max_changes=7, evaluate_compiled=False)
    assert (graphs, trained, evaluated) == (8, 16, 0)

    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        dynamo.reset()
        graphs, trained, evaluated, _ = train_and_evaluate(max_changes=7, recompile_limit=16)
        assert (graphs, trained, evaluated) == (15, 16, 8)


def deep(layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(2, 2) for _ in range(layers)])


def test_compiled_model_whose_training_alone_outgrows_the_limit_is_warned_about(caplog):
    model = deep(12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lf.LayerFreezing(interval="step").attach(torch.compile(model, backend="eager"), opt, total_steps=100)
    assert (
        "up to 12 frozen sets (12 layers): the compiled model needs one graph per frozen set in training alone, "
        "more than torch._dynamo.config.recompile_limit=8; past the limit dynamo runs the model eagerly for the "
        "rest of the run (its warning: 'hit config.recompile_limit'). HINT: pass max_changes=7, or "
        "max_changes=3 (recompile_limit // 2 - 1) if the loop also evaluates it; or raise the limit: "
    ) in caplog.text


@pytest.mark.parametrize("case, warned", [
    ("not compiled, no max_changes", False),
    ("max_changes=3", False),
    ("compiled in place, 3 epochs", False),
    ("compiled in place, 4 epochs", True),
    ("compiled inside DataParallel", True),
])
def test_recompile_warning_needs_a_compiled_model_or_max_changes_and_more_than_half_the_limit(caplog, case, warned):
    # Frozen sets are bounded by the layers, by max_changes + 1 and by the decisions + 1; the
    # warning fires when twice that (training and evaluation graphs) exceeds the limit of 8.
    model = deep(12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    options = {"max_changes": 3} if case == "max_changes=3" else {}
    interval, steps_per_epoch = ("epoch", 10) if "epochs" in case else ("step", None)
    if "epochs" in case:
        model.compile(backend="eager")
    total = 40 if "4 epochs" in case else 30
    target = nn.DataParallel(torch.compile(model, backend="eager")) if "DataParallel" in case else model
    lf.LayerFreezing(interval=interval, **options).attach(target, opt, total_steps=total, steps_per_epoch=steps_per_epoch)
    assert ("recompile_limit" in caplog.text) is warned


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
