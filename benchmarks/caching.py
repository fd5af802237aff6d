"""Frozen-prefix activation caching (``layerfreeze.cache.PrefixCache``): what it costs and saves.

Part 1, the limit: with the cache warm, a training step through ``PrefixCache``
is timed against the suffix alone trained on precomputed prefix outputs (the
hand-written limit of caching, the performance model of docs/performance.md); target ratio <= 1.10. The
same table shows freezing without the cache and no freezing, with the speedups
the performance model predicts: 3/(3-2f) without the cache, 1/(1-f) with it.

Part 2, end to end: a short fine-tuning run of the transformer encoder on fixed
token data (no augmentation) that freezes the embeddings and the first encoder
layers after a warm-up share of training (a fixed depth, the usual fine-tuning
recipe), timed without freezing, with freezing, and with freezing plus the cache;
medians of interleaved repeats.

Usage::

    python benchmarks/caching.py
    python benchmarks/caching.py --repeats 9 --examples 64 --epochs 4
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import layerfreeze as lf  # noqa: E402
from layerfreeze.bench import models as bundled  # noqa: E402
from layerfreeze.cache import PrefixCache  # noqa: E402
from _common import CLOCKS, first_forward, interleaved_medians, set_threads, table  # noqa: E402


class Stem(nn.Module):
    """Token and position embeddings of the bundled transformer, as one stage."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.embed, self.pos = model.embed, model.pos

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))


class Head(nn.Module):
    """Final norm, mean pooling and classifier, as one stage."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.norm, self.head = model.norm, model.head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden).mean(dim=1))


def stages_of(model: nn.Module) -> nn.Sequential:
    """The bundled transformer split into stages (a user-given split, shared weights)."""
    return nn.Sequential(Stem(model), *model.encoder.layers, Head(model))


def dataset(examples: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 1000, (examples, seq), generator=g)
    labels = (tokens[:, 0] % 2).long()  # a learnable rule, so losses mean something
    return tokens, labels


def depth_at_cut(layers: Sequence[lf.Layer], stages: nn.Sequential, cut: int) -> int:
    inside = {id(m) for stage in stages[:cut] for m in stage.modules()}
    return sum(1 for layer in layers if id(layer.module) in inside)


def _optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4)


def limit_table(args: argparse.Namespace) -> list[list[str]]:
    tokens, labels = dataset(args.examples, 128, args.seed)
    batches = [(tokens[i:i + args.batch], labels[i:i + args.batch], torch.arange(i, min(i + args.batch, len(tokens))))
               for i in range(0, len(tokens), args.batch)]
    torch.manual_seed(args.seed)
    base = bundled.transformer_encoder()
    rows = []
    for cut in args.cuts:
        # (1) library + cache
        model = copy.deepcopy(base)
        stages = stages_of(model)
        opt = _optimizer(model.parameters())
        freezing = lf.LayerFreezing(unit="owner").attach(model, opt, total_steps=10**9)
        first_forward(model, batches[0][0])
        freezing.set_depth(depth_at_cut(freezing.layers, stages, cut))
        cache = PrefixCache(stages, max_bytes=args.max_mib << 20)
        # (2) library without the cache
        plain = copy.deepcopy(base)
        plain_stages = stages_of(plain)
        plain_opt = _optimizer(plain.parameters())
        plain_freezing = lf.LayerFreezing(unit="owner").attach(plain, plain_opt, total_steps=10**9)
        first_forward(plain, batches[0][0])
        plain_freezing.set_depth(freezing.frozen_depth)
        # (3) the limit: the suffix alone on precomputed prefix outputs
        limit = copy.deepcopy(base)
        limit_stages = stages_of(limit)
        with torch.no_grad():
            precomputed = [limit_stages[:cut](x) for x, _, _ in batches]
        suffix = limit_stages[cut:]
        limit_opt = _optimizer(suffix.parameters())
        # (4) no freezing
        full = copy.deepcopy(base)
        full_stages = stages_of(full)
        full_opt = _optimizer(full.parameters())

        for x, _, keys in batches:  # warm the cache: one pass over the data
            cache.prefix(x, keys)
        position = {"i": 0}

        def next_batch() -> int:
            position["i"] = (position["i"] + 1) % len(batches)
            return position["i"]

        def step(run: Callable[[], torch.Tensor], y: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(run(), y).backward()
            optimizer.step()

        def cached() -> None:
            x, y, keys = batches[next_batch()]
            step(lambda: cache(x, keys), y, opt)
            freezing.step()

        def uncached() -> None:
            x, y, _ = batches[next_batch()]
            step(lambda: plain_stages(x), y, plain_opt)
            plain_freezing.step()

        def suffix_alone() -> None:
            i = next_batch()
            step(lambda: suffix(precomputed[i]), batches[i][1], limit_opt)

        def unfrozen() -> None:
            x, y, _ = batches[next_batch()]
            step(lambda: full_stages(x), y, full_opt)

        medians = interleaved_medians(
            {"cache": cached, "limit": suffix_alone, "freeze": uncached, "none": unfrozen},
            repeats=args.repeats, warmup=1, clock=args.clock,
        )
        from torch.utils.flop_counter import FlopCounterMode

        with torch.no_grad(), FlopCounterMode(display=False) as prefix_count:
            stages[:cut](batches[0][0])
        with torch.no_grad(), FlopCounterMode(display=False) as total_count:
            stages(batches[0][0])
        f = prefix_count.get_total_flops() / total_count.get_total_flops()
        rows.append([
            cut, f"{freezing.frozen_depth}/{len(freezing.layers)}", f"{f:.3f}",
            f"{medians['cache'] * 1e3:.1f}", f"{medians['limit'] * 1e3:.1f}",
            f"{medians['freeze'] * 1e3:.1f}", f"{medians['none'] * 1e3:.1f}",
            f"{medians['cache'] / medians['limit']:.3f}",
            f"{medians['none'] / medians['cache']:.2f}", f"{1 / (1 - f):.2f}",
            f"{medians['none'] / medians['freeze']:.2f}", f"{3 / (3 - 2 * f):.2f}",
        ])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    return rows


def fine_tune(args: argparse.Namespace, mode: str) -> tuple[float, float, Optional[PrefixCache]]:
    """One fine-tuning run; returns (seconds, final epoch's mean loss, cache)."""
    tokens, labels = dataset(args.examples, 128, args.seed)
    torch.manual_seed(args.seed)
    model = bundled.transformer_encoder()
    stages = stages_of(model)
    opt = _optimizer(model.parameters())
    steps_per_epoch = -(-len(tokens) // args.batch)
    total = steps_per_epoch * args.epochs
    freezing = None
    if mode != "none":
        depth = depth_at_cut(lf.definition_order(model, "owner"), stages, args.finetune_cut)
        policy = lf.policies.FixedDepth(depth, start=args.freeze_start)
        freezing = lf.LayerFreezing(policy=policy, interval="epoch", unit="owner")
        freezing.attach(model, opt, total_steps=total, steps_per_epoch=steps_per_epoch)
        first_forward(model, tokens[: args.batch])
    cache = PrefixCache(stages, max_bytes=args.max_mib << 20) if mode == "cache" else None
    order = torch.Generator().manual_seed(args.seed + 1)
    clock = CLOCKS[args.clock]
    start = clock()
    losses: list[float] = []
    for _ in range(args.epochs):
        losses = []
        for index in torch.randperm(len(tokens), generator=order).split(args.batch):
            x, y = tokens[index], labels[index]
            out = cache(x, index) if cache is not None else stages(x)
            loss = nn.functional.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if freezing is not None:
                freezing.step()
    return clock() - start, sum(losses) / len(losses), cache


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuts", type=int, nargs="+", default=[4, 6],
                        help="frozen stages (1 = embeddings, k = embeddings + k-1 encoder layers)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--freeze-start", type=float, default=0.2,
                        help="fine-tune: share of training before the prefix freezes")
    parser.add_argument("--finetune-cut", type=int, default=5,
                        help="fine-tune: stages frozen after --freeze-start (5 = embeddings + 4 layers)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--max-mib", type=int, default=1024, help="cache memory bound in MiB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finetune-repeats", type=int, default=3, help="fine-tune runs per mode (median)")
    parser.add_argument("--skip-limit", action="store_true")
    parser.add_argument("--skip-finetune", action="store_true")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.clock} time, transformer encoder "
          f"(6 layers, width 384, seq 128), batch {args.batch}, AdamW")
    if not args.skip_limit:
        rows = limit_table(args)
        print()
        print(table(["cut", "depth", "f (FLOPs)", "cache ms", "suffix alone ms", "freeze ms", "none ms",
                     "cache/limit", "none/cache", "model 1/(1-f)", "none/freeze", "model 3/(3-2f)"], rows))
        print(f"worst cache/limit = {max(float(r[7]) for r in rows):.3f} (target <= 1.10)")
    if not args.skip_finetune:
        modes = ("none", "freeze", "cache")
        samples: dict[str, list[float]] = {mode: [] for mode in modes}
        for repeat in range(args.finetune_repeats):  # interleaved, order rotating
            for mode in modes[repeat % 3:] + modes[:repeat % 3]:
                seconds, loss, cache = fine_tune(args, mode)
                samples[mode].append(seconds)
                extra = (f", cache hits {cache.hits} misses {cache.misses}, {cache.nbytes / 2**20:.1f} MiB"
                         if cache else "")
                print(f"fine-tune {mode}: {seconds:.1f} s, last-epoch loss {loss:.4f}{extra}", flush=True)
        results = {mode: statistics.median(values) for mode, values in samples.items()}
        print()
        print(table(["run", "median seconds", "speedup over no freezing"],
                    [[m, f"{s:.1f}", f"{results['none'] / s:.2f}"] for m, s in results.items()]))
        print(f"({args.examples} examples, batch {args.batch}, {args.epochs} epochs; after {args.freeze_start:g} "
              f"of training the first {args.finetune_cut} stages freeze; interval='epoch', unit='owner')")


if __name__ == "__main__":
    main()
