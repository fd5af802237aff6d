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
import os
import sys
from typing import Any, Callable, Optional, Sequence

__all__ = ["main", "build_parser"]


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
_positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a positive number")
_unit_float = _checked(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


def _default_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))


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


def _bench(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> int:
    from .bench.command import run_bench_command

    return run_bench_command(args, argv)


if __name__ == "__main__":  # python -m layerfreeze.cli
    sys.exit(main())
