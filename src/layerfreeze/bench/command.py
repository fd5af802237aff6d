"""``layerfreeze bench``: from parsed arguments to runs, table, JSON and plot.

The argument parser and the error handling live in :mod:`layerfreeze.cli`; this
module turns the options (and the task's presets) into a bench, runs it with a
progress display, saves the results JSON after every run, resumes one, and prints
the table and the notes that qualify it.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any, Callable, Optional, Sequence

import torch

from ..cli import UsageError, _check_writable_dir, _console, _default_threads
from . import report
from .data import load_data
from .devices import MemoryMeter, device_environment, resolve_device
from .harness import BenchSettings, RunRecord, frontier_rows, plan_runs, run_bench, summarize_runs
from .resolve import build_for_data, parse_dtype, parse_shape, resolve_model
from .tasks import get_task
from .variants import BASELINE, VARIANTS, parse_variants

__all__ = ["run_bench_command"]

log = logging.getLogger("layerfreeze")


def _other_busy_cpus() -> Optional[int]:
    """CPUs kept busy by other processes right now (Linux), from /proc/loadavg's
    runnable count (median of a few samples, less this process); None elsewhere."""
    samples = []
    try:
        for _ in range(5):
            with open("/proc/loadavg", encoding="ascii") as handle:
                samples.append(int(handle.read().split()[3].split("/")[0]))
            time.sleep(0.05)
    except (OSError, ValueError, IndexError):
        return None
    return max(0, sorted(samples)[len(samples) // 2] - 1)


def _bench_threads() -> tuple[int, Optional[str]]:
    """Default threads for the bench: min(2, cpus), fewer when other work holds the CPUs.

    Oversubscribed intra-op threads wait on each other: on a 2-core machine with two
    other busy processes, 2 torch threads ran resnet20 about 4x slower than 1.
    """
    cpus = os.cpu_count() or 1
    threads = _default_threads()
    busy = _other_busy_cpus()
    if busy is None or cpus - busy >= threads:
        return threads, None
    reduced = max(1, cpus - busy)
    return reduced, (f"using {reduced} thread(s): {busy} other process(es) are running on {cpus} CPU(s), so "
                     f"timings will be noisy. HINT: run on an idle machine, or pass --threads {threads} to insist")


def _parse_budgets(text: str) -> list[float]:
    budgets = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            value = float("nan")
        if not 0.0 < value <= 1.0:
            raise UsageError(f"--budgets must be numbers in (0, 1] separated by commas, got {text!r}")
        budgets.append(value)
    if 1.0 not in budgets:
        budgets.append(1.0)  # the full run: the baseline every speedup is measured against
    return sorted(set(budgets))


def run_bench_command(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> int:
    """``layerfreeze bench`` with parsed arguments; returns the exit code.

    Raises:
        UsageError, ValueError, RuntimeError: bad input, printed by :func:`layerfreeze.cli.main` as one line.
    """
    if args.list_variants:
        console = _console()
        width = max(len(name) for name in VARIANTS)
        for variant in VARIANTS.values():
            console.print(f"{variant.name:{width}s} {variant.description}")
        return 0

    task = get_task(args.task)
    model_name = args.model or task.model
    data_name = args.data or task.data
    epochs = args.epochs or (task.quick_epochs if args.quick else task.epochs)
    seeds = list(range(args.seeds or (1 if args.quick else task.seeds)))
    budgets = _parse_budgets(args.budgets)
    batch_size = args.batch_size or task.batch_size
    interval = args.interval or task.interval
    lr = args.lr or task.lr
    variants = parse_variants(args.variants)
    device = resolve_device(args.device)
    ref = resolve_model(model_name)
    shape = parse_shape(args.input_shape)
    dtype = parse_dtype(args.input_dtype)
    if data_name != "synthetic" and (shape is not None or dtype is not None):
        raise UsageError("--input-shape / --input-dtype apply to --data synthetic only; other data sets fix the shape")
    if data_name == "synthetic" and shape is None:
        if ref.spec is None:
            raise UsageError(f"--data synthetic with your own model {model_name!r} needs --input-shape (e.g. 3,32,32)")
        shape = ref.spec.input_shape
    if dtype is None:
        dtype = ref.spec.input_dtype if ref.spec is not None else torch.float32
    _check_writable_dir(args.output_dir, "--output-dir")
    json_path = os.path.join(args.output_dir, "bench.json")
    png_path = os.path.join(args.output_dir, "bench.png")
    previous = report.read_previous(json_path) if args.resume else None

    threads, threads_note = (args.threads, None) if args.threads else _bench_threads()
    if previous is not None and not args.threads:
        threads, threads_note = previous["config"].get("threads", threads), None  # the resumed bench's, for equal timings
    torch.set_num_threads(threads)
    data = load_data(data_name, shape or (3, 32, 32), dtype, args.train_size, args.test_size)
    build_for_data(ref, data)  # a model that cannot take this data fails here, before any run
    settings = BenchSettings(epochs=epochs, batch_size=batch_size, lr=lr, interval=interval,
                             optimizer=task.optimizer, schedule=task.schedule, weight_decay=task.weight_decay,
                             warmup=task.warmup, device=str(device), precision=args.precision)
    spe = settings.steps_per_epoch(len(data.y_train))
    config = {
        "task": task.name,
        "model": model_name,
        "epochs": epochs,
        "batch_size": batch_size,
        "steps_per_epoch": spe,
        "total_steps": spe * epochs,
        "budgets": budgets,
        "seeds": seeds,
        "interval": interval,
        "lr": lr,
        "optimizer": settings.describe_optimizer(),
        "device": str(device),
        "precision": args.precision,
        "threads": threads,
        "quick": bool(args.quick),
        "data": data.describe(),
        "variants": [{"name": v.name, "description": v.description, "lr_scale": v.lr_scale} for v in variants],
    }
    specs = plan_runs(variants, seeds, budgets)
    done: dict = {}
    if previous is not None:
        report.check_resumable(previous, config, json_path)
        wanted = {spec.key for spec in specs}
        for run in previous["runs"]:
            record = RunRecord.from_json(run)
            key = (record.variant, record.seed, record.budget)
            if key in wanted:
                done[key] = record
    meter = MemoryMeter(device).kind
    environment = {**device_environment(device, args.precision), "peak_memory": meter}
    title = (f"{task.name}: {model_name} on {data.name} ({len(data.y_train)} train / {len(data.y_test)} test), "
             f"{epochs} epochs x {spe} steps, batch {batch_size}, {len(seeds)} seed(s), baseline budgets "
             f"{','.join(f'{b:g}' for b in budgets)}, {device.type}"
             f"{' ' + environment['gpu'] if environment['gpu'] else f', {threads} thread(s)'}, {args.precision}, "
             f"interval={interval}")

    console = _console()
    err = _console(stderr=True)
    notes = _NoteCollector()
    log.addHandler(notes)
    err.print(f"layerfreeze bench: {title}", soft_wrap=True)
    if threads_note:
        err.print(f"  note: {threads_note}", soft_wrap=True)
    todo = [spec for spec in specs if spec.key not in done]
    resumed = f"; {len(done)} kept from {json_path}" if previous is not None else ""
    err.print(f"  {len(todo)} runs to do ({', '.join(v.name for v in variants)}{resumed}), interleaved across seeds; "
              "results saved after every run; Ctrl-C stops and keeps the finished runs", soft_wrap=True)

    order = {spec.key: index for index, spec in enumerate(specs)}
    finished: dict = dict(done)

    def document(interrupted: bool) -> dict:
        records = sorted(finished.values(), key=lambda r: order[(r.variant, r.seed, r.budget)])
        summary = summarize_runs(records, [v.name for v in variants], BASELINE, budgets)
        return report.results_document(config, records, summary, frontier_rows(records, BASELINE), environment,
                                       threads, interrupted, argv)

    def save(record: Any) -> None:
        finished[(record.variant, record.seed, record.budget)] = record
        report.write_json(document(interrupted=len(finished) < len(specs)), json_path)

    try:
        records, interrupted = _run_with_progress(err, args.no_progress, ref, data, specs, settings, done,
                                                  run_bench, save)
    finally:
        log.removeHandler(notes)

    result = document(interrupted)
    report.write_json(result, json_path)
    summary = result["summary"]
    if summary:
        console.print(report.render_table(summary, result["frontier"], title))
        report.plot_runs(records, summary, png_path, title, BASELINE)
        console.print(f"results: {json_path}\nplot:    {png_path}")
    else:
        console.print(f"no run finished; results: {json_path}")
    for message in notes.messages + report.timing_notes(summary, len(seeds)):
        err.print(f"note: {message}", soft_wrap=True)
    if interrupted:
        err.print(f"layerfreeze bench: interrupted after {len(records)} finished run(s); their results are saved "
                  f"(--resume continues)")
        return 130
    return 0


class _NoteCollector(logging.Handler):
    """Collects layerfreeze's warnings during the bench, once each, to show after the table."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage().removeprefix("layerfreeze: ")
        if message not in self.messages:
            self.messages.append(message)


def _run_with_progress(err: Any, quiet: bool, ref: Any, data: Any, specs: Any, settings: Any, done: Any,
                       run_bench: Any, save: Callable[[Any], None]) -> tuple[list, bool]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    todo = [spec for spec in specs if spec.key not in done]
    finished: list[Any] = []

    def line(record: Any) -> str:
        save(record)
        finished.append(record)
        budget = f" budget {record.budget:g}" if record.budget != 1.0 else ""
        memory = "" if record.peak_memory_bytes is None else f", peak memory {record.peak_memory_bytes / 2**20:.0f} MiB"
        return (f"  run {len(finished)}/{len(todo)} {record.variant} seed {record.seed}{budget}: "
                f"{record.train_seconds:.1f} s, test accuracy {100 * record.test_accuracy:.1f}%, "
                f"frozen at end {record.frozen_depth_end}/{record.layers} layers{memory}")

    if quiet or not err.is_terminal:
        # No live display (not a terminal, or asked for none): one line a finished run.
        return run_bench(ref, data, specs, settings, done=done,
                         on_run=lambda r: err.print(line(r), soft_wrap=True))

    progress = Progress(
        TextColumn("{task.description:<26}"), BarColumn(bar_width=24), MofNCompleteColumn(),
        TextColumn("epoch {task.fields[epoch]}"), TextColumn("loss {task.fields[loss]}"),
        TextColumn("frozen {task.fields[depth]}"), TimeElapsedColumn(),
        console=err, transient=False,
    )
    train_size = len(data.y_train)
    with progress:
        overall = progress.add_task("all runs", total=sum(settings.total_steps(train_size, s.budget) for s in todo),
                                    epoch="-", loss="-", depth="-")
        current = progress.add_task("starting", total=1, epoch="-", loss="-", depth="-")

        def on_step(label: str, step: int, total: int, epoch: int, epochs: int, loss: float, depth: int,
                    layers: int) -> None:
            progress.update(current, description=label, completed=step, total=total, epoch=f"{epoch}/{epochs}",
                            loss=f"{loss:.3f}", depth=f"{depth}/{layers}" if layers else "-")
            progress.advance(overall)

        return run_bench(ref, data, specs, settings, on_step=on_step, done=done,
                         on_run=lambda r: progress.console.print(line(r)))
