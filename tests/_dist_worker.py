"""One rank of the distributed tests: ``python _dist_worker.py OUTDIR``.

Started twice by tests/test_distributed.py with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set (gloo on 127.0.0.1). Runs every scenario in order and saves
what the tests compare to OUTDIR/rank{RANK}.pt after each one. A scenario that
raises records the message and the next one runs; collectives time out after
``LF_DIST_TIMEOUT`` seconds, so a disagreement between ranks ends the process
instead of hanging it (the test also kills it after its own timeout). Set
``LF_DIST_ONLY=name,name`` to run only those scenarios.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import sys
import time
import traceback
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import layerfreeze as lf

GLOBAL_BATCH = 8


# -- models and data (deterministic per step, identical on every rank) -------------
def convnet() -> nn.Module:
    # GroupNorm, not BatchNorm: per-rank batch statistics would make DDP differ from
    # one process over the global batch by design, not by a bug.
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4),
    )


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 16)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def batch(kind: str, step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the global batch of ``step`` that ``rank`` of ``world`` trains on."""
    g = torch.Generator().manual_seed(1000 + step)
    if kind == "convnet":
        x = torch.randn(GLOBAL_BATCH, 3, 6, 6, generator=g)
    else:
        x = torch.randint(0, 32, (GLOBAL_BATCH, 5), generator=g)
    y = torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
    per = GLOBAL_BATCH // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def build(kind: str) -> nn.Module:
    return convnet() if kind == "convnet" else TinyTransformer()


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    inner = model.module if isinstance(model, DDP) else model
    return {n: p.detach().clone() for n, p in inner.named_parameters()}


def train(
    model: nn.Module, opt: torch.optim.Optimizer, kind: str, steps: range, rank: int, world: int,
    after: Optional[Callable[[int], None]] = None,
) -> None:
    loss_fn = nn.CrossEntropyLoss()
    for step in steps:
        x, y = batch(kind, step, rank, world)
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after is not None:
            after(step)


# -- scenarios -------------------------------------------------------------------
def run_schedule(kind: str, rank: int, world: int, ddp_kwargs: Optional[dict] = None,
                 steps: int = 8, opt_name: str = "sgd") -> dict[str, Any]:
    """Train with a step-wise schedule; DDP when ddp_kwargs is not None, else one process."""
    model = build(kind)
    wrapped = DDP(model, **ddp_kwargs) if ddp_kwargs is not None else model
    if opt_name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    unit = "owner" if kind == "transformer" else "leaf"
    freezing = lf.LayerFreezing(freeze_start=0.0, interval="step", unit=unit)
    freezing.attach(wrapped, opt, total_steps=steps)
    depths: list[int] = []
    frozen_at: dict[str, torch.Tensor] = {}

    def after(step: int) -> None:
        freezing.step()
        depths.append(freezing.frozen_depth)
        for name in freezing.frozen_parameters:
            frozen_at.setdefault(name, dict(model.named_parameters())[name].detach().clone())

    train(wrapped, opt, kind, range(steps), rank, world, after)
    return {"depths": depths, "params": params_of(model), "frozen_at": frozen_at,
            "frozen": freezing.frozen_parameters, "layers": len(freezing.layers)}


def byte_counter(state, bucket):
    """DDP communication hook: count the bytes handed to all-reduce, then all-reduce."""
    # No annotations: DDP checks them against dist.GradBucket, and postponed
    # annotations (the __future__ import above) are strings.
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    buffer = bucket.buffer()
    state["bytes"] += buffer.numel() * buffer.element_size()
    return default_hooks.allreduce_hook(None, bucket)


def run_traffic(rank: int, world: int, composer: bool) -> dict[str, Any]:
    """Bytes all-reduced per step while the frozen depth changes.

    ``composer=True`` is Composer's way: find_unused_parameters=True and parameters
    frozen in place (lf.freeze_parameters), the reducer left as it was built.
    """
    model = convnet()
    ddp = DDP(model, find_unused_parameters=composer)
    state = {"bytes": 0}
    ddp.register_comm_hook(state, byte_counter)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezing = lf.LayerFreezing(interval="epoch").attach(ddp, opt, total_steps=100)
    depths = [0, 0, 2, 2, 4] if composer else [0, 0, 2, 2, 4, 1, 1]
    per_step, trainable = [], []
    for step, depth in enumerate(depths):
        if depth != freezing.frozen_depth:
            if composer:
                lf.freeze_parameters([p for layer in freezing.layers[:depth] for p in layer.module.parameters()], [opt])
            else:
                freezing.set_depth(depth)
        state["bytes"] = 0
        train(ddp, opt, "convnet", range(step, step + 1), rank, world)
        per_step.append(state["bytes"])
        trainable.append(sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad))
    return {"bytes": per_step, "trainable_bytes": trainable, "params": params_of(model)}


def run_unfreeze(kind: str, rank: int, world: int, ddp: bool) -> dict[str, Any]:
    """Freeze deep, then unfreeze in two moves, training between (set_depth)."""
    model = build(kind)
    wrapped = DDP(model) if ddp else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    freezing = lf.LayerFreezing(interval="epoch", unit="owner").attach(wrapped, opt, total_steps=100)
    step = 0
    for depth in (3, 1, 0, 2):
        freezing.set_depth(depth)
        train(wrapped, opt, kind, range(step, step + 2), rank, world)
        step += 2
        if depth == 3 and ddp and rank == 1:
            # A rank-local edit of a frozen weight (thawed by the next move): the
            # thaw broadcasts from rank 0, so it must not survive.
            with torch.no_grad():
                model.encoder.self_attn.out_proj.weight.add_(1.0)
    return {"params": params_of(model), "depth": freezing.frozen_depth}


def run_resume(rank: int, world: int, ckpt: str) -> dict[str, Any]:
    """8 steps straight vs 4 steps, checkpoint on rank 0, fresh objects, 4 more steps."""
    def make():
        model = convnet()
        ddp = DDP(model)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        freezing = lf.LayerFreezing(freeze_start=0.0, interval="step").attach(ddp, opt, total_steps=8)
        return model, ddp, opt, freezing

    model, ddp, opt, freezing = make()
    train(ddp, opt, "convnet", range(8), rank, world, lambda s: freezing.step())
    straight = params_of(model)

    model, ddp, opt, freezing = make()
    train(ddp, opt, "convnet", range(4), rank, world, lambda s: freezing.step())
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                    "freezing": freezing.state_dict()}, ckpt)
    dist.barrier()
    del model, ddp, opt, freezing
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    model, ddp, opt, freezing = make()  # fresh DDP object, as after a restart
    model.load_state_dict(saved["model"])
    freezing.load_state_dict(saved["freezing"])  # before the optimizer: groups lose frozen params
    opt.load_state_dict(saved["opt"])
    depth_after_load = freezing.frozen_depth
    train(ddp, opt, "convnet", range(4, 8), rank, world, lambda s: freezing.step())
    return {"straight": straight, "resumed": params_of(model), "depth_after_load": depth_after_load,
            "final_depth": freezing.frozen_depth}


def run_disagree(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 freezes one layer deeper than rank 0: must raise on every rank."""
    model = convnet()
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezing = lf.LayerFreezing(interval="epoch").attach(ddp, opt, total_steps=10)
    try:
        freezing.set_depth(1 + rank)
    except RuntimeError as error:
        return {"error": str(error)}
    return {"error": None}


def run_debug_disagree(rank: int, world: int) -> dict[str, Any]:
    """Ranks told different total_steps: TORCH_DISTRIBUTED_DEBUG catches it at the first decision."""
    model = convnet()
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezing = lf.LayerFreezing(freeze_start=0.0, interval="step").attach(ddp, opt, total_steps=8 // (1 + rank))
    os.environ["TORCH_DISTRIBUTED_DEBUG"] = "INFO"
    try:
        train(ddp, opt, "convnet", range(2), rank, world, lambda s: freezing.step())
    except RuntimeError as error:
        return {"error": str(error), "depth": freezing.frozen_depth}
    finally:
        del os.environ["TORCH_DISTRIBUTED_DEBUG"]
    return {"error": None, "depth": freezing.frozen_depth}


def run_adaptive(rank: int, world: int) -> dict[str, Any]:
    """GradientChange decides from gradients: all-reduced, so every rank decides alike.

    Runs under TORCH_DISTRIBUTED_DEBUG=INFO, so the ranks compare step and depth at
    every decision and any disagreement raises.
    """
    model = convnet()
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    policy = lf.policies.GradientChange(every=2, percentile=75.0)
    freezing = lf.LayerFreezing(interval="step", policy=policy).attach(ddp, opt, total_steps=12)
    depths: list[int] = []
    os.environ["TORCH_DISTRIBUTED_DEBUG"] = "INFO"
    try:
        train(ddp, opt, "convnet", range(12), rank, world,
              lambda s: (freezing.step(), depths.append(freezing.frozen_depth)))
    finally:
        del os.environ["TORCH_DISTRIBUTED_DEBUG"]
    return {"depths": depths, "params": params_of(model)}


def run_plain_ddp_freeze(rank: int, world: int) -> dict[str, Any]:
    """Control: the failure this module exists for (requires_grad=False after wrapping)."""
    model = convnet()
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train(ddp, opt, "convnet", range(1), rank, world)
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    try:
        train(ddp, opt, "convnet", range(1, 3), rank, world)
    except RuntimeError as error:
        return {"error": str(error)}
    return {"error": None}


def run_plain_ddp_thaw(rank: int, world: int, attach: bool) -> dict[str, Any]:
    """A parameter frozen at wrap time and thawed by hand: never averaged (the control),
    unless LayerFreezing is attached afterwards (it rebuilds the reducer at attach)."""
    model = convnet()
    model[0].weight.requires_grad_(False)
    ddp = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model[0].weight.requires_grad_(True)
    if attach:
        lf.LayerFreezing().attach(ddp, opt, total_steps=10)
    train(ddp, opt, "convnet", range(2), rank, world)
    return {"params": params_of(model)}


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def _train_sharded(model: nn.Module, full_params: Callable[[], dict[str, torch.Tensor]],
                   rank: int, world: int) -> dict[str, Any]:
    opt = _sgd(model)
    freezing = lf.LayerFreezing(freeze_start=0.0, interval="step").attach(model, opt, total_steps=8)
    depths: list[int] = []
    frozen_at: dict[str, torch.Tensor] = {}

    def after(step: int) -> None:
        freezing.step()
        depths.append(freezing.frozen_depth)
        full = full_params()
        for name in freezing.frozen_parameters:
            frozen_at.setdefault(name, full[name])

    train(model, opt, "convnet", range(8), rank, world, after)
    return {"error": None, "depths": depths, "frozen_at": frozen_at, "params": full_params()}


def run_fsdp2(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    model = convnet()
    for index in (0, 2, 3, 7, 9):
        fully_shard(model[index])
    fully_shard(model)

    def full_params() -> dict[str, torch.Tensor]:
        return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}

    return _train_sharded(model, full_params, rank, world)


def run_fsdp1(rank: int, world: int, use_orig_params: bool) -> dict[str, Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    model = FSDP(convnet(), use_orig_params=use_orig_params, device_id=torch.device("cpu"),
                 auto_wrap_policy=ModuleWrapPolicy({nn.Conv2d, nn.Linear}))

    def full_params() -> dict[str, torch.Tensor]:
        with FSDP.summon_full_params(model):
            return {n: p.detach().clone() for n, p in model.module.named_parameters()}

    try:
        return _train_sharded(model, full_params, rank, world)
    except ValueError as error:
        return {"error": str(error)}


def _names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def run_zero(rank: int, world: int, ckpt: str, bucket_view: bool) -> dict[str, Any]:
    """ZeroRedundancyOptimizer(Adam) under DDP: 8 steps straight vs 4, consolidate, restart, 4.

    Also plain Adam under DDP as the reference: ZeRO only splits who updates what.
    """
    from torch.distributed.optim import ZeroRedundancyOptimizer

    def make(zero: bool = True):
        model = convnet()
        ddp = DDP(model)
        opt = (ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.Adam, lr=0.01,
                                       parameters_as_bucket_view=bucket_view)
               if zero else torch.optim.Adam(model.parameters(), lr=0.01))
        freezing = lf.LayerFreezing(freeze_start=0.0, interval="step").attach(ddp, opt, total_steps=8)
        return model, ddp, opt, freezing

    model, ddp, opt, freezing = make(zero=False)
    train(ddp, opt, "convnet", range(8), rank, world, lambda s: freezing.step())
    reference = params_of(model)

    model, ddp, opt, freezing = make()
    train(ddp, opt, "convnet", range(8), rank, world, lambda s: freezing.step())
    straight = params_of(model)

    model, ddp, opt, freezing = make()
    train(ddp, opt, "convnet", range(4), rank, world, lambda s: freezing.step())
    names = _names(model)
    local = [names[id(p)] for g in opt.optim.param_groups for p in g["params"]]
    local_state = sorted(names[id(p)] for p in opt.optim.state)
    opt.consolidate_state_dict(0)  # right after a freeze (depth 1 -> 2 at step 4)
    state_keys = None
    if rank == 0:
        saved = opt.state_dict()
        state_keys = sorted(saved["state"])
        torch.save({"model": model.state_dict(), "opt": saved, "freezing": freezing.state_dict()}, ckpt)
    frozen = freezing.frozen_parameters
    dist.barrier()
    del model, ddp, opt, freezing
    gc.collect()
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    model, ddp, opt, freezing = make()
    model.load_state_dict(saved["model"])
    freezing.load_state_dict(saved["freezing"])
    opt.load_state_dict(saved["opt"])
    train(ddp, opt, "convnet", range(4, 8), rank, world, lambda s: freezing.step())
    return {"reference": reference, "straight": straight, "resumed": params_of(model), "local": local,
            "local_state": local_state, "state_keys": state_keys, "frozen": frozen,
            "final_depth": freezing.frozen_depth}


def run_fsdp2_dcp(rank: int, world: int, directory: str) -> dict[str, Any]:
    """FSDP2 + Adam: 8 steps straight vs 4, save with torch.distributed.checkpoint, restart, 4.

    The freezing state goes into the same checkpoint and is loaded first: it takes
    the frozen parameters out of the optimizer before the optimizer state is read.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    def make():
        model = convnet()
        for index in (0, 2, 3, 7, 9):
            fully_shard(model[index])
        fully_shard(model)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        freezing = lf.LayerFreezing(freeze_start=0.0, interval="step").attach(model, opt, total_steps=8)
        return model, opt, freezing

    def full(model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}

    model, opt, freezing = make()
    train(model, opt, "convnet", range(8), rank, world, lambda s: freezing.step())
    straight = full(model)

    model, opt, freezing = make()
    train(model, opt, "convnet", range(4), rank, world, lambda s: freezing.step())
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state, "freezing": freezing.state_dict()},
             checkpoint_id=directory)
    saved_frozen = freezing.frozen_parameters
    del model, opt, freezing

    model, opt, freezing = make()  # as after a restart
    state = {"freezing": freezing.state_dict()}  # the structure to read into
    dcp.load(state, checkpoint_id=directory)
    freezing.load_state_dict(state["freezing"])  # first: the optimizer loses the frozen parameters
    depth_after_load = freezing.frozen_depth
    model_state, optim_state = get_state_dict(model, opt)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=directory)
    set_state_dict(model, opt, model_state_dict=model_state, optim_state_dict=optim_state)
    train(model, opt, "convnet", range(4, 8), rank, world, lambda s: freezing.step())
    return {"straight": straight, "resumed": full(model), "saved_frozen": saved_frozen,
            "depth_after_load": depth_after_load, "final_depth": freezing.frozen_depth}


def scenarios(rank: int, world: int, out: str) -> dict[str, Callable[[], Any]]:
    """Every scenario, in the order the ranks run them (results are keyed by name)."""
    reference = rank == 0  # one-process references are computed on rank 0 only
    return {
        "convnet": lambda: run_schedule("convnet", rank, world, {}),
        "convnet_ref": lambda: run_schedule("convnet", 0, 1) if reference else None,
        "convnet_static": lambda: run_schedule("convnet", rank, world, {"static_graph": True}),
        "convnet_view": lambda: run_schedule("convnet", rank, world, {"gradient_as_bucket_view": True},
                                             opt_name="adam"),
        "convnet_view_ref": lambda: run_schedule("convnet", 0, 1, opt_name="adam") if reference else None,
        "transformer": lambda: run_schedule("transformer", rank, world, {}),
        "transformer_ref": lambda: run_schedule("transformer", 0, 1) if reference else None,
        "traffic": lambda: run_traffic(rank, world, composer=False),
        "traffic_composer": lambda: run_traffic(rank, world, composer=True),
        "unfreeze": lambda: run_unfreeze("transformer", rank, world, ddp=True),
        "unfreeze_ref": lambda: run_unfreeze("transformer", 0, 1, ddp=False) if reference else None,
        "resume": lambda: run_resume(rank, world, os.path.join(out, "ckpt.pt")),
        "disagree": lambda: run_disagree(rank, world),
        "debug_disagree": lambda: run_debug_disagree(rank, world),
        "adaptive": lambda: run_adaptive(rank, world),
        "thaw_then_attach": lambda: run_plain_ddp_thaw(rank, world, attach=True),
        "fsdp2": lambda: run_fsdp2(rank, world),
        "fsdp1_orig": lambda: run_fsdp1(rank, world, use_orig_params=True),
        "fsdp1_flat": lambda: run_fsdp1(rank, world, use_orig_params=False),
        "zero": lambda: run_zero(rank, world, os.path.join(out, "zero.pt"), bucket_view=False),
        "zero_buckets": lambda: run_zero(rank, world, os.path.join(out, "zero_buckets.pt"), bucket_view=True),
        "fsdp2_dcp": lambda: run_fsdp2_dcp(rank, world, os.path.join(out, "dcp")),
        # controls last: they leave their DDP objects broken by design
        "plain_ddp_thaw": lambda: run_plain_ddp_thaw(rank, world, attach=False),
        "plain_ddp_freeze": lambda: run_plain_ddp_freeze(rank, world),
    }


def main() -> None:
    out = sys.argv[1]
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    timeout = datetime.timedelta(seconds=float(os.environ.get("LF_DIST_TIMEOUT", "30")))
    dist.init_process_group("gloo", timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict[str, Any] = {}
    try:
        only = set(filter(None, os.environ.get("LF_DIST_ONLY", "").split(",")))  # for debugging one scenario
        for name, scenario in scenarios(rank, world, out).items():
            if only and name not in only:
                continue
            start = time.perf_counter()
            try:
                results[name] = scenario()
            except Exception:  # recorded for the test to report
                results[name] = {"exception": traceback.format_exc()}
            print(f"{name}: {time.perf_counter() - start:.2f}s", flush=True)
            torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        gc.collect()  # no DDP reducer may outlive the process group: gloo can abort at exit otherwise
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
