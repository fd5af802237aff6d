"""Freezing under DistributedDataParallel and FSDP (layerfreeze.distributed).

Two kinds of tests:

* two ranks (gloo on 127.0.0.1): tests/_dist_worker.py runs every scenario once
  per module (two processes, killed after ``LAUNCH_TIMEOUT`` s; the
  collectives themselves time out after 30 s), and the tests compare what the
  ranks saved. Tolerance against one process over the same global batch:
  ``ATOL`` absolute after 8 steps (observed <= 6e-8; the all-reduce averages two
  half-batch gradients, a different float summation order than one full batch).
* one rank, in this process (a gloo group of size 1 over a HashStore): the error
  paths and the fallback, checked with ``pytest.raises`` / ``caplog``.
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import _dist
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import layerfreeze as lf
from layerfreeze import distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # process groups, subprocesses

WORKER = Path(__file__).with_name("_dist_worker.py")
LAUNCH_TIMEOUT = 150
ATOL = 1e-6


def launch(out: Path, world: int = 2) -> list[dict]:
    """Run the worker on ``world`` ranks; return each rank's results."""
    return _dist.launch(WORKER, out, timeout=LAUNCH_TIMEOUT, world=world, env={"LF_DIST_TIMEOUT": "30"})


def ok(result: dict) -> dict:
    """A scenario's result, failing with the worker's traceback if it raised."""
    if isinstance(result, dict) and "exception" in result:
        pytest.fail(result["exception"])
    return result


def assert_params_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_params_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=ATOL, rtol=0, msg=name)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> list[dict]:
    return launch(tmp_path_factory.mktemp("ranks"))


@pytest.fixture
def fsdp_runs(ddp_runs) -> list[dict]:
    return ddp_runs  # one launch runs the DDP and the FSDP scenarios


# -- two ranks: DDP ------------------------------------------------------------------
RUNS = [("convnet", "convnet_ref"), ("convnet_static", "convnet_ref"),
        ("convnet_view", "convnet_view_ref"), ("transformer", "transformer_ref")]


@pytest.mark.parametrize("name,ref", RUNS)
def test_ddp_ranks_identical_after_freeze_events(ddp_runs, name, ref):
    r0, r1 = ok(ddp_runs[0][name]), ok(ddp_runs[1][name])
    assert r0["depths"] == r1["depths"] == ok(ddp_runs[0][ref])["depths"]
    assert len(set(r0["depths"])) >= 4  # at least three freeze events
    assert_params_equal(r0["params"], r1["params"])


@pytest.mark.parametrize("name,ref", RUNS)
def test_ddp_matches_one_process_over_global_batch(ddp_runs, name, ref):
    # Default DDP, static_graph and gradient_as_bucket_view (with Adam) alike.
    assert_params_close(ok(ddp_runs[0][name])["params"], ok(ddp_runs[0][ref])["params"])


@pytest.mark.parametrize("name", ["convnet", "transformer"])
def test_ddp_frozen_weights_never_move(ddp_runs, name):
    result = ok(ddp_runs[0][name])
    assert len(result["frozen_at"]) == len(result["frozen"]) > 0
    for param, value in result["frozen_at"].items():
        assert torch.equal(value, result["params"][param]), param


def test_ddp_all_reduces_only_trainable_bytes(ddp_runs):
    for rank in (0, 1):
        result = ok(ddp_runs[rank]["traffic"])
        # every step: bytes all-reduced == bytes of the parameters still trainable
        assert result["bytes"] == result["trainable_bytes"]
    total = result["bytes"][0]
    assert result["bytes"][2] < total and result["bytes"][4] < result["bytes"][2]
    assert result["bytes"][5] > result["bytes"][4]  # unfreezing brings them back


def test_composers_way_keeps_all_reducing_frozen_buckets(ddp_runs):
    # The baseline the rebuild improves on: find_unused_parameters=True, reducer as built.
    result = ok(ddp_runs[0]["traffic_composer"])
    assert result["trainable_bytes"][-1] < result["trainable_bytes"][0]
    assert result["bytes"] == [result["bytes"][0]] * len(result["bytes"])


def test_ddp_unfreeze_never_diverges(ddp_runs):
    # Rank 1 edits a frozen weight before it is thawed; the thaw broadcasts rank 0's.
    r0, r1 = ok(ddp_runs[0]["unfreeze"]), ok(ddp_runs[1]["unfreeze"])
    assert r0["depth"] == r1["depth"] == 2
    assert_params_equal(r0["params"], r1["params"])
    assert_params_close(r0["params"], ok(ddp_runs[0]["unfreeze_ref"])["params"])


def test_control_thaw_by_hand_diverges(ddp_runs):
    # Why the rebuild matters: DDP never averages a parameter thawed after wrapping.
    a, b = ok(ddp_runs[0]["plain_ddp_thaw"])["params"], ok(ddp_runs[1]["plain_ddp_thaw"])["params"]
    assert not torch.equal(a["0.weight"], b["0.weight"])
    assert torch.equal(a["9.weight"], b["9.weight"])


def test_thaw_by_hand_then_attach_is_repaired(ddp_runs):
    a, b = ok(ddp_runs[0]["thaw_then_attach"])["params"], ok(ddp_runs[1]["thaw_then_attach"])["params"]
    assert_params_equal(a, b)


def test_control_freeze_by_hand_breaks_default_ddp(ddp_runs):
    for rank in (0, 1):
        assert "Expected to have finished reduction" in ok(ddp_runs[rank]["plain_ddp_freeze"])["error"]


def test_ddp_resume_on_two_ranks_is_bit_identical(ddp_runs):
    for rank in (0, 1):
        result = ok(ddp_runs[rank]["resume"])
        assert result["depth_after_load"] == 2 and result["final_depth"] == 4
        assert_params_equal(result["resumed"], result["straight"])


# -- two ranks: ZeroRedundancyOptimizer and FSDP2 checkpointed through DCP ------------------------
CONVNET = ["0.weight", "0.bias", "2.weight", "2.bias", "3.weight", "3.bias", "7.weight", "7.bias",
           "9.weight", "9.bias"]


@pytest.mark.parametrize("name", ["zero", "zero_buckets"])
def test_zero_on_two_ranks_follows_freezes_and_resumes_bit_identically(ddp_runs, name):
    r0, r1 = ok(ddp_runs[0][name]), ok(ddp_runs[1][name])
    frozen = ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert r0["frozen"] == r1["frozen"] == frozen  # the checkpoint was taken right after this freeze
    # The local optimizers split exactly the trainable parameters, with state for nothing else.
    assert not set(r0["local"]) & set(r1["local"])
    assert sorted(r0["local"] + r1["local"]) == sorted(set(CONVNET) - set(frozen))
    assert r0["local_state"] == sorted(r0["local"]) and r1["local_state"] == sorted(r1["local"])
    # consolidate_state_dict(0); state_dict() on rank 0: one entry per parameter in the outer groups.
    assert r0["state_keys"] == list(range(len(CONVNET) - len(frozen)))
    for result in (r0, r1):
        assert result["final_depth"] == 4
        assert_params_equal(result["resumed"], result["straight"])
        assert_params_equal(result["straight"], result["reference"])  # = plain Adam under DDP, bit for bit
    assert_params_equal(r0["resumed"], r1["resumed"])


def test_fsdp2_checkpoint_through_dcp_resumes_bit_identically(ddp_runs):
    r0, r1 = ok(ddp_runs[0]["fsdp2_dcp"]), ok(ddp_runs[1]["fsdp2_dcp"])
    for result in (r0, r1):
        assert result["saved_frozen"] == ["0.bias", "0.weight", "2.bias", "2.weight"]
        assert result["depth_after_load"] == 2 and result["final_depth"] == 4
        assert_params_equal(result["resumed"], result["straight"])
    assert_params_equal(r0["resumed"], r1["resumed"])


def test_ranks_disagreeing_on_frozen_set_raise_everywhere(ddp_runs):
    for rank in (0, 1):
        assert "ranks disagree on the trainable parameters" in ok(ddp_runs[rank]["disagree"])["error"]


def test_debug_mode_catches_disagreement_before_the_change(ddp_runs):
    for rank in (0, 1):
        result = ok(ddp_runs[rank]["debug_disagree"])
        assert "rank 0: step 1 depth 0, rank 1: step 1 depth 1" in result["error"]
        assert result["depth"] == 0  # nothing was applied


def test_adaptive_policy_decides_alike_on_every_rank(ddp_runs):
    # GradientChange reads all-reduced gradients; checked at every decision (debug mode).
    r0, r1 = ok(ddp_runs[0]["adaptive"]), ok(ddp_runs[1]["adaptive"])
    assert r0["depths"] == r1["depths"] and r0["depths"][-1] > 0
    assert_params_equal(r0["params"], r1["params"])


# -- two ranks: FSDP -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["fsdp2", "fsdp1_orig"])
def test_fsdp_freezes_like_one_process(fsdp_runs, name):
    r0, r1 = ok(fsdp_runs[0][name]), ok(fsdp_runs[1][name])
    ref = ok(fsdp_runs[0]["convnet_ref"])
    assert r0["depths"] == r1["depths"] == ref["depths"]
    assert_params_equal(r0["params"], r1["params"])
    plain = {n.replace("_fsdp_wrapped_module.", ""): p for n, p in r0["params"].items()}
    assert_params_close(plain, ref["params"])
    assert len(r0["frozen_at"]) == 8
    for param, value in r0["frozen_at"].items():
        assert torch.equal(value, r0["params"][param]), param


def test_fsdp1_without_orig_params_is_refused(fsdp_runs):
    for rank in (0, 1):
        assert "use_orig_params=False" in ok(fsdp_runs[rank]["fsdp1_flat"])["error"]


# -- one rank, in process: error paths and the fallback -------------------------------
@pytest.fixture
def one_rank():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        gc.collect()  # reducers of the test's DDP wrappers go before the process group
        dist.destroy_process_group()


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def _steps(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    for _ in range(n):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad()


def test_this_torch_supports_the_rebuild(one_rank):
    assert distributed.rebuild_unsupported_reason(DDP(_net())) is None


def test_rebuild_replaces_the_reducer_and_training_continues(one_rank):
    net = _net()
    ddp = DDP(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    freezing = lf.LayerFreezing(interval="epoch").attach(ddp, opt, total_steps=10)
    _steps(ddp, opt, 2)
    before = ddp.reducer
    freezing.set_depth(2)
    assert ddp.reducer is not before
    frozen = net[0].weight.detach().clone()
    _steps(ddp, opt, 3)  # would raise "Expected to have finished reduction" without it
    assert torch.equal(net[0].weight, frozen)
    freezing.set_depth(0)
    _steps(ddp, opt, 2)
    assert not torch.equal(net[0].weight, frozen)


@pytest.mark.parametrize("reason", ["mixed_precision", "missing"])
def test_unsupported_reducer_without_find_unused_is_refused_at_attach(one_rank, monkeypatch, reason):
    net = _net()
    ddp = DDP(net)
    if reason == "mixed_precision":
        monkeypatch.setattr(ddp, "mixed_precision", object())
        expected = "built with mixed_precision"
    else:
        monkeypatch.delattr(DDP, "_ddp_init_helper")
        expected = "has no DistributedDataParallel._ddp_init_helper"
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=f"{expected}.*HINT: .*find_unused_parameters=True"):
        lf.LayerFreezing().attach(ddp, opt, total_steps=10)
    assert all(p.requires_grad for p in net.parameters())
    assert len(opt.param_groups[0]["params"]) == 6


def test_builtin_comm_hook_is_reported(one_rank):
    ddp = DDP(_net())
    ddp._register_builtin_comm_hook(dist.BuiltinCommHookType.FP16_COMPRESS)
    assert "built-in communication hook" in distributed.rebuild_unsupported_reason(ddp)


def test_powersgd_hook_is_reported(one_rank):
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    ddp = DDP(_net())
    ddp.register_comm_hook(powerSGD_hook.PowerSGDState(process_group=None), powerSGD_hook.powerSGD_hook)
    assert "PowerSGD" in distributed.rebuild_unsupported_reason(ddp)


def test_builtin_hook_registered_after_attach_is_never_dropped_silently(one_rank):
    net = _net()
    ddp = DDP(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    freezing = lf.LayerFreezing(interval="epoch").attach(ddp, opt, total_steps=10)
    ddp._register_builtin_comm_hook(dist.BuiltinCommHookType.FP16_COMPRESS)
    with pytest.raises(RuntimeError, match=r"can no longer be rebuilt.*built-in communication hook.*HINT"):
        freezing.set_depth(1)


def test_fallback_warns_and_freezes_the_composer_way(one_rank, monkeypatch, caplog):
    monkeypatch.setattr(distributed, "rebuild_unsupported_reason", lambda ddp: "simulated")
    net = _net()
    ddp = DDP(net, find_unused_parameters=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with caplog.at_level(logging.WARNING, logger="layerfreeze"):
        freezing = lf.LayerFreezing(interval="epoch").attach(ddp, opt, total_steps=10)
    assert "cannot be rebuilt (simulated)" in caplog.text and "HINT" in caplog.text
    reducer = ddp.reducer
    freezing.set_depth(2)
    frozen = net[0].weight.detach().clone()
    _steps(ddp, opt, 2)
    assert ddp.reducer is reducer  # left as built
    assert torch.equal(net[0].weight, frozen)
    freezing.set_depth(0)
    _steps(ddp, opt, 1)
    assert not torch.equal(net[0].weight, frozen)


def _thawed_after_wrapping(**ddp_kwargs) -> tuple[nn.Module, DDP]:
    net = _net()
    net[0].weight.requires_grad_(False)
    ddp = DDP(net, **ddp_kwargs)
    net[0].weight.requires_grad_(True)  # the reducer does not know it
    return net, ddp


def test_fallback_refuses_requires_grad_changed_after_wrapping(one_rank, monkeypatch):
    monkeypatch.setattr(distributed, "rebuild_unsupported_reason", lambda ddp: "simulated")
    net, ddp = _thawed_after_wrapping(find_unused_parameters=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="requires_grad of the model's parameters changed after "
                       r"DistributedDataParallel wrapped it.*HINT"):
        lf.LayerFreezing().attach(ddp, opt, total_steps=10)


def test_requires_grad_changed_after_wrapping_is_repaired_at_attach(one_rank, caplog):
    net, ddp = _thawed_after_wrapping()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    reducer = ddp.reducer
    with caplog.at_level(logging.WARNING, logger="layerfreeze"):
        lf.LayerFreezing().attach(ddp, opt, total_steps=10)
    assert "rebuilding its reducer" in caplog.text
    assert ddp.reducer is not reducer
    assert ddp._get_ddp_logging_data()["num_parameter_tensors"] == 6


def test_a_refused_attach_leaves_a_stale_reducer_alone(one_rank):
    net, ddp = _thawed_after_wrapping()
    reducer = ddp.reducer
    other = torch.optim.SGD(_net().parameters(), lr=0.1)  # trains another model
    with pytest.raises(ValueError, match="optimizer"):
        lf.LayerFreezing().attach(ddp, other, total_steps=10)
    assert ddp.reducer is reducer  # no rebuild, no collective, before a refusal


def test_fsdp1_without_orig_params_raises_before_changing_anything(one_rank):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = FSDP(_net(), use_orig_params=False, device_id=torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"use_orig_params=False.*HINT: .*use_orig_params=True"):
        lf.LayerFreezing().attach(model, opt, total_steps=10)


def test_single_process_models_are_untouched():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    freezing = lf.LayerFreezing(interval="epoch").attach(net, opt, total_steps=10)
    freezing.set_depth(1)  # no process group needed
    assert freezing.frozen_parameters == ["0.bias", "0.weight"]


# -- ZeroRedundancyOptimizer, one rank in process (two ranks: the worker above) ---------------
def _zero_run(steps: range, bucket_view: bool, state: dict | None = None):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    net = _net()
    opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=torch.optim.Adam, lr=0.01,
                                  parameters_as_bucket_view=bucket_view)
    freezing = lf.LayerFreezing(freeze_start=0.0, interval="step").attach(net, opt, total_steps=8)
    if state is not None:
        net.load_state_dict(state["model"])
        freezing.load_state_dict(state["freezing"])  # before the optimizer, as always
        opt.load_state_dict(state["opt"])
    for step in steps:
        g = torch.Generator().manual_seed(step)
        net(torch.randn(3, 4, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        freezing.step()
    return net, opt, freezing


@pytest.mark.parametrize("bucket_view", [False, True])
def test_zero_local_optimizer_follows_freezes_and_resume_is_bit_identical(one_rank, bucket_view, caplog):
    straight, _, _ = _zero_run(range(8), bucket_view)
    with caplog.at_level(logging.WARNING):
        net, opt, freezing = _zero_run(range(4), bucket_view)
    assert freezing.frozen_depth == 1
    assert "trainable parameters changed" not in caplog.text  # ZeRO's own warning: handled here
    # The local optimizer holds exactly the trainable parameters, in ZeRO's order (largest first).
    assert opt.optim.param_groups[0]["params"] == [net[2].weight, net[4].weight, net[2].bias, net[4].bias]
    assert {id(p) for p in opt.optim.state} == {id(p) for p in opt.optim.param_groups[0]["params"]}
    opt.consolidate_state_dict(0)
    saved = {"model": net.state_dict(), "opt": opt.state_dict(), "freezing": freezing.state_dict()}
    assert sorted(saved["opt"]["state"]) == [0, 1, 2, 3]
    assert torch.equal(saved["opt"]["state"][0]["exp_avg"], opt.optim.state[net[2].weight]["exp_avg"])
    saved = copy.deepcopy(saved)

    resumed, opt, freezing = _zero_run(range(4, 8), bucket_view, saved)
    assert freezing.frozen_depth == 2
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    freezing.set_depth(0)  # everything back, in the partition's original order, with fresh state
    net = resumed
    assert opt.optim.param_groups[0]["params"] == [net[2].weight, net[0].weight, net[4].weight, net[0].bias,
                                                   net[2].bias, net[4].bias]
    assert {id(p) for p in opt.optim.state} == {id(p) for p in (net[4].weight, net[4].bias)}


def test_zero_with_two_param_groups_keeps_each_group_in_step(one_rank):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    net = _net()
    # Lists: ZeroRedundancyOptimizer consumes a generator in a dict group before using it.
    groups = [{"params": list(net[0].parameters())}, {"params": list(net[2:].parameters()), "lr": 0.05}]
    opt = ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.SGD, lr=0.1, momentum=0.9)
    freezing = lf.LayerFreezing(interval="step").attach(net, opt, total_steps=10)
    _steps(net, opt, 2)
    freezing.set_depth(1)
    assert [g["params"] for g in opt.optim.param_groups] == [[], [net[2].weight, net[4].weight, net[2].bias,
                                                                   net[4].bias]]
    assert [g["lr"] for g in opt.optim.param_groups] == [0.1, 0.05]
    frozen = net[0].weight.detach().clone()
    _steps(net, opt, 2)
    assert torch.equal(net[0].weight, frozen)
    opt.consolidate_state_dict(0)
    state = opt.state_dict()
    assert [g["params"] for g in state["param_groups"]] == [[], [0, 1, 2, 3]] and sorted(state["state"]) == [0, 1, 2, 3]
    freezing.set_depth(0)
    assert opt.optim.param_groups[0]["params"] == [net[0].weight, net[0].bias]
    _steps(net, opt, 1)
    assert not torch.equal(net[0].weight, frozen)


def test_zero_follows_composer_style_freeze_layers(one_rank):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    net = _net()
    opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=torch.optim.Adam, lr=0.01)
    _steps(net, opt, 1)
    assert lf.freeze_layers(net, opt, current_duration=1.0, freeze_start=0.0) == (2, 1.0)
    assert opt.optim.param_groups[0]["params"] == [net[4].weight, net[4].bias]
    assert {id(p) for p in opt.optim.state} == {id(net[4].weight), id(net[4].bias)}
    opt.consolidate_state_dict(0)
    assert sorted(opt.state_dict()["state"]) == [0, 1]


def test_zero_overlap_with_ddp_is_refused_at_attach(one_rank):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    net = _net()
    opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=torch.optim.SGD, lr=0.1, overlap_with_ddp=True)
    with pytest.raises(ValueError, match=r"optimizers\[0\] is ZeroRedundancyOptimizer\(overlap_with_ddp=True\).*"
                       "HINT: construct it with overlap_with_ddp=False"):
        lf.LayerFreezing().attach(DDP(net), opt, total_steps=10)
    assert all(p.requires_grad for p in net.parameters())


# -- the documented torchrun example ---------------------------------------------------
def test_torchrun_example_runs_as_documented(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(example), "--epochs", "2", "--checkpoint", str(tmp_path / "ckpt.pt")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out = proc.communicate(timeout=LAUNCH_TIMEOUT)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("torchrun example did not finish:\n" + proc.communicate()[0])
    assert proc.returncode == 0, out
    # 2 epochs of 16 steps, freeze_start=0.25: depth int(1/3 * 3) = 1 after epoch 0, 3 at the end
    assert "epoch 0: loss" in out and "frozen layers 1 of 4, frozen parameters ['0.bias', '0.weight']\n" in out
    assert "epoch 1: loss" in out and "frozen layers 3 of 4" in out
    assert "ranks agree: True" in out
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert state["freezing"]["frozen"] == ["0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight"]
