"""One rank of tests/test_fsdp1_units.py: ``python _fsdp1_worker.py OUTDIR``.

Started twice with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set (gloo on
127.0.0.1). Trains the same small model under FSDP1 (``use_orig_params=True``)
wrapped two ways, one step before and one after freezing its first two blocks, and
saves what FSDP did to OUTDIR/rank{RANK}.pt: the unsharded gradients handed to
reduce-scatter (an FSDP communication hook), whether each block's output required
grad, what ``summon_full_params(with_grads=True)`` shows, the weights before and
after. Collectives time out after ``LF_DIST_TIMEOUT`` seconds.
"""

from __future__ import annotations

import copy
import datetime
import gc
import os
import sys
import traceback
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._comm_hooks import default_hooks
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

import layerfreeze as lf

DEPTH = 4  # the first two blocks (two Linear layers each)


class Block(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))


def net() -> nn.Sequential:
    # Linear(4, 4) holds 20 weights: a block 40, the head 10, the model 130.
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block(), Block(), nn.Linear(4, 2))


def batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(10 * rank + step))


def run(wrap: str, rank: int) -> dict[str, Any]:
    policy = {"auto_wrap_policy": ModuleWrapPolicy({Block})} if wrap == "unit per block" else {}
    reference = net()
    model = FSDP(net(), use_orig_params=True, device_id=torch.device("cpu"), **policy)
    state = default_hooks.DefaultState(dist.group.WORLD)
    handed: list[torch.Tensor] = []

    def hook(hook_state: Any, grad: torch.Tensor, output: torch.Tensor) -> None:
        handed.append(grad.detach().clone())
        default_hooks.reduce_scatter_hook(hook_state, grad, output)

    model.register_comm_hook(state, hook)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    outputs_require_grad: list[bool] = []
    for block in blocks:
        block.register_forward_hook(lambda m, a, out: outputs_require_grad.append(out.requires_grad))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezing = lf.LayerFreezing().attach(model, opt, total_steps=100)

    def full_params() -> dict[str, torch.Tensor]:
        with FSDP.summon_full_params(model):
            return {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                    for n, p in model.named_parameters()}

    result: dict[str, Any] = {}
    for step, label in enumerate(("before", "after")):
        if label == "after":
            freezing.set_depth(DEPTH)
        handed.clear()
        outputs_require_grad.clear()
        weights = full_params()
        x = batch(rank, step)
        model(x).sum().backward()
        with FSDP.summon_full_params(model, with_grads=True):
            shown = {n.replace("_fsdp_wrapped_module.", ""): None if p.grad is None else p.grad.clone()
                     for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        # This rank's own gradient, on an unwrapped copy holding the same weights.
        local = copy.deepcopy(reference)
        local.load_state_dict(weights)
        local(x).sum().backward()
        result[label] = {
            "handed": list(handed),
            "outputs_require_grad": list(outputs_require_grad),
            "shown_grads": shown,
            "local_grads": {n: p.grad.clone() for n, p in local.named_parameters()},
            "weights": weights,
        }
    result["frozen"] = [n.replace("_fsdp_wrapped_module.", "") for n in freezing.frozen_parameters]
    result["final_weights"] = full_params()
    return result


def main() -> None:
    out = sys.argv[1]
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=float(os.environ.get("LF_DIST_TIMEOUT", "30")))
    dist.init_process_group("gloo", timeout=timeout)
    rank = dist.get_rank()
    results: dict[str, Any] = {}
    try:
        for wrap in ("one unit", "unit per block"):
            try:
                results[wrap] = run(wrap, rank)
            except Exception:  # recorded for the test to report
                results[wrap] = {"exception": traceback.format_exc()}
            torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
