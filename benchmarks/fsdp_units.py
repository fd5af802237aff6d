"""Gradient work of freezing under FSDP1 (``use_orig_params=True``), by how the model is wrapped.

FSDP1 flattens each unit's parameters into one ``FlatParameter``. When a unit holds
frozen and trainable weights together, its flat parameter still requires grad, the
frozen weights are views of it in forward, and backward computes their gradients
and reduce-scatters them with the rest (the optimizer then ignores them). When a
unit holds only frozen weights, FSDP1 turns its flat parameter's ``requires_grad``
off: no gradient, no reduce-scatter, and backward stops below the first trainable
unit. So the wrapping decides what freezing saves:

* ``one unit``: ``FSDP(model)``, every weight in the root's flat parameter;
* ``unit per block``: ``FSDP(model, auto_wrap_policy=ModuleWrapPolicy({Block}))``.

Runs on 2 CPU ranks (gloo on 127.0.0.1) by default; under ``torchrun`` it uses the
ranks torchrun gives it. Two measurements, the variants side by side in one run:

1. Bytes reduce-scattered per step (the unsharded gradient each unit hands to
   reduce-scatter, counted by an FSDP communication hook), before and after
   freezing the first ``--fraction`` of the blocks; and what the one-unit
   gradient holds at the frozen weights' offsets.
2. Step time at that depth, medians over ``--repeats`` interleaved rounds of
   ``--steps`` steps (slowest rank), as ratios; the same wrappings with nothing
   frozen are the reference.

Usage::

    python benchmarks/fsdp_units.py
    python benchmarks/fsdp_units.py --width 256 --batch 32   # smaller blocks: more per-unit overhead
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import layerfreeze as lf  # noqa: E402
from _common import init_rank, launch_ranks, slowest_medians, table  # noqa: E402


class Block(nn.Sequential):
    """One residual-free MLP block: the unit of wrapping and of freezing."""

    def __init__(self, width: int):
        super().__init__(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width), nn.ReLU())


def build(blocks: int, width: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[Block(width) for _ in range(blocks)], nn.Linear(width, 10))


class Counter:
    """An FSDP1 communication hook state counting the gradient bytes handed to reduce-scatter."""

    def __init__(self, process_group: Any):
        from torch.distributed.algorithms._comm_hooks import default_hooks

        self.state = default_hooks.DefaultState(process_group)
        self.reduce_scatter = default_hooks.reduce_scatter_hook
        self.bytes = 0
        self.keep = False  # keep a copy of each unsharded gradient in ``last``
        self.last: list[torch.Tensor] = []

    def hook(self, state: Any, grad: torch.Tensor, output: torch.Tensor) -> None:
        self.bytes += grad.numel() * grad.element_size()
        if self.keep:
            self.last.append(grad.detach().clone())
        self.reduce_scatter(self.state, grad, output)


class Variant:
    """One wrapping of the same model on this rank, frozen to ``depth`` layers or not."""

    def __init__(self, wrap: str, args: argparse.Namespace, depth: int, x: torch.Tensor, y: torch.Tensor):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        self.x, self.y, self.depth = x, y, depth
        policy = {"auto_wrap_policy": ModuleWrapPolicy({Block})} if wrap == "unit per block" else {}
        self.model = FSDP(build(args.blocks, args.width), use_orig_params=True, device_id=torch.device("cpu"),
                          **policy)
        self.counter = Counter(dist.group.WORLD)
        self.model.register_comm_hook(self.counter, self.counter.hook)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.freezing = lf.LayerFreezing().attach(self.model, self.opt, total_steps=10**6)

    def freeze(self) -> None:
        self.freezing.set_depth(self.depth)

    def step(self) -> int:
        self.counter.bytes = 0
        nn.functional.cross_entropy(self.model(self.x), self.y).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return self.counter.bytes


def frozen_slots(variant: Variant, reference: nn.Module) -> tuple[float, float]:
    """Largest |value| at the frozen weights' offsets of the one-unit gradient, and its largest
    difference from those weights' true gradient on this rank's batch (an unwrapped copy)."""
    variant.counter.keep, variant.counter.last = True, []
    variant.step()
    variant.counter.keep = False
    (flat,) = variant.counter.last  # one unit: one gradient
    nn.functional.cross_entropy(reference(variant.x), variant.y).backward()
    frozen = set(variant.freezing.frozen_parameters)
    total = sum(p.numel() for p in reference.parameters())
    if not 0 <= flat.numel() - total < dist.get_world_size():  # only the end pads the flat parameter
        raise RuntimeError(f"unexpected flat parameter layout: {flat.numel()} elements for {total} weights")
    largest = difference = 0.0
    offset = 0
    for name, param in reference.named_parameters():  # the flat parameter's order
        piece = flat[offset: offset + param.numel()].view_as(param)
        offset += param.numel()
        if name in frozen:
            largest = max(largest, piece.abs().max().item())
            difference = max(difference, (piece - param.grad).abs().max().item())
    return largest, difference


def run(rank: int, world: int, args: argparse.Namespace) -> None:
    init_rank(rank, world, args.threads)
    layers = lf.definition_order(build(args.blocks, args.width))
    frozen_blocks = int(args.fraction * args.blocks)
    depth = 2 * frozen_blocks  # two Linear layers a block
    total_numel = sum(p.numel() for layer in layers for p in layer.module.parameters())
    frozen_numel = sum(p.numel() for layer in layers[:depth] for p in layer.module.parameters())
    torch.manual_seed(100 + rank)
    x, y = torch.randn(args.batch, args.width), torch.randint(0, 10, (args.batch,))

    # 1. traffic before and after freezing; what the mixed flat gradient holds
    rows = []
    slots = (0.0, 0.0)
    for wrap in ("one unit", "unit per block"):
        variant = Variant(wrap, args, depth, x, y)
        before = variant.step()
        variant.freeze()
        after = variant.step()
        share = 1 - frozen_numel / total_numel
        rows.append([wrap, f"{before:,}", f"{after:,}", f"{after / before:.3f}", f"{share:.3f}"])
        if wrap == "one unit":
            reference = build(args.blocks, args.width)
            with torch.no_grad():
                for (_, mine), theirs in zip(reference.named_parameters(), _full_params(variant.model)):
                    mine.copy_(theirs)
            slots = frozen_slots(variant, reference)
        del variant

    # 2. step time at the same depth, interleaved
    variants = {}
    for wrap in ("one unit", "unit per block"):
        for frozen in (True, False):
            variant = Variant(wrap, args, depth, x, y)
            if frozen:
                variant.freeze()
            variants[f"{wrap}, {'frozen' if frozen else 'nothing frozen'}"] = variant

    def steps(variant: Variant) -> Callable[[], None]:
        return lambda: [variant.step() for _ in range(args.steps)] and None

    medians = slowest_medians({n: steps(v) for n, v in variants.items()}, args.repeats)
    per_step = {n: t / args.steps for n, t in medians.items()}

    if rank == 0:
        print(f"{args.blocks} blocks of width {args.width} ({len(layers)} layers), {world} ranks x batch "
              f"{args.batch}, {args.threads} thread(s) each, torch {torch.__version__}, gloo (CPU), "
              f"FSDP1 use_orig_params=True")
        print(f"frozen: the first {frozen_blocks} blocks (depth {depth}, --fraction {args.fraction})\n")
        print("Bytes reduce-scattered per step (counted by an FSDP communication hook):\n")
        print(table(["wrapping", "before freezing", "after freezing", "after / before",
                     "trainable share of parameter bytes"], rows))
        print(f"\none unit, rank 0: largest |gradient| at the frozen weights' offsets {slots[0]:.3g}; "
              f"largest difference from their true gradient on that rank's batch {slots[1]:.3g}")
        base = per_step["unit per block, frozen"]
        print(f"\nStep time (median of {args.repeats} interleaved rounds of {args.steps} steps; slowest rank):\n")
        print(table(["variant", "ms / step", "time / (unit per block, frozen)"],
                    [[n, f"{t * 1e3:.2f}", f"{t / base:.3f}"] for n, t in per_step.items()]))
        print(f"\nfrozen step, one unit / unit per block = {per_step['one unit, frozen'] / base:.3f}; "
              f"frozen / nothing frozen: one unit "
              f"{per_step['one unit, frozen'] / per_step['one unit, nothing frozen']:.3f}, unit per block "
              f"{base / per_step['unit per block, nothing frozen']:.3f}")
    dist.barrier()
    del variants
    gc.collect()
    dist.destroy_process_group()


def _full_params(model: nn.Module) -> list[torch.Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model):
        return [p.detach().clone() for p in model.module.parameters()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=8, help="MLP blocks (default 8)")
    parser.add_argument("--width", type=int, default=512, help="block width (default 512)")
    parser.add_argument("--fraction", type=float, default=0.5, help="share of blocks frozen (default 0.5)")
    parser.add_argument("--batch", type=int, default=64, help="examples per rank per step")
    parser.add_argument("--steps", type=int, default=4, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per variant")
    parser.add_argument("--world", type=int, default=2, help="ranks to spawn when not under torchrun")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args(argv)
    if not 0.0 < args.fraction < 1.0:
        parser.error(f"--fraction must be in (0, 1), got {args.fraction}")
    launch_ranks(run, args)


if __name__ == "__main__":
    main()
