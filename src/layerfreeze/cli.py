"""The ``layerfreeze`` command: ``plan`` previews what freezes when, ``bench`` measures it.

``layerfreeze bench`` with no arguments is the main job: it trains the bundled
ResNet-20 on scikit-learn's digits with and without layer freezing, several seeds
each, the baseline also at shorter budgets, and answers "does freezing beat simply
training less?" with an equal-time verdict per variant (table, JSON, PNG).
``--task`` picks another preset (fashion-mnist, rotten-tomatoes).
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

#: Baseline budgets (shares of the full run) unless --budgets says otherwise.
DEFAULT_BUDGETS = (0.5, 0.75, 1.0)


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (exit 2), not the whole usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
_natural_int = _checked(int, lambda v: v >= 0, "a non-negative integer")
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
    from .bench.tasks import DEFAULT_TASK, TASKS
    from .bench.variants import DEFAULT_VARIANTS, VARIANTS

    parser = _Parser(
        prog="layerfreeze",
        description="Progressive layer freezing for PyTorch: preview a schedule (plan) or measure it (bench).",
    )
    commands = parser.add_subparsers(dest="command", metavar="{bench,plan}")
    commands.required = True
    bundled = ", ".join(MODELS)
    default = TASKS[DEFAULT_TASK]
    budgets = ",".join(f"{b:g}" for b in DEFAULT_BUDGETS)

    bench = commands.add_parser(
        "bench", help="does freezing beat simply training less? train with and without it, at equal time",
        description=(
            "Train a model on real data without freezing and with each freezing variant, several seeds each "
            f"(runs interleaved); the baseline also at shorter budgets ({budgets} of the steps, its learning-rate "
            "schedule compressed to each), whose times and accuracies form, per seed, the equal-time frontier. "
            "Each freezing run's accuracy is compared with its seed's frontier at its own time; across seeds the "
            "mean difference and its 95% CI give the verdict: ahead, behind, no difference detected, or outside "
            "the frontier. Prints a table and writes bench.json and bench.png. "
            f"Tasks: {'; '.join(f'{t.name}: {t.description} (needs: {t.needs})' for t in TASKS.values())}. "
            f"With no options: --task {DEFAULT_TASK}, {default.seeds} seeds, variants {','.join(DEFAULT_VARIANTS)}."
        ),
    )
    bench.add_argument("--task", default=DEFAULT_TASK, choices=tuple(TASKS), metavar="{" + ",".join(TASKS) + "}",
                       help=f"preset of model, data, optimizer, LR schedule, epochs and batch size; the options "
                       f"below override its parts (default {DEFAULT_TASK})")
    bench.add_argument("--model", help=f"bundled model ({bundled}) or package.module:factory "
                       "(called with no arguments). Default: the task's")
    bench.add_argument("--data", help="digits, fashion-mnist, rotten-tomatoes, synthetic, or an image folder PATH "
                       "with one subfolder per class (needs torchvision). Default: the task's")
    bench.add_argument("--epochs", type=_positive_int, help=f"epochs of a full run (default: the task's, "
                       f"{default.epochs} for {DEFAULT_TASK}; --quick: {default.quick_epochs})")
    bench.add_argument("--batch-size", type=_positive_int, help=f"batch size (default: the task's, "
                       f"{default.batch_size} for {DEFAULT_TASK})")
    bench.add_argument("--lr", type=_positive_float, help="peak learning rate (default: the task's, "
                       f"{default.lr:g} for {DEFAULT_TASK})")
    bench.add_argument("--seeds", type=_positive_int, help=f"number of seeds, 0..N-1 (default {default.seeds}; "
                       "--quick: 1)")
    bench.add_argument("--budgets", default=budgets, help=f"the baseline's budgets, shares of the full run's steps "
                       f"in (0, 1], comma-separated; 1 is always run (default {budgets})")
    bench.add_argument("--train-size", type=_positive_int, help="train on a seeded stratified subset of this many "
                       "training examples (default: all)")
    bench.add_argument("--test-size", type=_positive_int, help="test on a seeded stratified subset of this many "
                       "test examples (default: all)")
    bench.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                       help=f"comma-separated variants, or all ({', '.join(VARIANTS)}); default "
                       f"{','.join(DEFAULT_VARIANTS)}; see --list-variants")
    bench.add_argument("--interval", choices=("epoch", "step"),
                       help="when freezing decisions are made (default: the task's; epoch, as Composer, except "
                       "rotten-tomatoes: step)")
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto: cuda when a GPU is available, else cpu (default auto)")
    bench.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                       help="bf16: forward passes under torch.autocast in bfloat16 (default fp32)")
    bench.add_argument("--output-dir", default="layerfreeze-bench",
                       help="where bench.json and bench.png go (default ./layerfreeze-bench)")
    bench.add_argument("--resume", action="store_true",
                       help="keep the runs already in OUTPUT_DIR/bench.json (same configuration) and do only the rest")
    bench.add_argument("--threads", type=_positive_int, default=None,
                       help=f"torch CPU threads (default min(2, cpus) = {_default_threads()}, fewer while other "
                       "processes keep the CPUs busy)")
    bench.add_argument("--input-shape", help="per-example input shape for --data synthetic with your own model, "
                       "e.g. 3,32,32")
    bench.add_argument("--input-dtype", help="input dtype for --data synthetic with your own model (float32, long, ...)")
    bench.add_argument("--quick", action="store_true",
                       help=f"a short check: the task's quick epochs ({default.quick_epochs} for {DEFAULT_TASK}), 1 seed")
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


def _probe_write(path: str, what: str) -> None:
    probe = os.path.join(path, ".layerfreeze-write-test")
    try:
        with open(probe, "w", encoding="utf-8") as handle:
            handle.write("")
        os.remove(probe)
    except OSError as error:
        raise UsageError(f"{what} {path!r} is not writable: {error.strerror or error}") from None


def _check_writable_dir(path: str, option: str) -> None:
    """An output folder: created when missing (with its parents), then checked by writing to it."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{option} {path!r} is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{option} {path!r} cannot be created: {error.strerror or error}") from None
    _probe_write(path, option)


def _check_writable_file(path: str, option: str) -> None:
    """An output file: its folder must exist already (a mistyped path is not created) and be writable."""
    if not path.lower().endswith(".png"):
        raise UsageError(f"{option} must name a .png file, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(folder):
        raise UsageError(f"{option} {path!r}: folder {folder!r} does not exist")
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path!r}: {folder!r} is not a directory")
    if os.path.isdir(path):
        raise UsageError(f"{option} {path!r} is a directory, not a file")
    _probe_write(folder, f"{option}'s folder")


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
    from .bench.devices import MemoryMeter, device_environment, resolve_device
    from .bench.harness import BenchSettings, RunRecord, frontier_rows, plan_runs, run_bench, summarize_runs
    from .bench.resolve import build_for_data, parse_dtype, parse_shape, resolve_model
    from .bench.tasks import get_task
    from .bench.variants import BASELINE

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
        "variants": [{"name": v.name, "description": v.description} for v in variants],
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


if __name__ == "__main__":  # python -m layerfreeze.cli
    sys.exit(main())
