"""The benchmark loop behind ``layerfreeze bench``: train, time, evaluate, summarize.

Each run trains a freshly built model from seed ``s`` (same initial weights and
batch order for every variant and budget at that seed) with the task's optimizer
and learning-rate schedule, and times the training loop (attach included) with a
clock that synchronizes the device before each read. The baseline without freezing
also runs at shorter budgets (a share of the steps, its schedule compressed to
them), which trace the equal-time frontier (:mod:`layerfreeze.bench.frontier`).
Runs go variant after variant within a seed, seed after seed, so slow spells of a
shared machine fall on all variants alike; speedups compare medians.
"""

from __future__ import annotations

import gc
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import layer_flops, total_flops
from . import frontier
from .data import Dataset
from .devices import Clock, MemoryMeter, autocast
from .models import stages_of
from .resolve import ModelRef, build_for_data
from .stats import mean_ci95, median
from .tasks import OPTIMIZERS, SCHEDULES, build_optimizer, lr_multiplier
from .variants import BASELINE, Variant

__all__ = ["BenchSettings", "RunRecord", "RunSpec", "plan_runs", "run_one", "run_bench", "summarize_runs",
           "frontier_rows", "predicted_speedup"]

# on_step(run_label, step, total_steps, epoch, epochs, loss, depth, layers)
StepCallback = Callable[[str, int, int, int, int, float, int, int], None]


@dataclass(frozen=True)
class BenchSettings:
    """What every run of one bench shares."""

    epochs: int
    batch_size: int
    lr: float = 0.1
    interval: str = "epoch"
    optimizer: str = "sgd"
    schedule: str = "cosine"
    weight_decay: float = 5e-4
    warmup: float = 0.0
    device: str = "cpu"
    precision: str = "fp32"

    def steps_per_epoch(self, train_size: int) -> int:
        return math.ceil(train_size / self.batch_size)

    def total_steps(self, train_size: int, budget: float = 1.0) -> int:
        """Optimizer steps of a run given ``budget`` (a share of the full run), at least 1."""
        return max(1, round(budget * self.epochs * self.steps_per_epoch(train_size)))

    def describe_optimizer(self) -> str:
        warmup = f", {self.warmup:.0%} warm-up" if self.warmup else ""
        return (f"{OPTIMIZERS[self.optimizer][1]} weight_decay={self.weight_decay:g}, "
                f"LR {self.lr:g} peak, {SCHEDULES[self.schedule][1]}{warmup}")


@dataclass(frozen=True)
class RunSpec:
    """One run to do: a variant, a seed and a budget (share of the full run's steps)."""

    variant: Variant
    seed: int
    budget: float = 1.0

    @property
    def key(self) -> tuple[str, int, float]:
        return (self.variant.name, self.seed, self.budget)


def plan_runs(variants: Sequence[Variant], seeds: Sequence[int], budgets: Sequence[float]) -> list[RunSpec]:
    """Every run of a bench in the order it is done: seed after seed; within a seed each
    variant in turn, the baseline at each budget (largest first), the others at the full budget.

    Example:
        >>> from layerfreeze.bench.variants import get_variant
        >>> [s.key for s in plan_runs([get_variant("none"), get_variant("composer")], [0], [0.5, 1.0])]
        [('none', 0, 1.0), ('none', 0, 0.5), ('composer', 0, 1.0)]
    """
    specs = []
    for seed in seeds:
        for variant in variants:
            for budget in (sorted(budgets, reverse=True) if variant.name == BASELINE else [1.0]):
                specs.append(RunSpec(variant, seed, budget))
    return specs


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
    budget: float = 1.0
    peak_memory_bytes: Optional[int] = None
    cache_hits: Optional[int] = None
    cache_misses: Optional[int] = None
    cache_advanced: Optional[int] = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "RunRecord":
        """The inverse of :meth:`to_json`.

        Raises:
            ValueError: when fields are missing or unknown.
        """
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        if not isinstance(record, dict) or not required <= set(record) or not set(record) <= names:
            got = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"not a run record of this layerfreeze version: fields {got}")
        return cls(**record)


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


def _evaluate(model: nn.Module, data: Dataset, device: torch.device, precision: str, batch: int = 512) -> float:
    model.eval()
    correct = 0
    with torch.no_grad(), autocast(device, precision):
        for start in range(0, len(data.y_test), batch):
            logits = model(data.x_test[start:start + batch])
            correct += int((logits.argmax(1) == data.y_test[start:start + batch]).sum())
    return correct / len(data.y_test)


def _cache_for(ref: ModelRef, model: nn.Module, variant: Variant) -> Any:
    from ..cache import PrefixCache

    stages = stages_of(ref.name, model)
    if stages is None:
        raise ValueError(
            f"variant {variant.name!r} caches the frozen prefix, which needs the model as a chain of stages; "
            f"model {ref.name!r} is neither bundled nor an nn.Sequential. HINT: return an nn.Sequential from "
            "your factory, or leave this variant out")
    return PrefixCache(stages, max_bytes=2 << 30)


def run_one(ref: ModelRef, data: Dataset, variant: Variant, seed: int, settings: BenchSettings,
            on_step: Optional[StepCallback] = None, budget: float = 1.0) -> RunRecord:
    """Train one model with one variant, seed and budget; returns its record.

    ``data`` must already be on ``settings.device``.
    """
    device = torch.device(settings.device)
    clock, memory = Clock(device), MemoryMeter(device)
    torch.manual_seed(seed)
    model = build_for_data(ref, data).to(device)
    model.train()
    optimizer = build_optimizer(settings.optimizer, model.parameters(), settings.lr * variant.lr_scale,
                                settings.weight_decay)
    spe = settings.steps_per_epoch(len(data.y_train))
    total = settings.total_steps(len(data.y_train), budget)
    warmup = round(settings.warmup * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(settings.schedule, step, total, warmup))
    epochs = math.ceil(total / spe)
    generator = torch.Generator().manual_seed(seed)
    freezing = variant.build(settings.interval, total_steps=total)
    cache = _cache_for(ref, model, variant) if variant.cache and freezing is not None else None
    label = f"{variant.name} seed {seed}" + (f" budget {budget:g}" if budget != 1.0 else "")
    example = data.x_train[:8]
    depths: list[int] = []
    epoch_losses: list[float] = []
    epoch_seconds: list[float] = []
    loss_value = float("nan")

    # A sample batch only where the settings need one up front (FLOP costs, traced
    # order): counting FLOPs at attach would otherwise tax the freezing runs' clock.
    needs_example = freezing is not None and (freezing.policy.needs_costs or freezing.order == "execution")
    gc.collect()
    memory.start()
    start, cpu_start = clock.both()
    if freezing is not None:
        freezing.attach(model, optimizer, total_steps=total, steps_per_epoch=spe,
                        example_inputs=example if needs_example else None)
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(data.y_train), generator=generator)
        steps = min(spe, total - step)
        running = torch.zeros((), dtype=torch.float64, device=device)
        for index in range(steps):
            keys = order[index * settings.batch_size:(index + 1) * settings.batch_size]
            batch = keys.to(device)
            depths.append(freezing.frozen_depth if freezing is not None else 0)
            with autocast(device, settings.precision):
                # The first step runs the whole model: LayerFreezing finishes its checks on
                # the first training forward; nothing is frozen yet to cache anyway.
                logits = cache(data.x_train[batch], keys) if cache is not None and step else model(data.x_train[batch])
                loss = F.cross_entropy(logits.float(), data.y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if freezing is not None:
                freezing.step()
                if cache is not None:
                    # Frozen stages run in eval mode (no dropout), so their output is fixed and cacheable.
                    for stage in cache.stages[:cache.cut]:
                        stage.eval()
            step += 1
            running += loss.detach().double()
            if on_step is not None:
                loss_value = loss.item()
                on_step(label, step, total, epoch + 1, epochs, loss_value, depths[-1],
                        len(freezing.layers) if freezing is not None else 0)
        epoch_losses.append(running.item() / steps)
        loss_value = loss.item()
        epoch_seconds.append(clock.wall() - start - sum(epoch_seconds))
    end, cpu_end = clock.both()
    train_seconds, train_cpu_seconds = end - start, cpu_end - cpu_start
    peak = memory.peak()

    start = clock.wall()
    accuracy = _evaluate(model, data, device, settings.precision)
    eval_seconds = clock.wall() - start

    if freezing is not None:
        layers = freezing.layers
        shares = _prefix_shares(model, layers, data.x_train[:2])
        params_frozen = len({name for layer in layers[:depths[-1]] for name in layer.param_names})
        freezing.detach()
    else:
        from ..layers import definition_order

        layers, shares, params_frozen = definition_order(model), [0.0], 0
    hits = misses = advanced = None
    if cache is not None:
        hits, misses, advanced = cache.hits, cache.misses, cache.advanced
        cache.close()
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
        budget=budget, peak_memory_bytes=peak, cache_hits=hits, cache_misses=misses, cache_advanced=advanced,
    )


def warm_up(ref: ModelRef, data: Dataset, settings: BenchSettings, steps: int = 3) -> None:
    """A few untimed steps, so one-time costs (allocator, kernel selection, the FLOP
    counter's imports) fall on no run."""
    device = torch.device(settings.device)
    torch.manual_seed(0)
    model = build_for_data(ref, data).to(device)
    from ..layers import definition_order

    _prefix_shares(model, definition_order(model), data.x_train[:2])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for index in range(steps):
        batch = slice(index * settings.batch_size, (index + 1) * settings.batch_size)
        if batch.start >= len(data.y_train):
            break
        with autocast(device, settings.precision):
            loss = F.cross_entropy(model(data.x_train[batch]).float(), data.y_train[batch])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    Clock(device).wall()


def run_bench(ref: ModelRef, data: Dataset, specs: Sequence[RunSpec], settings: BenchSettings,
              on_step: Optional[StepCallback] = None, on_run: Optional[Callable[[RunRecord], None]] = None,
              done: Optional[dict[tuple[str, int, float], RunRecord]] = None) -> tuple[list[RunRecord], bool]:
    """Run ``specs`` in order (see :func:`plan_runs`), skipping those in ``done``.

    Args:
        done: finished runs by ``(variant, seed, budget)`` (from ``--resume``): kept, not rerun.
        on_run: called after each new run with its record (the CLI writes the results JSON there).

    Returns:
        ``(records, interrupted)``: the records in plan order; on Ctrl-C the runs finished so far, and True.
    """
    done = dict(done or {})
    records: list[RunRecord] = []
    device = torch.device(settings.device)
    data = data.to(device)
    try:
        if any(spec.key not in done for spec in specs):
            warm_up(ref, data, settings)
        for spec in specs:
            if spec.key in done:
                records.append(done[spec.key])
                continue
            record = run_one(ref, data, spec.variant, spec.seed, settings, on_step, budget=spec.budget)
            records.append(record)
            if on_run is not None:
                on_run(record)
    except KeyboardInterrupt:
        return records, True
    return records, False


def summarize_runs(records: Sequence[RunRecord], variant_names: Sequence[str], baseline: str = BASELINE,
                   budgets: Sequence[float] = (1.0,)) -> list[dict[str, Any]]:
    """One summary row per variant that has full-budget runs (``summary`` entries of the JSON).

    ``speedup`` is the baseline's median training wall time over the variant's (full
    budgets only); ``cpu_speedup`` the same with process CPU time, which other processes
    on a shared machine disturb less. The baseline is ``"none"`` when it ran, else the
    first variant listed. Freezing variants also get the equal-time fields of
    :func:`layerfreeze.bench.frontier.equal_time_row` (None for the baseline itself).
    """
    full = [r for r in records if r.budget == 1.0]
    by_variant = {name: [r for r in full if r.variant == name] for name in variant_names}
    by_variant = {name: runs for name, runs in by_variant.items() if runs}
    if not by_variant:
        return []
    reference = baseline if baseline in by_variant else next(iter(by_variant))
    base_time = median([r.train_seconds for r in by_variant[reference]])
    base_cpu = median([r.train_cpu_seconds for r in by_variant[reference]])
    rows = []
    for name, runs in by_variant.items():
        time_median = median([r.train_seconds for r in runs])
        cpu_median = median([r.train_cpu_seconds for r in runs])
        accuracy, half = mean_ci95([r.test_accuracy for r in runs])
        memory = [r.peak_memory_bytes for r in runs if r.peak_memory_bytes is not None]
        row = {
            "variant": name,
            "runs": len(runs),
            "baseline": reference,
            "median_train_seconds": time_median,
            "speedup": base_time / time_median,
            "median_train_cpu_seconds": cpu_median,
            "cpu_speedup": base_cpu / cpu_median,
            "accuracy_mean": accuracy,
            "accuracy_ci95": half,
            "frozen_layer_share_end": median([r.frozen_layer_share_end for r in runs]),
            "frozen_flops_share_end": median([r.frozen_flops_share_end for r in runs]),
            "predicted_speedup": median([r.predicted_speedup for r in runs]),
            "median_peak_memory_bytes": median(memory) if memory else None,
        }
        if name == baseline:
            row.update({"equal_time_delta": None, "equal_time_ci95": None, "equal_time_runs": 0,
                        "frontier_side": None, "verdict": None})
        else:
            row.update(frontier.equal_time_row(runs, records, baseline, budgets))
        rows.append(row)
    return rows


def frontier_rows(records: Sequence[RunRecord], baseline: str = BASELINE) -> list[dict[str, Any]]:
    """The baseline's runs per budget (``frontier`` entries of the JSON), smallest budget first."""
    runs = [r for r in records if r.variant == baseline]
    rows = []
    for budget in sorted({r.budget for r in runs}):
        at = [r for r in runs if r.budget == budget]
        accuracy, half = mean_ci95([r.test_accuracy for r in at])
        rows.append({
            "budget": budget,
            "runs": len(at),
            "steps": median([r.steps for r in at]),
            "median_train_seconds": median([r.train_seconds for r in at]),
            "accuracy_mean": accuracy,
            "accuracy_ci95": half,
        })
    return rows
