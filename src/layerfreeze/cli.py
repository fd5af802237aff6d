"""The ``layerfreeze`` command: ``plan`` previews what freezes when, ``bench`` measures it.

``layerfreeze bench`` with no arguments is the main job: it trains the bundled
ResNet-20 on scikit-learn's digits with and without layer freezing, several seeds
each, and reports speed and accuracy side by side (table, JSON, PNG).
``layerfreeze plan MODEL`` shows, without training, which layer freezes at which
step and the compute that saves.

Exit codes: 0 done; 2 bad input (one line on stderr); 130 interrupted by Ctrl-C
(the bench still writes the runs finished so far).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

__all__ = ["main", "build_parser"]

log = logging.getLogger("layerfreeze")

#: What ``--quick`` changes, unless given explicitly.
QUICK = {"epochs": 3, "seeds": 1}  # 3 epochs: the composer variant freezes once, after epoch 2
#: The full default: resnet20 on digits, 5 epochs, 3 seeds (about 6-10 minutes on 2 cores).
DEFAULTS = {"epochs": 5, "seeds": 3}


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


def _checked(convert: Callable[[str], Any], accept: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse ``type`` that converts a value and accepts it only when ``accept`` says so."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a positive number")
_unit_float = _checked(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


def _default_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``layerfreeze`` and its subcommands."""
    from .bench.models import MODELS
    from .bench.variants import DEFAULT_VARIANTS

    parser = argparse.ArgumentParser(
        prog="layerfreeze",
        description="Progressive layer freezing for PyTorch: preview a schedule (plan) or measure it (bench).",
    )
    commands = parser.add_subparsers(dest="command", metavar="{bench,plan}")
    commands.required = True
    bundled = ", ".join(MODELS)

    bench = commands.add_parser(
        "bench", help="train with and without freezing; report speed and accuracy (the main job)",
        description=(
            "Train a bundled model on a bundled real dataset without freezing and with layer freezing, "
            "several seeds each, runs interleaved; print a table (median wall time, speedup, test accuracy "
            "with 95%% CI, share frozen at the end) and write bench.json and bench.png. With no options: "
            f"resnet20 on scikit-learn digits (32x32), {DEFAULTS['epochs']} epochs, {DEFAULTS['seeds']} seeds, "
            f"variants {','.join(DEFAULT_VARIANTS)}."
        ),
    )
    bench.add_argument("--model", default="resnet20", help=f"bundled model ({bundled}) or package.module:factory "
                       "(called with no arguments). Default: resnet20")
    bench.add_argument("--data", default="digits", help="digits (scikit-learn, 1,797 real images), synthetic, or "
                       "an image folder PATH with one subfolder per class (needs torchvision). Default: digits")
    bench.add_argument("--epochs", type=_positive_int, help=f"epochs per run (default {DEFAULTS['epochs']}; "
                       f"--quick: {QUICK['epochs']})")
    bench.add_argument("--batch-size", type=_positive_int, default=128, help="batch size (default 128)")
    bench.add_argument("--seeds", type=_positive_int, help=f"number of seeds, 0..N-1 (default {DEFAULTS['seeds']}; "
                       f"--quick: {QUICK['seeds']})")
    bench.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                       help=f"comma-separated variants (default {','.join(DEFAULT_VARIANTS)}; see --list-variants)")
    bench.add_argument("--interval", choices=("epoch", "step"), default="epoch",
                       help="when freezing decisions are made (default epoch, as Composer)")
    bench.add_argument("--lr", type=_positive_float, default=0.1, help="peak SGD learning rate, cosine decay (default 0.1)")
    bench.add_argument("--output-dir", default="layerfreeze-bench",
                       help="where bench.json and bench.png go (default ./layerfreeze-bench)")
    bench.add_argument("--threads", type=_positive_int, default=None,
                       help=f"torch CPU threads (default min(2, cpus) = {_default_threads()}, fewer while other "
                       "processes keep the CPUs busy)")
    bench.add_argument("--input-shape", help="per-example input shape for --data synthetic with your own model, "
                       "e.g. 3,32,32")
    bench.add_argument("--input-dtype", help="input dtype for --data synthetic with your own model (float32, long, ...)")
    bench.add_argument("--quick", action="store_true",
                       help=f"a short check: {QUICK['epochs']} epochs, {QUICK['seeds']} seed (under 2 minutes on 2 cores)")
    bench.add_argument("--list-variants", action="store_true", help="list the registered variants and exit")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar (one line per finished run)")

    plan = commands.add_parser(
        "plan", help="preview which layer freezes when, and the compute it saves",
        description=(
            "Print the layers of MODEL in freeze order (parameters, share of forward FLOPs, the step after "
            "which each freezes) and the predicted compute saving over the run, counting a step as "
            "1 + 2(1 - f) forward passes with f the frozen share of forward FLOPs."
        ),
    )
    plan.add_argument("model", metavar="MODEL", help=f"bundled model ({bundled}) or package.module:factory")
    plan.add_argument("--freeze-start", type=_unit_float, default=0.5, help="fraction of training before freezing (default 0.5)")
    plan.add_argument("--freeze-level", type=_unit_float, default=1.0, help="fraction frozen at the end (default 1.0)")
    plan.add_argument("--interval", choices=("epoch", "step"), default="epoch", help="decide at epoch ends or every step")
    plan.add_argument("--order", choices=("definition", "execution"), default="definition", help="layer order")
    plan.add_argument("--unit", choices=("leaf", "owner"), default="leaf", help="what a layer is (default leaf, Composer)")
    plan.add_argument("--measure", choices=("layers", "flops"), default="layers",
                      help="freeze_level counts layers (Composer) or forward FLOPs")
    plan.add_argument("--steps", type=_positive_int, default=1000, help="optimizer steps in the run (default 1000)")
    plan.add_argument("--steps-per-epoch", type=_positive_int, default=None,
                      help="steps per epoch for --interval epoch (default steps/10: 10 epochs)")
    plan.add_argument("--input-shape", help="per-example input shape, e.g. 3,32,32 (default: the bundled model's)")
    plan.add_argument("--input-dtype", help="input dtype: float32 (default), float16, bfloat16, long, ...")
    plan.add_argument("--plot", metavar="FILE.png", help="also draw the freeze timeline and predicted cost per step")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``layerfreeze`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = f"layerfreeze {args.command}"
    try:
        if args.command == "plan":
            return _plan(args)
        return _bench(args, argv)
    except UsageError as error:
        print(f"{command}: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, RuntimeError) as error:
        print(f"{command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # Piped or captured output: rich's 80 columns would wrap the tables' rows.
        console.width = 150
    return console


def _check_writable_dir(path: str, option: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".layerfreeze-write-test")
        with open(probe, "w", encoding="utf-8") as handle:
            handle.write("")
        os.remove(probe)
    except OSError as error:
        raise UsageError(f"{option} {path!r} is not a writable directory: {error.strerror or error}") from None


def _check_writable_file(path: str, option: str) -> None:
    if not path.lower().endswith(".png"):
        raise UsageError(f"{option} must name a .png file, got {path!r}")
    _check_writable_dir(os.path.dirname(os.path.abspath(path)), f"{option}'s directory")


# -- plan -------------------------------------------------------------------------


def _plan(args: argparse.Namespace) -> int:
    import torch

    from .bench import plan as planning
    from .bench.resolve import build_model, check_forward, example_input, parse_dtype, parse_shape, resolve_model

    if args.freeze_start == 1.0 and args.freeze_level > 0:
        raise UsageError("--freeze-start 1 leaves no training in which to freeze; use a value below 1")
    if args.plot:
        _check_writable_file(args.plot, "--plot")
    ref = resolve_model(args.model)
    shape = parse_shape(args.input_shape)
    dtype = parse_dtype(args.input_dtype)
    if shape is None:
        if ref.spec is None:
            raise UsageError(f"--input-shape is required for your own model {args.model!r} (e.g. 3,32,32)")
        shape = ref.spec.input_shape
    if dtype is None:
        dtype = ref.spec.input_dtype if ref.spec is not None else torch.float32
    steps_per_epoch = args.steps_per_epoch
    if args.interval == "epoch" and steps_per_epoch is None:
        steps_per_epoch = max(1, args.steps // 10)
    if steps_per_epoch is not None and steps_per_epoch > args.steps:
        raise UsageError(f"--steps-per-epoch {steps_per_epoch} is more than --steps {args.steps}")
    torch.manual_seed(0)
    model = build_model(ref, shape, dtype)
    example = example_input(shape, dtype, ref.spec, batch=2)
    check_forward(model, example, args.model)
    result = planning.make_plan(
        model, example, freeze_start=args.freeze_start, freeze_level=args.freeze_level, interval=args.interval,
        order=args.order, unit=args.unit, measure=args.measure, steps=args.steps, steps_per_epoch=steps_per_epoch,
    )
    epochs = f", {steps_per_epoch} steps/epoch" if args.interval == "epoch" else ""
    title = (f"{args.model}, input {tuple(shape)}: freeze_start={args.freeze_start}, freeze_level={args.freeze_level}, "
             f"interval={args.interval}{epochs}, order={args.order}, unit={args.unit}, measure={args.measure}, "
             f"{args.steps} steps")
    console = _console()
    console.print(planning.render_plan(result, title, args.interval))
    console.print(planning.summary_line(result, args.model), soft_wrap=True)
    if args.plot:
        planning.plot_plan(result, args.plot, title)
        console.print(f"plot: {args.plot}")
    return 0


# -- bench ------------------------------------------------------------------------


def _bench(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> int:
    from .bench.variants import VARIANTS, parse_variants

    if args.list_variants:
        console = _console()
        for variant in VARIANTS.values():
            console.print(f"{variant.name:12s} {variant.description}")
        return 0

    import torch

    from .bench import report
    from .bench.data import load_data
    from .bench.harness import BenchSettings, run_bench, summarize_runs
    from .bench.resolve import build_for_data, parse_dtype, parse_shape, resolve_model

    defaults = QUICK if args.quick else DEFAULTS
    epochs = args.epochs or defaults["epochs"]
    seeds = list(range(args.seeds or defaults["seeds"]))
    threads, threads_note = (args.threads, None) if args.threads else _bench_threads()
    variants = parse_variants(args.variants)
    ref = resolve_model(args.model)
    shape = parse_shape(args.input_shape)
    dtype = parse_dtype(args.input_dtype)
    if args.data != "synthetic" and (shape is not None or dtype is not None):
        raise UsageError("--input-shape / --input-dtype apply to --data synthetic only; other data sets fix the shape")
    if args.data == "synthetic" and shape is None:
        if ref.spec is None:
            raise UsageError(f"--data synthetic with your own model {args.model!r} needs --input-shape (e.g. 3,32,32)")
        shape = ref.spec.input_shape
    if dtype is None:
        dtype = ref.spec.input_dtype if ref.spec is not None else torch.float32
    _check_writable_dir(args.output_dir, "--output-dir")

    torch.set_num_threads(threads)
    data = load_data(args.data, shape or (3, 32, 32), dtype)
    build_for_data(ref, data)  # a model that cannot take this data fails here, before any run
    settings = BenchSettings(epochs=epochs, batch_size=args.batch_size, lr=args.lr, interval=args.interval)
    spe = settings.steps_per_epoch(len(data.y_train))
    config = {
        "model": args.model,
        "epochs": epochs,
        "batch_size": args.batch_size,
        "steps_per_epoch": spe,
        "total_steps": spe * epochs,
        "seeds": seeds,
        "interval": args.interval,
        "lr": args.lr,
        "optimizer": f"SGD(momentum={settings.momentum}, nesterov, weight_decay={settings.weight_decay}), cosine LR",
        "threads": threads,
        "quick": bool(args.quick),
        "data": data.describe(),
        "variants": [{"name": v.name, "description": v.description} for v in variants],
    }
    title = (f"{args.model} on {data.name} ({len(data.y_train)} train / {len(data.y_test)} test), {epochs} epochs "
             f"x {spe} steps, batch {args.batch_size}, {len(seeds)} seed(s), {threads} thread(s), "
             f"interval={args.interval}")

    console = _console()
    err = _console(stderr=True)
    notes = _NoteCollector()
    log.addHandler(notes)
    err.print(f"layerfreeze bench: {title}", soft_wrap=True)
    if threads_note:
        err.print(f"  note: {threads_note}", soft_wrap=True)
    err.print(f"  {len(variants) * len(seeds)} runs ({', '.join(v.name for v in variants)}), interleaved across seeds; "
              "Ctrl-C stops and keeps the finished runs", soft_wrap=True)
    try:
        records, interrupted = _run_with_progress(err, args.no_progress, ref, data, variants, seeds, settings,
                                                  run_bench)
    finally:
        log.removeHandler(notes)

    summary = summarize_runs(records, [v.name for v in variants])
    document = report.results_document(config, records, summary, threads, interrupted, argv)
    json_path = os.path.join(args.output_dir, "bench.json")
    png_path = os.path.join(args.output_dir, "bench.png")
    report.write_json(document, json_path)
    if summary:
        console.print(report.render_table(summary, title))
        report.plot_runs(records, summary, png_path, title)
        console.print(f"results: {json_path}\nplot:    {png_path}")
    else:
        console.print(f"no run finished; results: {json_path}")
    for message in notes.messages:
        err.print(f"note: {message}", soft_wrap=True)
    if interrupted:
        err.print(f"layerfreeze bench: interrupted after {len(records)} finished run(s); their results are saved")
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


def _run_with_progress(err: Any, quiet: bool, ref: Any, data: Any, variants: Any, seeds: Any, settings: Any,
                       run_bench: Any) -> tuple[list, bool]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    total_runs = len(variants) * len(seeds)
    spe = settings.steps_per_epoch(len(data.y_train))
    finished: list[Any] = []

    def line(record: Any) -> str:
        finished.append(record)
        return (f"  run {len(finished)}/{total_runs} {record.variant} seed {record.seed}: "
                f"{record.train_seconds:.1f} s, test accuracy {100 * record.test_accuracy:.1f}%, "
                f"frozen at end {record.frozen_depth_end}/{record.layers} layers")

    if quiet or not err.is_terminal:
        # No live display (not a terminal, or asked for none): one line a finished run.
        return run_bench(ref, data, variants, seeds, settings, on_run=lambda r: err.print(line(r), soft_wrap=True))

    progress = Progress(
        TextColumn("{task.description:<18}"), BarColumn(bar_width=24), MofNCompleteColumn(),
        TextColumn("epoch {task.fields[epoch]}"), TextColumn("loss {task.fields[loss]}"),
        TextColumn("frozen {task.fields[depth]}"), TimeElapsedColumn(),
        console=err, transient=False,
    )
    with progress:
        overall = progress.add_task("all runs", total=total_runs * settings.epochs * spe,
                                    epoch="-", loss="-", depth="-")
        current = progress.add_task("starting", total=settings.epochs * spe, epoch="-", loss="-", depth="-")

        def on_step(label: str, step: int, total: int, epoch: int, epochs: int, loss: float, depth: int,
                    layers: int) -> None:
            progress.update(current, description=label, completed=step, total=total, epoch=f"{epoch}/{epochs}",
                            loss=f"{loss:.3f}", depth=f"{depth}/{layers}" if layers else "-")
            progress.advance(overall)

        return run_bench(ref, data, variants, seeds, settings, on_step=on_step,
                         on_run=lambda r: progress.console.print(line(r)))


if __name__ == "__main__":  # python -m layerfreeze.cli
    sys.exit(main())
