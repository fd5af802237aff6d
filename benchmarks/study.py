"""The replicated study (issue 12): does freezing pay on real tasks? One command per task.

Each task's study is one ``layerfreeze bench`` with fixed settings: the baseline
without freezing at several budgets (its equal-time frontier), Composer's defaults,
``freeze_start=0.1``, cost-aware freezing, prefix caching, each policy (FreezeOut,
GradientChange, Convergence), on the fine-tuning task also the best fine-tuning
settings of issue 11 (:data:`FINE_TUNING_VARIANTS`), and 5 seeds. Results go to a committed folder,
``docs/evidence/<task>/bench.json`` (``docs/evidence/gpu/<task>/`` with
``--device cuda``: GPU figures are never mixed with CPU ones), always with
``--resume``, so an interrupted study continues where it stopped::

    python benchmarks/study.py --task digits                 # the whole digits study
    python benchmarks/study.py --task fashion-mnist --part 1/5   # its first seed; 2/5 the next, ...
    python benchmarks/study.py --task digits --device cuda   # the same study on a GPU
    python benchmarks/study.py --task digits --dry-run       # print the bench command only
    python benchmarks/study.py --task digits --seeds 8 --output-root replication   # seeds 0-7 elsewhere
    python benchmarks/evidence.py                            # docs/evidence.md from the JSON files

Splitting: ``--part K/M`` runs the seeds of the first K of M equal parts (seeds
``0 .. ceil(K * seeds / M) - 1``), keeping those already in the JSON. A seed is the
unit of a part because the equal-time comparison pairs each freezing run with the
baseline of its own seed, run beside it. Run the parts in order; a part run early
also runs the earlier parts' seeds.

Durations measured on 2 idle CPU cores: digits about 12 minutes (a full run 18 s,
a seed about 140 s with evaluation); rotten-tomatoes about 100 minutes (a full run
about 108 s, a seed about 20 minutes); fashion-mnist about 18 minutes (a full run
about 26 s).

The settings are those of :data:`STUDIES`; changing one makes ``--resume`` refuse the
existing JSON (another configuration), so a study is never silently mixed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

#: Seeds of every task's study (the bench runs seeds 0..N-1).
SEEDS = 5
#: The variants every task runs (see ``layerfreeze bench --list-variants``): the
#: baseline, Composer's defaults, the earlier start, cost-aware, caching, each policy.
VARIANTS = ("none", "composer", "start0.1", "flops", "cache", "freezeout", "gradient", "convergence")
#: Issue 11's fine-tuning settings, bench variants: 70% of the layers (MiniLM's
#: embeddings and 4 of its 6 blocks) frozen after the first step, never changed, and
#: cached (docs/performance.md, fine-tuning), at the task's learning rate and at twice
#: it (the best setting found: only the top blocks and the new head train). Tasks with
#: ``fine_tuning=True`` run them; a better setting found later is added here (the
#: resumed study then runs the new variant's runs only).
FINE_TUNING_VARIANTS = ("fixed0.7-cache", "fixed0.7-cache-lr2")
#: CPU threads of every CPU study: the 2 cores of the reference machine.
THREADS = 2
#: Where the results go, relative to the repository root.
EVIDENCE_DIR = os.path.join("docs", "evidence")


@dataclass(frozen=True)
class TaskStudy:
    """The settings of one task's study.

    Attributes:
        task: the ``layerfreeze bench --task`` preset (model, data, recipe, epochs).
        budgets: the baseline's budgets (shares of the full run), its equal-time frontier.
        train_size: train on a seeded stratified subset of this many examples (None: all).
        test_size: test on a seeded stratified subset of this many examples (None: all).
        fine_tuning: also run :data:`FINE_TUNING_VARIANTS` (a pretrained model's fine-tuning).
        note: why the sizes are what they are, shown in docs/evidence.md.
    """

    task: str
    budgets: tuple[float, ...]
    train_size: Optional[int] = None
    test_size: Optional[int] = None
    fine_tuning: bool = False
    note: str = ""


STUDIES: dict[str, TaskStudy] = {
    "digits": TaskStudy("digits", (0.5, 0.75, 1.0), note="the whole data set"),
    "fashion-mnist": TaskStudy(
        # First sized for two hours from a 20-step run timed on a busy machine; on 2 idle cores the whole
        # study took 18 minutes (a full run about 26 s), well inside the two-hour bound.
        "fashion-mnist", (0.5, 0.75, 1.0), train_size=1536, test_size=2000,
        note="a stratified subset of 1,536 training and 2,000 test images (12 steps an epoch); the whole study "
             "took 18 minutes on 2 idle CPU cores, inside the two-hour bound it was sized for"),
    "rotten-tomatoes": TaskStudy(
        "rotten-tomatoes", (0.25, 0.5, 0.75, 1.0), train_size=1024, test_size=1000, fine_tuning=True,
        note="1,024 training and 1,000 test snippets, so that a full run takes about 2 minutes on 2 cores (the "
             "whole study about 100 minutes); budgets down to 0.25, so that the frontier reaches below the "
             "fixed-depth variants' time (about 2.5x faster)"),
}


def fine_tuning_registered() -> bool:
    """Whether this layerfreeze registers all of :data:`FINE_TUNING_VARIANTS` (older versions lack them).

    Without them the fine-tuning tasks run the other variants, and docs/evidence.md
    reports their study as lacking them.
    """
    from layerfreeze.bench.variants import VARIANTS as REGISTERED

    return all(name in REGISTERED for name in FINE_TUNING_VARIANTS)


def output_dir(task: str, device: str, root: str = EVIDENCE_DIR) -> str:
    """Where a task's study writes: ``root/<task>`` on CPU, ``root/gpu/<task>`` on a GPU."""
    return os.path.join(root, "gpu", task) if device == "cuda" else os.path.join(root, task)


def study_variants(study: TaskStudy, fine_tuning_registered: bool) -> list[str]:
    """The variants of ``study``, the fine-tuning slot included where it applies and is registered."""
    names = list(VARIANTS)
    if study.fine_tuning and fine_tuning_registered:
        names.extend(FINE_TUNING_VARIANTS)
    return names


def seeds_for_part(part: int, parts: int, seeds: int = SEEDS) -> int:
    """Seeds done once part ``part`` of ``parts`` has run (the parts are cumulative).

    Example:
        >>> [seeds_for_part(k, 2) for k in (1, 2)], [seeds_for_part(k, 5) for k in range(1, 6)]
        ([3, 5], [1, 2, 3, 4, 5])
    """
    return math.ceil(part * seeds / parts)


def parse_part(text: str) -> tuple[int, int]:
    """``"K/M"`` as ``(K, M)`` with ``1 <= K <= M``.

    Raises:
        ValueError: naming the value and the accepted form.
    """
    try:
        part, parts = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--part must be K/M with whole numbers, e.g. 1/5, got {text!r}") from None
    if not 1 <= part <= parts:
        raise ValueError(f"--part K/M needs 1 <= K <= M, got {text!r}")
    return part, parts


def bench_argv(study: TaskStudy, *, device: str, seeds: int, threads: int, variants: Sequence[str],
               out: str, progress: bool = False) -> list[str]:
    """The ``layerfreeze`` arguments of one study run (always ``--resume``)."""
    argv = ["bench", "--task", study.task, "--seeds", str(seeds),
            "--budgets", ",".join(f"{b:g}" for b in study.budgets),
            "--variants", ",".join(variants), "--device", device, "--threads", str(threads),
            "--output-dir", out, "--resume"]
    if study.train_size is not None:
        argv += ["--train-size", str(study.train_size)]
    if study.test_size is not None:
        argv += ["--test-size", str(study.test_size)]
    if not progress:
        argv.append("--no-progress")
    return argv


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/study.py",
        description="Run (or continue) one task's replicated study: layerfreeze bench with the study's settings, "
                    "resumed into docs/evidence/<task>/bench.json (docs/evidence/gpu/<task>/ with --device cuda). "
                    "Then python benchmarks/evidence.py writes docs/evidence.md.")
    parser.add_argument("--task", required=True, choices=sorted(STUDIES), help="the task whose study to run")
    parser.add_argument("--seeds", type=int, default=SEEDS,
                        help=f"seeds 0..N-1 (default {SEEDS}, the study's; more extends it, --part splits them)")
    parser.add_argument("--part", default=None,
                        help="K/M: run only the seeds of the first K of M parts (cumulative; run the parts in order)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (default) or cuda; GPU results go to their own folder and section")
    parser.add_argument("--output-root", default=EVIDENCE_DIR,
                        help=f"folder holding each task's results folder (default {EVIDENCE_DIR})")
    parser.add_argument("--dry-run", action="store_true", help="print the layerfreeze bench command and exit")
    parser.add_argument("--progress", action="store_true", help="a progress bar instead of one line per run")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    study = STUDIES[args.task]
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    seeds = args.seeds
    if args.part is not None:
        try:
            part, parts = parse_part(args.part)
        except ValueError as error:
            parser.error(str(error))
        seeds = seeds_for_part(part, parts, args.seeds)
    registered = fine_tuning_registered()
    variants = study_variants(study, registered)
    out = output_dir(study.task, args.device, args.output_root)
    command = bench_argv(study, device=args.device, seeds=seeds, threads=THREADS, variants=variants, out=out,
                         progress=args.progress)
    print("layerfreeze " + " ".join(command), file=sys.stderr)
    if study.fine_tuning and not registered:
        print(f"note: this layerfreeze lacks a variant of {', '.join(FINE_TUNING_VARIANTS)} (issue 11's fine-tuning settings); "
              "this study runs without it, and docs/evidence.md reports it as missing", file=sys.stderr)
    if args.dry_run:
        return 0
    from layerfreeze.cli import main as layerfreeze

    return layerfreeze(command)


if __name__ == "__main__":
    sys.exit(main())
