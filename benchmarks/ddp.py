"""Gradient traffic and step time of freezing under DistributedDataParallel.

Runs on 2 CPU ranks (gloo on 127.0.0.1) by default; under ``torchrun`` it uses
the ranks torchrun gives it. Two measurements:

1. Bytes all-reduced per step, counted by a DDP communication hook that adds up
   the size of every bucket it all-reduces, before and after freezing the first
   ``--fraction`` of layers. With layerfreeze (default DDP settings, reducer
   rebuilt in place) they fall by the frozen share of parameter bytes; with
   Composer's way (``find_unused_parameters=True``, the reducer left as built)
   they do not fall at all.
2. Step time at the same frozen depth, interleaved in one run, medians over
   ``--repeats`` rounds of ``--steps`` steps: layerfreeze; Composer's way;
   the ideal (the model frozen by hand *before* DDP wraps it, so DDP never knew
   the frozen parameters); and no freezing. Printed as ratios.

Usage::

    python benchmarks/ddp.py                             # mlp, 2 ranks
    python benchmarks/ddp.py --model transformer --batch 8 --repeats 9
    torchrun --nproc_per_node 2 benchmarks/ddp.py --model resnet20
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent))
import layerfreeze as lf  # noqa: E402
from layerfreeze.bench import models as bundled  # noqa: E402
from _common import init_rank, launch_ranks, slowest_medians, table  # noqa: E402


def _counting_hook(state, bucket):
    # No annotations: DDP compares them with dist.GradBucket.
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    buffer = bucket.buffer()
    state["bytes"] += buffer.numel() * buffer.element_size()
    return default_hooks.allreduce_hook(None, bucket)


class Variant:
    """One way of training the same model at a frozen depth, on this rank."""

    def __init__(self, name: str, base: nn.Module, depth: int, x: torch.Tensor, y: torch.Tensor,
                 count: bool = False):
        self.name, self.x, self.y = name, x, y
        self.model = copy.deepcopy(base)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.freezing = lf.LayerFreezing(interval="epoch")
        self.bytes = {"bytes": 0}
        self.depth = depth
        if name == "ideal":
            self.freezing.attach(self.model, self.opt, total_steps=10**6).set_depth(depth)
            self.ddp = DDP(self.model)  # wrapped after freezing: DDP never knew the frozen params
        else:
            self.ddp = DDP(self.model, find_unused_parameters=(name == "composer"))
            self.freezing.attach(self.ddp, self.opt, total_steps=10**6)
        if count:
            self.ddp.register_comm_hook(self.bytes, _counting_hook)

    def freeze(self) -> None:
        if self.name == "layerfreeze":
            self.freezing.set_depth(self.depth)
        elif self.name == "composer":
            # Composer's freeze: requires_grad=False and out of the optimizer; the
            # reducer stays as DDP built it.
            layers = self.freezing.layers[: self.depth]
            lf.freeze_parameters([p for layer in layers for p in layer.module.parameters()], [self.opt])

    def step(self) -> int:
        self.bytes["bytes"] = 0
        nn.functional.cross_entropy(self.ddp(self.x), self.y).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return self.bytes["bytes"]

    def param_bytes(self, trainable_only: bool) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters()
                   if p.requires_grad or not trainable_only)


def _batch(spec: bundled.ModelSpec, args: argparse.Namespace, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(100 + rank)
    x = spec.example_input(args.batch)
    return x, torch.randint(0, 2, (args.batch,))


def run(rank: int, world: int, args: argparse.Namespace) -> None:
    init_rank(rank, world, args.threads)
    spec = bundled.get_model(args.model)
    torch.manual_seed(0)
    base = spec.factory()
    layers = lf.definition_order(base)
    depth = int(args.fraction * (len(layers) - 1))
    x, y = _batch(spec, args, rank)

    # 1. traffic, before and after freezing
    rows = []
    for name in ("layerfreeze", "composer"):
        variant = Variant(name, base, depth, x, y, count=True)
        before = [variant.step() for _ in range(2)][-1]
        total = variant.param_bytes(trainable_only=False)
        variant.freeze()
        after = [variant.step() for _ in range(2)][-1]
        trainable = variant.param_bytes(trainable_only=True)
        rows.append([name, f"{before:,}", f"{after:,}", f"{after / before:.3f}", f"{trainable / total:.3f}"])
        del variant

    # 2. step time at the same depth, interleaved
    variants = {name: Variant(name, base, depth, x, y) for name in ("layerfreeze", "composer", "ideal", "unfrozen")}
    for variant in variants.values():
        variant.freeze()

    def steps(variant: Variant) -> Callable[[], None]:
        return lambda: [variant.step() for _ in range(args.steps)] and None

    medians = slowest_medians({n: steps(v) for n, v in variants.items()}, args.repeats)
    checksum = torch.stack([p.detach().double().sum() for p in variants["layerfreeze"].model.parameters()]).sum()
    gathered = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(gathered, checksum)

    if rank == 0:
        print(f"model {args.model} ({spec.summary}), {world} ranks x batch {args.batch}, "
              f"{args.threads} thread(s) each, torch {torch.__version__}, backend gloo (CPU)")
        print(f"frozen depth {depth} of {len(layers)} layers (--fraction {args.fraction}), "
              f"first frozen {layers[0].name!r}, last frozen {layers[depth - 1].name if depth else None!r}\n")
        print("Bytes all-reduced per step (counted by a DDP communication hook):\n")
        print(table(["variant", "before freezing", "after freezing", "after / before",
                     "trainable share of parameter bytes"], rows))
        per_step = {n: medians[n] / args.steps for n in variants}
        print(f"\nStep time at the same depth (median of {args.repeats} interleaved rounds of "
              f"{args.steps} steps; slowest rank):\n")
        print(table(["variant", "ms / step", "time / layerfreeze"],
                    [[n, f"{per_step[n] * 1e3:.2f}", f"{per_step[n] / per_step['layerfreeze']:.3f}"]
                     for n in variants]))
        print(f"\ncomposer / layerfreeze = {per_step['composer'] / per_step['layerfreeze']:.3f} "
              f"(> 1: layerfreeze faster); layerfreeze / ideal = "
              f"{per_step['layerfreeze'] / per_step['ideal']:.3f} (1 = as fast as never wrapping the frozen part)")
        agree = all(torch.equal(g, gathered[0]) for g in gathered)
        print(f"ranks agree on the trained parameters: {'yes' if agree else 'NO'}")
    dist.barrier()
    del variants  # DDP reducers go before the process group (gloo can abort at exit otherwise)
    gc.collect()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mlp", choices=sorted(bundled.MODELS))
    parser.add_argument("--fraction", type=float, default=0.5, help="share of layers frozen (default 0.5)")
    parser.add_argument("--batch", type=int, default=32, help="examples per rank per step")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds per variant")
    parser.add_argument("--world", type=int, default=2, help="ranks to spawn when not under torchrun")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args(argv)
    if not 0.0 <= args.fraction <= 1.0:
        parser.error(f"--fraction must be in [0, 1], got {args.fraction}")
    launch_ranks(run, args)


if __name__ == "__main__":
    main()
