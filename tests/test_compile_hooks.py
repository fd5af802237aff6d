"""Forward hooks of layerfreeze under torch.compile(fullgraph=True): no graph break, one graph per frozen set.

A hook that removes itself (or any hook) inside a compiled forward is dynamo's "Attempted
to represent unregistered RemovableHandle" error under fullgraph=True, and a graph break
plus an extra graph without it. The gradient bridge's probes and Convergence's capture of
the first batch defer that work to the next ``freezing.step()`` and the next change of the
frozen set; the freezer's BatchNorm pin and attention relayout change nothing mid-forward.
Each case is run compiled and eagerly, and the two runs must agree bit for bit.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import layerfreeze as lf
from conftest import train_depths

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.testing import CompileCounter  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def batches(steps: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(*shape, generator=generator) for _ in range(steps)]


def compiled(model: nn.Module, how: str, counter: CompileCounter):
    """What the loop calls: the model compiled with ``fullgraph=True`` (or eager for how="eager")."""
    if how == "torch.compile":
        return torch.compile(model, backend=counter, fullgraph=True)
    if how == "module.compile":
        model.compile(backend=counter, fullgraph=True)
    return model


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def assert_same_state(state: dict, expected: dict) -> None:
    assert state.keys() == expected.keys()
    for name in expected:
        assert torch.equal(state[name], expected[name]), name


# -- GradientBridge (reentrant activation checkpointing) ---------------------

class Checkpointed(nn.Module):
    """stem -> three reentrant-checkpointed blocks -> head: the bridge probes it from attach."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(6, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=True)
        return self.head(x)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["torch.compile", "module.compile"])
def test_checkpointed_model_compiles_once_per_frozen_set_and_trains_as_eager(how):
    # No eager forward first: the bridge's probes meet dynamo in the first training forward.
    # They record nothing there (and the checkpointed blocks, a higher-order op under dynamo,
    # need no bridge); they leave at the first freeze, when dynamo recompiles anyway.
    results = []
    for mode in (how, "eager"):
        model = Checkpointed()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        freezing = lf.LayerFreezing(freeze_start=0.0, interval="step").attach(model, opt, total_steps=8)
        counter = CompileCounter()
        depths = train_depths(opt, freezing, compiled(model, mode, counter), batches(8, (4, 6)))
        results.append((depths, counter.frame_count, copy.deepcopy(model.state_dict()), freezing.frozen_parameters))
    (depths, graphs, state, frozen), (eager_depths, eager_graphs, eager_state, eager_frozen) = results
    assert depths == eager_depths == [0, 0, 1, 1, 2, 2, 3, 3]
    assert graphs == 4 and eager_graphs == 0
    assert frozen == eager_frozen == [
        "blocks.0.0.bias", "blocks.0.0.weight", "blocks.1.0.bias", "blocks.1.0.weight",
        "blocks.2.0.bias", "blocks.2.0.weight", "stem.bias", "stem.weight"]
    assert_same_state(state, eager_state)  # the checkpointed blocks learned exactly as eagerly


@pytest.mark.slow
def test_checkpointed_model_run_eagerly_after_compiled_steps_still_trains_its_blocks():
    # A model compiled first and run eagerly later (dynamo past recompile_limit runs it eagerly)
    # was never probed by an eager pass: every frozen layer is bridged, so the reentrant
    # checkpointed blocks after the frozen stem still get gradients.
    model, reference = Checkpointed(), Checkpointed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    freezing = lf.LayerFreezing(interval="step").attach(model, opt, total_steps=10)
    ref_freezing = lf.LayerFreezing(interval="step").attach(reference, ref_opt, total_steps=10)
    counter = CompileCounter()
    run = torch.compile(model, backend=counter, fullgraph=True)
    xs = batches(4, (4, 6))
    for step, x in enumerate(xs):
        if step == 1:
            freezing.set_depth(1)
            ref_freezing.set_depth(1)
        for net, call, optimizer in ((model, run if step < 2 else model, opt), (reference, reference, ref_opt)):
            call(x).pow(2).mean().backward()
            if step == 3:
                assert all(p.grad is not None for p in net.blocks.parameters())
            optimizer.step()
            optimizer.zero_grad()
    assert counter.frame_count == 2  # depth 0, then depth 1; the eager steps compile nothing
    assert_same_state(model.state_dict(), reference.state_dict())


class BreaksInCheckpoint(Checkpointed):
    """Checkpointed blocks that dynamo cannot trace (a graph break inside): without fullgraph
    it runs them eagerly, with reentrant semantics, inside the compiled forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        for block in self.blocks:
            x = checkpoint(self._untraceable, block, x, use_reentrant=True)
        return self.head(x)

    @staticmethod
    def _untraceable(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()
        return block(x)


@pytest.mark.slow
def test_checkpointed_function_dynamo_cannot_trace_still_gets_bridged_gradients():
    # The frozen stem's output comes out of compiled code not requiring grad; the eager
    # reentrant checkpoints after it would get no gradient (torch only warns). The probes see
    # layers running eagerly under no_grad inside the compiled training forward, and the
    # bridge then acts in compiled code as a graph break: the run equals eager bit for bit.
    results = []
    for mode in ("torch.compile", "eager"):
        model = BreaksInCheckpoint()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        freezing = lf.LayerFreezing(freeze_start=0.0, interval="step").attach(model, opt, total_steps=8)
        run = torch.compile(model, backend=CompileCounter()) if mode != "eager" else model
        depths = train_depths(opt, freezing, run, batches(8, (4, 6)))
        results.append((depths, copy.deepcopy(model.state_dict())))
    (depths, state), (eager_depths, eager_state) = results
    assert depths == eager_depths == [0, 0, 1, 1, 2, 2, 3, 3]
    assert_same_state(state, eager_state)


# -- Convergence's capture of the first batch ---------------------------------

class MLP(nn.Module):
    """Four Linear layers with tanh between; a class of its own, since module.compile(fullgraph=True)
    of a bare nn.Sequential finds no frame to compile once no hook is left on it (torch skips its file)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)


def mlp() -> MLP:
    return MLP()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["torch.compile", "module.compile"])
def test_convergence_captures_the_first_batch_of_a_compiled_forward(how):
    # probe=None: the first training batch becomes the probe. Its hook keeps only a reference
    # inside the compiled region; the copy (first max_samples=4 rows of the 6) is taken at the
    # next freezing.step(), and the inert hook leaves at the first freeze.
    xs = batches(10, (6, 4))
    results = []
    for mode in (how, "eager"):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        policy = lf.policies.Convergence(threshold=0.9, every=2, max_samples=4)
        freezing = lf.LayerFreezing(policy=policy, interval="step").attach(model, opt, total_steps=10)
        counter = CompileCounter()
        depths = train_depths(opt, freezing, compiled(model, mode, counter), xs)
        results.append((depths, counter.frame_count, policy.state_dict(), copy.deepcopy(model.state_dict()),
                        hooks_left(model)))
    (depths, graphs, policy_state, state, hooks), (eager_depths, _, eager_policy_state, eager_state, _) = results
    assert depths == eager_depths
    assert depths[0] == 0 and depths[-1] > 0  # it froze something, so the hook had to leave
    assert graphs == len(set(depths))
    assert hooks == 0
    probe_args, probe_kwargs = policy_state["probe"]
    assert probe_kwargs == {} and torch.equal(probe_args[0], xs[0][:4])
    assert torch.equal(eager_policy_state["probe"][0][0], xs[0][:4])
    assert policy_state["similarity"] == eager_policy_state["similarity"]
    assert policy_state["streaks"] == eager_policy_state["streaks"]
    for name, gram in eager_policy_state["grams"].items():
        assert torch.equal(policy_state["grams"][name], gram), name
    assert_same_state(state, eager_state)


def test_convergence_capture_keeps_no_batch_alive_after_the_step():
    # The inert hook keeps each compiled call's inputs; freezing.step() drops them, so no
    # training batch outlives its step through the policy (the probe is a copy).
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    policy = lf.policies.Convergence(every=100)
    freezing = lf.LayerFreezing(policy=policy, interval="step").attach(model, opt, total_steps=400)
    run = torch.compile(model, backend=CompileCounter(), fullgraph=True)
    generator = torch.Generator().manual_seed(3)
    alive = []
    for step in range(3):
        x = torch.randn(5, 4, generator=generator)
        if step == 0:
            first = x.clone()
        alive.append(weakref.ref(x))
        run(x).pow(2).mean().backward()
        opt.step()
        freezing.step()
        del x
        gc.collect()
        assert [ref() is None for ref in alive] == [True] * (step + 1)
    assert torch.equal(policy.state_dict()["probe"][0][0], first)


def test_convergence_detach_after_a_compiled_first_forward_removes_the_capture_hook():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezing = lf.LayerFreezing(policy=lf.policies.Convergence(every=100), interval="step")
    freezing.attach(model, opt, total_steps=400)
    train_depths(opt, freezing, torch.compile(model, backend=CompileCounter(), fullgraph=True), batches(2, (3, 4)))
    assert hooks_left(model) == 1  # inert until a freeze change
    freezing.detach()
    assert hooks_left(model) == 0


# -- the freezer's BatchNorm pin and attention relayout ------------------------

@pytest.mark.slow
@pytest.mark.parametrize("case", ["batchnorm eval pin", "attention relayout"])
def test_freezer_module_changes_compile_once_per_frozen_set_with_fullgraph(case):
    # batchnorm="eval" pins frozen BatchNorm layers in eval mode, unit="owner" gives frozen
    # nn.MultiheadAttention its relaying forward: both are set between forwards, never inside one.
    results = []
    for mode in ("torch.compile", "eager"):
        torch.manual_seed(0)
        if case == "batchnorm eval pin":
            model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8), nn.BatchNorm1d(8),
                                  nn.Linear(8, 2))
            options, shape = {"batchnorm": "eval"}, (6, 4)
        else:
            model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2,
                                          enable_nested_tensor=False)
            options, shape = {"unit": "owner"}, (3, 5, 16)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        freezing = lf.LayerFreezing(freeze_start=0.0, interval="step", **options).attach(model, opt, total_steps=8)
        counter = CompileCounter()
        depths = train_depths(opt, freezing, compiled(model, mode, counter), batches(8, shape))
        results.append((depths, counter.frame_count, copy.deepcopy(model.state_dict())))
    (depths, graphs, state), (eager_depths, _, eager_state) = results
    assert depths == eager_depths
    if case == "batchnorm eval pin":
        assert depths == [0, 0, 1, 1, 2, 2, 3, 3]
    else:
        assert depths == [0, 1, 2, 4, 5, 6, 8, 9]
    assert graphs == len(set(depths))
    assert_same_state(state, eager_state)


# -- measuring passes leave the random stream alone -----------------------------

@pytest.mark.slow
def test_execution_trace_replay_of_a_compiled_forward_draws_no_random_numbers():
    # order="execution" replays a compiled first forward eagerly; with dropout that replay
    # must not shift the random stream, or the compiled run departs from the eager one.
    results = []
    for mode in ("torch.compile", "eager"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        freezing = lf.LayerFreezing(freeze_start=0.0, interval="step", order="execution")
        freezing.attach(model, opt, total_steps=6)
        counter = CompileCounter()
        depths = train_depths(opt, freezing, compiled(model, mode, counter), batches(6, (5, 4)))
        results.append((depths, counter.frame_count, copy.deepcopy(model.state_dict())))
    (depths, graphs, state), (eager_depths, _, eager_state) = results
    assert depths == eager_depths == [0, 0, 0, 1, 1, 1]
    assert graphs == 2
    assert_same_state(state, eager_state)
