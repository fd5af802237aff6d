"""What the adaptive policies cost per training step, against plain training.

Times, interleaved in one run (medians over rounds, CPU time by default), blocks of
``--steps`` training steps of the same model under:

* ``plain``: no LayerFreezing at all;
* ``linear``: LayerFreezing with the default Linear policy, ``freeze_start=0.99``
  of a run far longer than the benchmark: the cost of ``freezing.step()`` itself;
* ``gradient``: ``GradientChange(every=50, percentile=0)``: every gradient norm is
  measured and every window evaluated, but percentile 0 freezes nothing, so the
  same work is timed in every round;
* ``convergence``: ``Convergence(every=100)`` with a threshold no layer reaches:
  one probe forward every 100 steps, amortised over the block;
* ``freezeout``: ``FreezeOut(t0=1.0)`` over a run far longer than the benchmark:
  per-layer param groups and the learning-rate hooks, nothing frozen.

Nothing freezes in any variant, so every ratio is pure overhead. Prints each
variant's median block time over ``plain``'s (issue 7's target for ``gradient``:
under 1.02). Keep ``--steps`` a multiple of 100 so each block holds whole windows.

Usage::

    python benchmarks/policy_overhead.py                        # resnet20 and mlp
    python benchmarks/policy_overhead.py --models mlp --repeats 9 --steps 200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import layerfreeze as lf  # noqa: E402
from layerfreeze.bench import models as bundled  # noqa: E402
from layerfreeze.policies import Convergence, FreezeOut, GradientChange  # noqa: E402
from _common import interleaved_medians, set_threads, table  # noqa: E402

NEVER = 10**9  # total_steps far beyond the benchmark: schedules never reach their end

POLICIES: dict[str, Callable[[], Optional[lf.LayerFreezing]]] = {
    "plain": lambda: None,
    "linear": lambda: lf.LayerFreezing(freeze_start=0.99, interval="step"),
    "gradient": lambda: lf.LayerFreezing(policy=GradientChange(every=50, percentile=0.0), interval="step"),
    "convergence": lambda: lf.LayerFreezing(policy=Convergence(threshold=1.0, every=100), interval="step"),
    "freezeout": lambda: lf.LayerFreezing(policy=FreezeOut(t0=1.0), interval="step"),
}

SETUPS = {
    # model name -> (bundled factory kwargs, batch size, input shape)
    "resnet20": ({}, 16, (3, 32, 32)),
    "mlp": ({}, 64, (1, 32, 32)),
    "transformer": ({"width": 128, "depth": 4, "heads": 4, "seq_len": 64}, 16, (64,)),
}


def make_runner(model_name: str, policy: str, steps: int, seed: int = 0) -> Callable[[], None]:
    kwargs, batch, shape = SETUPS[model_name]
    torch.manual_seed(seed)
    model = bundled.get_model(model_name).factory(**kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    freezing = POLICIES[policy]()
    if freezing is not None:
        freezing.attach(model, opt, total_steps=NEVER)
    gen = torch.Generator().manual_seed(seed)
    if bundled.get_model(model_name).input_dtype == torch.long:
        data = [torch.randint(0, 1000, (batch, *shape), generator=gen) for _ in range(4)]
    else:
        data = [torch.randn(batch, *shape, generator=gen) for _ in range(4)]
    targets = [torch.randint(0, 2, (batch,), generator=gen) for _ in range(4)]
    loss_fn = nn.CrossEntropyLoss()

    def run() -> None:
        for i in range(steps):
            loss_fn(model(data[i % 4]), targets[i % 4]).backward()
            opt.step()
            opt.zero_grad()
            if freezing is not None:
                freezing.step()
        if freezing is not None and freezing.frozen_depth:
            raise RuntimeError(f"{policy} froze layers; the benchmark measures overhead only")

    return run


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet20,mlp", help=f"comma-separated: {', '.join(SETUPS)}")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated; 'plain' is always run")
    parser.add_argument("--steps", type=int, default=100, help="training steps per timed block (default 100)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    policies = ["plain"] + [p for p in args.policies.split(",") if p and p != "plain"]
    for name in policies:
        if name not in POLICIES:
            parser.error(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    print(f"{args.steps} steps per block, median of {args.repeats} interleaved rounds, "
          f"{args.clock} clock, {args.threads} thread(s), torch {torch.__version__}")
    print(table(["model", "policy", "ms / step", "time / plain"], []), flush=True)
    for model_name in args.models.split(","):
        if model_name not in SETUPS:
            parser.error(f"unknown model {model_name!r}; choose from {', '.join(SETUPS)}")
        runners = {p: make_runner(model_name, p, args.steps) for p in policies}
        medians = interleaved_medians(runners, args.repeats, warmup=1, clock=args.clock)
        base = medians["plain"]
        for p in policies:  # row by row, so a long run shows results as they come
            print(f"| {model_name} | {p} | {1e3 * medians[p] / args.steps:.3f} | {medians[p] / base:.3f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
