"""What freezing saves under FSDP1 (``use_orig_params=True``) depends on the wrapping.

Two ranks (gloo on 127.0.0.1) run tests/_fsdp1_worker.py: a model of three blocks
and a head (130 weights: 40 a block, 10 the head), one step before and one after
freezing the first two blocks, wrapped as one FSDP unit or as a unit per block.
The worker records the unsharded gradient each unit hands to reduce-scatter (an
FSDP communication hook), so the tests see what backward computed and what went
over the wire.
"""

from __future__ import annotations

from pathlib import Path

import _dist
import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORKER = Path(__file__).with_name("_fsdp1_worker.py")
LAUNCH_TIMEOUT = 120
FROZEN = ["0.0.bias", "0.0.weight", "0.2.bias", "0.2.weight", "1.0.bias", "1.0.weight", "1.2.bias", "1.2.weight"]
ORDER = ["0.0.weight", "0.0.bias", "0.2.weight", "0.2.bias", "1.0.weight", "1.0.bias", "1.2.weight", "1.2.bias",
         "2.0.weight", "2.0.bias", "2.2.weight", "2.2.bias", "3.weight", "3.bias"]  # the flat parameter's order


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp1")
    return _dist.launch(WORKER, out, timeout=LAUNCH_TIMEOUT, env={"LF_DIST_TIMEOUT": "30"})


def wrapped(ranks: list[dict], wrap: str) -> list[dict]:
    for result in ranks:
        if "exception" in result[wrap]:
            pytest.fail(result[wrap]["exception"])
    return [result[wrap] for result in ranks]


def slices(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name in ORDER:
        out[name] = flat[offset: offset + like[name].numel()].view_as(like[name])
        offset += like[name].numel()
    assert offset == flat.numel() == 130  # no padding: 130 splits evenly over 2 ranks
    return out


@pytest.mark.parametrize("wrap", ["one unit", "unit per block"])
def test_results_are_right_either_way(ranks, wrap):
    # Frozen weights bit-identical through the step after the freeze; the rest trained; ranks agree.
    r0, r1 = wrapped(ranks, wrap)
    assert r0["frozen"] == r1["frozen"] == FROZEN
    for name, weight in r0["final_weights"].items():
        assert torch.equal(weight, r1["final_weights"][name]), name
        moved = not torch.equal(weight, r0["after"]["weights"][name])
        assert moved is (name not in FROZEN), name


def test_one_unit_still_computes_and_reduce_scatters_the_frozen_gradients(ranks):
    for rank in wrapped(ranks, "one unit"):
        before, after = rank["before"], rank["after"]
        # One flat parameter, 130 weights, handed to reduce-scatter whole before and after freezing.
        assert [g.numel() for g in before["handed"]] == [g.numel() for g in after["handed"]] == [130]
        # Backward ran through the frozen blocks: their outputs required grad (views of a flat
        # parameter that requires grad, whatever the original parameters say).
        assert after["outputs_require_grad"] == [True, True, True]
        # What sits at the frozen weights' offsets: not zeros, but their true gradient on this
        # rank's batch, as if they were trainable.
        handed = slices(after["handed"][0], after["local_grads"])
        for name in FROZEN:
            assert handed[name].abs().max() > 0, name
            torch.testing.assert_close(handed[name], after["local_grads"][name], rtol=1e-5, atol=1e-7, msg=name)
        # summon_full_params(with_grads=True) shows zeros there instead (the view FSDP gives of
        # the original parameters, not what was computed and sent).
        for name in FROZEN:
            assert torch.equal(after["shown_grads"][name], torch.zeros_like(after["local_grads"][name])), name


def test_a_unit_per_block_gives_fully_frozen_units_no_gradient(ranks):
    for rank in wrapped(ranks, "unit per block"):
        before, after = rank["before"], rank["after"]
        # Before: three blocks of 40 weights and the root's head of 10. After: the frozen blocks'
        # units hand nothing to reduce-scatter; 50 of 130 weights' gradients go over the wire.
        assert sorted(g.numel() for g in before["handed"]) == [10, 40, 40, 40]
        assert sorted(g.numel() for g in after["handed"]) == [10, 40]
        # Backward stops below the first trainable block.
        assert after["outputs_require_grad"] == [False, False, True]
        for name in FROZEN:
            assert after["shown_grads"][name] is None, name
