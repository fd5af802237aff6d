"""Bookkeeping cost of the library itself, on a model with many layers.

Targets (issue "Performance"): a freeze change on a model with 1,000 layers costs
under 10 ms; a ``step()`` that changes nothing costs under 50 microseconds.
Medians over repeats; no training compute is timed, only the library's calls.

Usage::

    python benchmarks/overhead.py
    python benchmarks/overhead.py --layers 1000 --repeats 9 --optimizer adam
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import layerfreeze as lf  # noqa: E402
from _common import first_forward, set_threads, table  # noqa: E402


def build(layers: int, optimizer: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(layers)])
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # One real step, so every parameter has optimizer state to delete on freezing.
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, opt


def per_call(fn: Callable[[], object], calls: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean seconds per call over ``calls`` calls."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def median_of(samples: Sequence[float]) -> float:
    return statistics.median(samples)


def change_costs(args: argparse.Namespace) -> list[list[str]]:
    rows = []
    model, opt = build(args.layers, args.optimizer)
    freezing = lf.LayerFreezing().attach(model, opt, total_steps=10**9)
    first_forward(model, torch.randn(2, 4))
    last = args.layers - 1

    def timed(depth: int) -> float:
        start = time.perf_counter()
        freezing.set_depth(depth)
        return time.perf_counter() - start

    for _ in range(1):  # untimed warm-up through every path
        timed(1), timed(last), timed(0)
    one_up = [timed(d) for d in range(1, last + 1)]  # each freezes one more layer
    one_down = [timed(d) for d in range(last - 1, -1, -1)]  # each unfreezes one layer
    all_up, all_down = [], []
    for _ in range(args.repeats):
        all_up.append(timed(last))
        all_down.append(timed(0))
    for name, samples in (("freeze one more layer", one_up), ("unfreeze one layer", one_down),
                          (f"freeze 0 -> {last} layers", all_up), (f"unfreeze {last} -> 0 layers", all_down)):
        rows.append([name, f"{median_of(samples) * 1e3:.3f}", f"{max(samples) * 1e3:.3f}", len(samples)])
    return rows


def step_costs(args: argparse.Namespace) -> list[list[str]]:
    rows = []
    configs = [
        ("interval='epoch' (counts only)", dict(interval="epoch"), None),
        ("interval='step', before freeze_start", dict(interval="step", freeze_start=0.9), None),
        ("interval='step', holding depth", dict(interval="step", freeze_start=0.0), args.layers // 2),
        ("interval='step', holding depth, log_fn", dict(interval="step", freeze_start=0.0, log_fn=lambda m: None),
         args.layers // 2),
    ]
    for name, options, hold in configs:
        model, opt = build(args.layers, args.optimizer)
        total = 10**9
        freezing = lf.LayerFreezing(**options).attach(model, opt, total_steps=total)
        first_forward(model, torch.randn(2, 4))
        if hold is not None:
            # Start where the schedule asks for `hold` layers, with many steps before it asks for more.
            steps = int(hold / (args.layers - 1) * total) + 1
            freezing._step = steps
            freezing.set_depth(hold)
        depth = freezing.frozen_depth
        cost = per_call(freezing.step, args.calls, args.repeats)
        if freezing.frozen_depth != depth:
            raise RuntimeError(f"{name}: the depth changed during the no-op steps")
        rows.append([name, f"{cost * 1e6:.2f}", depth])
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=1000)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--calls", type=int, default=2000, help="step() calls per timed repeat")
    args = parser.parse_args(argv)
    set_threads(1)
    print(f"torch {torch.__version__}; nn.Sequential of {args.layers} Linear(4, 4) layers, "
          f"{args.optimizer} with state for every parameter; wall time, medians")
    changes = change_costs(args)
    print(table(["freeze change", "median ms", "max ms", "samples"], changes))
    worst_change = max(float(r[1]) for r in changes)
    print(f"worst median change in a running training = {worst_change:.3f} ms (target < 10 ms)\n")
    steps = step_costs(args)
    print(table(["step() that changes nothing", "median us per call", "frozen depth"], steps))
    print(f"worst = {max(float(r[1]) for r in steps):.2f} us (target < 50 us)")


if __name__ == "__main__":
    main()
