"""The benchmark loop behind ``layerfreeze bench``: train, time, evaluate, summarize.

Each run trains a freshly built model from seed ``s`` (same initial weights and
batch order for every variant at that seed) with SGD (momentum 0.9, Nesterov,
weight decay 5e-4) and a cosine learning rate, and times the training loop
(attach included) with ``time.perf_counter``. Runs go variant after variant
within a seed, seed after seed, so slow spells of a shared machine fall on all
variants alike; speedups compare medians.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import layer_flops, total_flops
from .data import Dataset
from .resolve import ModelRef, build_for_data
from .stats import mean_ci95, median
from .variants import Variant

__all__ = ["BenchSettings", "RunRecord", "run_one", "run_bench", "summarize_runs", "predicted_speedup"]

# on_step(run_label, step, total_steps, epoch, epochs, loss, depth, layers)
StepCallback = Callable[[str, int, int, int, int, float, int, int], None]


@dataclass(frozen=True)
class BenchSettings:
    """What every run of one bench shares."""

    epochs: int
    batch_size: int
    lr: float = 0.1
    interval: str = "epoch"
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def steps_per_epoch(self, train_size: int) -> int:
        return math.ceil(train_size / self.batch_size)


@dataclass
class RunRecord:
    """One training run, as written to the results JSON (``runs`` entries)."""

    variant: str
    seed: int
    train_seconds: float
    train_cpu_seconds: float
    eval_seconds: float
    test_accuracy: float
    final_train_loss: float
    epoch_train_loss: list[float]
    epoch_seconds: list[float]
    steps: int
    layers: int
    frozen_depth_end: int
    frozen_layer_share_end: float
    frozen_flops_share_end: float
    params_frozen_end: int
    depth_changes: list[list[int]] = field(default_factory=list)
    predicted_speedup: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def predicted_speedup(depth_per_step: Sequence[int], prefix_share: Sequence[float]) -> float:
    """Run-average speedup from the performance model of docs/performance.md: a step with a frozen prefix holding
    a share ``f`` of forward FLOPs costs ``1 + 2(1 - f)`` forward passes instead of 3.

    ``prefix_share[d]`` is the share frozen at depth ``d``.

    Example:
        >>> predicted_speedup([0, 1], [0.0, 0.5])
        1.2
    """
    if not depth_per_step:
        return 1.0
    cost = sum(1.0 + 2.0 * (1.0 - prefix_share[d]) for d in depth_per_step)
    return round(3.0 * len(depth_per_step) / cost, 12)


def _prefix_shares(model: nn.Module, layers: Sequence[Any], example: torch.Tensor) -> list[float]:
    run = lambda m: m(example)  # noqa: E731
    flops = layer_flops(model, layers, run)
    total = total_flops(model, run) or 1
    shares, spent = [0.0], 0
    for count in flops:
        spent += count
        shares.append(spent / total)
    return shares


def _compress(depths: Sequence[int]) -> list[list[int]]:
    # [[first step (1-based) run at this depth, depth], ...]
    out: list[list[int]] = []
    for step, depth in enumerate(depths, start=1):
        if not out or out[-1][1] != depth:
            out.append([step, depth])
    return out


def _evaluate(model: nn.Module, data: Dataset, batch: int = 512) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data.y_test), batch):
            logits = model(data.x_test[start:start + batch])
            correct += int((logits.argmax(1) == data.y_test[start:start + batch]).sum())
    return correct / len(data.y_test)


def run_one(ref: ModelRef, data: Dataset, variant: Variant, seed: int, settings: BenchSettings,
            on_step: Optional[StepCallback] = None) -> RunRecord:
    """Train one model with one variant and seed; returns its record."""
    torch.manual_seed(seed)
    model = build_for_data(ref, data)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                nesterov=True, weight_decay=settings.weight_decay)
    spe = settings.steps_per_epoch(len(data.y_train))
    total = settings.epochs * spe
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)))
    generator = torch.Generator().manual_seed(seed)
    freezing = variant.build(settings.interval)
    label = f"{variant.name} seed {seed}"
    example = data.x_train[:8]
    depths: list[int] = []
    epoch_losses: list[float] = []
    epoch_seconds: list[float] = []
    loss_value = float("nan")

    # A sample batch only where the settings need one up front (FLOP costs, traced
    # order): counting FLOPs at attach would otherwise tax the freezing runs' clock.
    needs_example = freezing is not None and (freezing.policy.needs_costs or freezing.order == "execution")
    start, cpu_start = time.perf_counter(), time.process_time()
    if freezing is not None:
        freezing.attach(model, optimizer, total_steps=total, steps_per_epoch=spe,
                        example_inputs=example if needs_example else None)
    step = 0
    for epoch in range(settings.epochs):
        order = torch.randperm(len(data.y_train), generator=generator)
        running = 0.0
        for index in range(spe):
            batch = order[index * settings.batch_size:(index + 1) * settings.batch_size]
            depths.append(freezing.frozen_depth if freezing is not None else 0)
            loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if freezing is not None:
                freezing.step()
            step += 1
            loss_value = loss.item()
            running += loss_value
            if on_step is not None:
                on_step(label, step, total, epoch + 1, settings.epochs, loss_value, depths[-1],
                        len(freezing.layers) if freezing is not None else 0)
        epoch_losses.append(running / spe)
        epoch_seconds.append(time.perf_counter() - start - sum(epoch_seconds))
    train_seconds = time.perf_counter() - start
    train_cpu_seconds = time.process_time() - cpu_start

    start = time.perf_counter()
    accuracy = _evaluate(model, data)
    eval_seconds = time.perf_counter() - start

    if freezing is not None:
        layers = freezing.layers
        shares = _prefix_shares(model, layers, data.x_train[:2])
        params_frozen = len({name for layer in layers[:depths[-1]] for name in layer.param_names})
        freezing.detach()
    else:
        from ..layers import definition_order

        layers, shares, params_frozen = definition_order(model), [0.0], 0
    end_depth = depths[-1] if depths else 0
    return RunRecord(
        variant=variant.name, seed=seed, train_seconds=train_seconds, train_cpu_seconds=train_cpu_seconds,
        eval_seconds=eval_seconds,
        test_accuracy=accuracy, final_train_loss=loss_value, epoch_train_loss=epoch_losses,
        epoch_seconds=epoch_seconds, steps=step,
        layers=len(layers), frozen_depth_end=end_depth,
        frozen_layer_share_end=end_depth / len(layers) if layers else 0.0,
        frozen_flops_share_end=shares[end_depth] if end_depth < len(shares) else 0.0,
        params_frozen_end=params_frozen, depth_changes=_compress(depths),
        predicted_speedup=predicted_speedup(depths, shares) if freezing is not None else 1.0,
    )


def warm_up(ref: ModelRef, data: Dataset, settings: BenchSettings, steps: int = 3) -> None:
    """A few untimed steps, so one-time costs (allocator, kernel selection, the FLOP
    counter's imports) fall on no run."""
    torch.manual_seed(0)
    model = build_for_data(ref, data)
    from ..layers import definition_order

    _prefix_shares(model, definition_order(model), data.x_train[:2])
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr)
    for index in range(steps):
        batch = slice(index * settings.batch_size, (index + 1) * settings.batch_size)
        if batch.start >= len(data.y_train):
            break
        F.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def run_bench(ref: ModelRef, data: Dataset, variants: Sequence[Variant], seeds: Sequence[int],
              settings: BenchSettings, on_step: Optional[StepCallback] = None,
              on_run: Optional[Callable[[RunRecord], None]] = None) -> tuple[list[RunRecord], bool]:
    """All runs, interleaved: for each seed, each variant in turn.

    Returns:
        ``(records, interrupted)``: on Ctrl-C the runs finished so far, and True.
    """
    records: list[RunRecord] = []
    try:
        warm_up(ref, data, settings)
        for seed in seeds:
            for variant in variants:
                record = run_one(ref, data, variant, seed, settings, on_step)
                records.append(record)
                if on_run is not None:
                    on_run(record)
    except KeyboardInterrupt:
        return records, True
    return records, False


def summarize_runs(records: Sequence[RunRecord], variant_names: Sequence[str],
                   baseline: str = "none") -> list[dict[str, Any]]:
    """One summary row per variant that has runs (``summary`` entries of the JSON).

    ``speedup`` is the baseline's median training wall time over the variant's;
    ``cpu_speedup`` the same with process CPU time, which other processes on a shared
    machine disturb less. The baseline is ``"none"`` when it ran, else the first
    variant listed.
    """
    by_variant = {name: [r for r in records if r.variant == name] for name in variant_names}
    by_variant = {name: runs for name, runs in by_variant.items() if runs}
    if not by_variant:
        return []
    if baseline not in by_variant:
        baseline = next(iter(by_variant))
    base_time = median([r.train_seconds for r in by_variant[baseline]])
    base_cpu = median([r.train_cpu_seconds for r in by_variant[baseline]])
    rows = []
    for name, runs in by_variant.items():
        time_median = median([r.train_seconds for r in runs])
        cpu_median = median([r.train_cpu_seconds for r in runs])
        accuracy, half = mean_ci95([r.test_accuracy for r in runs])
        rows.append({
            "variant": name,
            "runs": len(runs),
            "baseline": baseline,
            "median_train_seconds": time_median,
            "speedup": base_time / time_median,
            "median_train_cpu_seconds": cpu_median,
            "cpu_speedup": base_cpu / cpu_median,
            "accuracy_mean": accuracy,
            "accuracy_ci95": half,
            "frozen_layer_share_end": median([r.frozen_layer_share_end for r in runs]),
            "frozen_flops_share_end": median([r.frozen_flops_share_end for r in runs]),
            "predicted_speedup": median([r.predicted_speedup for r in runs]),
        })
    return rows
