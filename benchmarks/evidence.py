"""Write docs/evidence.md from the study's committed results JSON files, and nothing else.

For each task of :mod:`study` (``docs/evidence/<task>/bench.json``, and GPU results
under ``docs/evidence/gpu/<task>/`` in sections of their own) this recomputes the
summary from the JSON's ``runs`` with the bench's own functions
(:func:`layerfreeze.bench.harness.summarize_runs`), so every figure in the tables
can be recomputed from the committed runs; draws the Pareto plot beside the JSON
(the bench's :func:`layerfreeze.bench.report.plot_runs`); and writes a conclusion
only from the equal-time verdicts. A section whose JSON is missing says "not yet
run"; one whose JSON lacks runs of the study's plan says which, shows the finished
runs' figures as partial and draws no conclusion from them::

    python benchmarks/evidence.py            # writes docs/evidence.md, the plots, the cards' study blocks
    python benchmarks/evidence.py --check    # exit 1 if docs/evidence.md or a card is not up to date

Each method card under docs/methods holds a block of the study's figures for its
variants (:data:`CARDS`), between two marker lines; this script rewrites that block
and nothing else of the card.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study  # noqa: E402
from layerfreeze.bench.frontier import AHEAD, BEHIND, NO_DIFFERENCE, OUTSIDE  # noqa: E402
from layerfreeze.bench.harness import RunRecord, frontier_rows, summarize_runs  # noqa: E402
from layerfreeze.bench.stats import median  # noqa: E402
from layerfreeze.bench.variants import BASELINE  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
#: Below this median share of its threads' capacity that a run's process used, the
#: machine was busy with other work during the study and its wall times are inflated.
BUSY_SHARE = 0.75


@dataclass(frozen=True)
class Plan:
    """The runs a complete study holds: every variant at every seed, the baseline at every budget."""

    variants: tuple[str, ...]
    seeds: int
    budgets: tuple[float, ...]

    def keys(self) -> list[tuple[str, int, float]]:
        """``(variant, seed, budget)`` of every run, in the bench's order."""
        return [(name, seed, budget) for seed in range(self.seeds) for name in self.variants
                for budget in (sorted(self.budgets, reverse=True) if name == BASELINE else [1.0])]


def study_plan(task: str) -> Plan:
    """The complete plan of ``task``'s study (the fine-tuning slot included where it applies)."""
    settings = study.STUDIES[task]
    return Plan(tuple(study.study_variants(settings, fine_tuning_registered=True)), study.SEEDS,
                settings.budgets)


def load(path: Path) -> Optional[dict[str, Any]]:
    """The results JSON at ``path``, or None when there is none."""
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def records_of(document: dict[str, Any]) -> list[RunRecord]:
    """The JSON's runs as the bench's records (ValueError for a run of another format)."""
    return [RunRecord.from_json(run) for run in document["runs"]]


def missing_runs(records: Sequence[RunRecord], plan: Plan) -> list[tuple[str, int, float]]:
    """The plan's runs that ``records`` lack."""
    have = {(r.variant, r.seed, r.budget) for r in records}
    return [key for key in plan.keys() if key not in have]


def summarize(document: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(summary, frontier)`` recomputed from the JSON's runs, variants in the config's order."""
    records = records_of(document)
    names = [v["name"] for v in document["config"]["variants"]]
    names += [n for n in dict.fromkeys(r.variant for r in records) if n not in names]
    budgets = document["config"]["budgets"]
    return summarize_runs(records, names, BASELINE, budgets), frontier_rows(records, BASELINE)


# -- formatting ---------------------------------------------------------------------------------------------

def _seconds(value: float) -> str:
    return f"{value:.{1 if value >= 10 else 2}f} s"


def _accuracy(mean: float, half: Optional[float]) -> str:
    return f"{100 * mean:.1f}%" + (" (1 run)" if half is None else f" ± {100 * half:.1f}")


def _delta(row: dict[str, Any]) -> str:
    if row.get("equal_time_delta") is None:
        return "-"
    text = f"{100 * row['equal_time_delta']:+.1f} pt"
    return text if row["equal_time_ci95"] is None else f"{text} ± {100 * row['equal_time_ci95']:.1f}"


def _memory(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f} MiB"


def table_lines(summary: Sequence[dict[str, Any]], frontier: Sequence[dict[str, Any]]) -> list[str]:
    """The section's table as Markdown lines: the baseline's shorter budgets, then one row per variant."""
    lines = ["| variant | runs | median time | speedup | CPU-time speedup | test accuracy (95% CI) "
             "| vs baseline at equal time (95% CI) | verdict | frozen at end (layers / FLOPs) | peak memory |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    full = next((row for row in summary if row["variant"] == row["baseline"]), None)
    for point in frontier:
        if point["budget"] == 1.0:
            continue
        speedup = f"{full['median_train_seconds'] / point['median_train_seconds']:.2f}x" if full else "-"
        lines.append(f"| {BASELINE} at budget {point['budget']:g} | {point['runs']} "
                     f"| {_seconds(point['median_train_seconds'])} | {speedup} |  "
                     f"| {_accuracy(point['accuracy_mean'], point['accuracy_ci95'])} |  | (frontier) |  |  |")
    for row in summary:
        if row["verdict"] is None:
            verdict = "(the baseline)" if row["variant"] == row["baseline"] else "n/a"
        elif row["frontier_side"]:
            verdict = f"{row['verdict']}: {row['frontier_side']}"
        else:
            verdict = row["verdict"]
        lines.append(
            f"| {row['variant']} | {row['runs']} | {_seconds(row['median_train_seconds'])} | {row['speedup']:.2f}x "
            f"| {row['cpu_speedup']:.2f}x | {_accuracy(row['accuracy_mean'], row['accuracy_ci95'])} "
            f"| {_delta(row)} | {verdict} "
            f"| {100 * row['frozen_layer_share_end']:.0f}% / {100 * row['frozen_flops_share_end']:.0f}% "
            f"| {_memory(row['median_peak_memory_bytes'])} |")
    return lines


def _names(rows: Sequence[dict[str, Any]]) -> str:
    parts = [f"{row['variant']} ({row['speedup']:.2f}x, {_delta(row)})" for row in rows]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def concave(frontier: Sequence[dict[str, Any]]) -> bool:
    """Whether the frontier of medians (median time, mean accuracy per budget) bends down: each
    segment's accuracy gain per second smaller than the one before (needs three budgets).

    Example:
        >>> concave([{"median_train_seconds": t, "accuracy_mean": a} for t, a in ((1, .5), (2, .9), (3, .95))])
        True
    """
    points = sorted((row["median_train_seconds"], row["accuracy_mean"]) for row in frontier)
    slopes = [(a2 - a1) / (t2 - t1) for (t1, a1), (t2, a2) in zip(points, points[1:]) if t2 > t1]
    return len(slopes) >= 2 and all(later < earlier for earlier, later in zip(slopes, slopes[1:]))


def conclusion(summary: Sequence[dict[str, Any]], frontier: Sequence[dict[str, Any]] = ()) -> list[str]:
    """Plain-words conclusions of a complete study, from its equal-time verdicts only.

    Each sentence restates what the verdicts say: ahead (the 95% interval of the
    accuracy difference to the baseline trained for the same time lies above 0),
    behind (below 0), no difference detected (it holds 0), outside the frontier.
    """
    rows = [row for row in summary if row["verdict"] is not None]
    if not rows:
        return ["No freezing variant was compared with the baseline, so there is nothing to conclude."]
    ahead = [r for r in rows if r["verdict"] == AHEAD]
    behind = [r for r in rows if r["verdict"] == BEHIND]
    same = [r for r in rows if r["verdict"] == NO_DIFFERENCE]
    outside = [r for r in rows if r["verdict"] == OUTSIDE]
    lines = []
    if ahead:
        lines.append(f"Freezing paid on this task: {_names(ahead)} reached a higher test accuracy than the baseline "
                     "trained for the same time (95% interval of the difference above 0).")
        if concave(frontier):
            lines.append("A caveat: the frontier joins the baseline's budgets by straight lines, and here it bends "
                         "down (accuracy saturates), so between two budgets the line lies below what the baseline "
                         "would reach given that time; a small lead can come from that interpolation. More budgets "
                         "near the variants' times would settle it.")
    else:
        lines.append(f"Freezing did not pay on this task: none of the {len(rows)} freezing variants beat the "
                     "baseline trained for the same time.")
    if behind:
        lines.append(f"Behind the baseline at equal time: {_names(behind)}; training without freezing for "
                     "that time would have given a higher accuracy.")
    if same:
        widest = max(100 * (r["equal_time_ci95"] or 0.0) for r in same)
        lines.append(f"No difference detected for {_names(same)}: their 95% intervals hold 0 (the widest "
                     f"± {widest:.1f} points), so any gain or loss is smaller than these runs can resolve.")
    if outside:
        lines.append(f"Outside the frontier for {', '.join(r['variant'] for r in outside)}: some runs took less "
                     "time than the smallest budget or more than the full one, where the comparison says nothing.")
    return lines


def busy_note(records: Sequence[RunRecord], threads: int, device: str) -> Optional[str]:
    """A note naming the runs whose process used under :data:`BUSY_SHARE` of its threads' capacity
    (CPU time over wall time and threads): other work held the CPUs while they ran."""
    if device != "cpu" or not records:
        return None
    busy = [r for r in records if r.train_seconds > 0 and r.train_cpu_seconds / (r.train_seconds * threads) < BUSY_SHARE]
    if not busy:
        return None
    shown = ", ".join(f"{r.variant} seed {r.seed}" + (f" budget {r.budget:g}" if r.budget != 1.0 else "")
                      for r in busy[:6]) + (", ..." if len(busy) > 6 else "")
    share = median([r.train_cpu_seconds / (r.train_seconds * threads) for r in busy])
    return (f"{len(busy)} of {len(records)} runs ran while other work held the CPUs ({shown}): their processes "
            f"used a median {100 * share:.0f}% of their {threads} threads' capacity, so their wall times are "
            "inflated (the CPU-time speedup column is less affected), and a change of load between a seed's runs "
            "moves them along the time axis, past its frontier. HINT: for figures to rely on, delete this "
            "bench.json and run the command again on an idle machine.")


def machine_line(environment: dict[str, Any], config: dict[str, Any]) -> str:
    """Where the runs were measured: CPU model, CPUs and threads, GPU if any, torch and the rest."""
    cpu = environment.get("cpu") or f"{environment.get('processor', '?')} (CPU model not recorded)"
    parts = [f"CPU: {cpu}, {environment.get('cpu_count')} logical CPUs, {config.get('threads')} torch thread(s)"]
    if environment.get("gpu"):
        parts.append(f"GPU: {environment['gpu']} (CUDA {environment.get('cuda')})")
    parts.append(f"torch {environment.get('torch')}, Python {environment.get('python')}, "
                 f"layerfreeze {environment.get('layerfreeze')}, {environment.get('platform')}")
    return "; ".join(parts)


def _runner_command(task: str, device: str) -> str:
    return f"python benchmarks/study.py --task {task}" + (" --device cuda" if device == "cuda" else "")


def _plan_text(plan: Plan) -> str:
    return (f"{len(plan.variants)} variants ({', '.join(plan.variants)}), {plan.seeds} seeds, the baseline also "
            f"at budgets {', '.join(f'{b:g}' for b in sorted(plan.budgets) if b != 1.0)}: {len(plan.keys())} runs")


def variant_lines(variants: Sequence[dict[str, Any]]) -> list[str]:
    """What each variant of the results does, from their recorded descriptions (a learning-rate multiple named)."""
    items = []
    for variant in variants:
        scale = variant.get("lr_scale", 1.0)
        rate = f"Trains at {scale:g}x the task's learning rate." if scale != 1.0 else ""
        description = variant.get("description", "").rstrip(".")
        parts = ([description + "."] if description else []) + ([rate] if rate else [])
        if parts:
            items.append(f"- `{variant['name']}`: {' '.join(parts)}")
    return ["Variants:", ""] + items + [""] if items else []


def section(task: str, document: Optional[dict[str, Any]], plan: Plan, device: str = "cpu",
            plot: Optional[str] = None, level: str = "##") -> list[str]:
    """One task's Markdown section.

    Args:
        plot: the Pareto plot's path relative to docs/ (None: no plot shown).
    """
    heading = f"{level} {task}" + (" (GPU)" if device == "cuda" else "")
    command = _runner_command(task, device)
    note = study.STUDIES[task].note if task in study.STUDIES else ""
    if document is None:
        return [heading, "", f"**Not yet run.** The study: {_plan_text(plan)}; {note}.", "",
                f"Command: `{command}`", ""]
    records = records_of(document)
    missing = missing_runs(records, plan)
    config, environment = document["config"], document["environment"]
    data = config["data"]
    lines = [heading, ""]
    if missing:
        seeds_done = sorted(s for s in range(plan.seeds)
                            if not any(key[1] == s for key in missing))
        absent = [name for name in plan.variants if not any(r.variant == name for r in records)]
        lines += [f"**Incomplete: {len(plan.keys()) - len(missing)} of {len(plan.keys())} runs done** "
                  f"(seeds complete: {', '.join(map(str, seeds_done)) or 'none'}"
                  + (f"; not run at all: {', '.join(absent)}" if absent else "") + "). "
                  f"Continue with `{command}` (it resumes). The figures below are those of the finished runs, "
                  "partial, and no conclusion is drawn from them.", ""]
    lines += [f"{config['model']} on {data['name']} ({data['train_size']:,} train / {data['test_size']:,} test"
              f"{'; ' + note if note else ''}), {config['epochs']} epochs x {config['steps_per_epoch']} steps, "
              f"batch {config['batch_size']}, {config['optimizer']}, freezing decided every {config['interval']}; "
              f"{config['device']}, {config['precision']}. Plan: {_plan_text(plan)}.", ""]
    lines += variant_lines(config.get("variants", []))
    summary, frontier = summarize(document)
    if summary:
        lines += table_lines(summary, frontier) + [""]
        lines += ["Speedup: the baseline's median full-run training time over the variant's. Accuracy: mean over "
                  "seeds with its 95% CI (Student's t). Equal time: accuracy minus the same seed's baseline "
                  "frontier (its budgets, interpolated) at the run's own time, mean over seeds with its 95% CI.",
                  ""]
    else:
        lines += ["No full-budget run has finished yet.", ""]
    if plot is not None:
        lines += [f"![{task}: test accuracy against training time, every run a point]({plot})", ""]
    note_busy = busy_note(records, config.get("threads", 1), config["device"].split(":")[0])
    if note_busy:
        lines += [note_busy, ""]
    if missing:
        lines += ["**Conclusion:** none yet (the study is incomplete).", ""]
    elif summary:
        lines += ["**Conclusion.** " + " ".join(conclusion(summary, frontier)), ""]
    lines += [f"Command: `{command}`, which runs `{' '.join(document['command'])}`.", "",
              f"Machine: {machine_line(environment, config)}. Results: {len(records)} run{'s' * (len(records) != 1)}, "
              f"written {document['created']}.", ""]
    return lines


INTRO = """# Evidence: does freezing pay?

A replicated study on real tasks (issue 12). Composer's method card found no evidence
that freezing improves the speed/accuracy trade-off, from single runs; here each
variant runs with 5 seeds beside the baseline without freezing, and the baseline also
runs at shorter budgets (a share of the steps, its learning-rate schedule compressed),
so each freezing run is compared with the baseline *given the same time*, paired by
seed. The verdict per variant: **ahead** (the 95% interval of that accuracy difference
lies above 0), **behind** (below 0), **no difference detected** (it holds 0), or
**outside the frontier** (the run took less time than the smallest budget or more than
the full run).

This page is generated by `python benchmarks/evidence.py` from the committed results
(`docs/evidence/<task>/bench.json`; GPU results in `docs/evidence/gpu/<task>/`, in
their own sections, never mixed with CPU figures); every figure below is recomputed
from their `runs`. Each study is one resumable command,
`python benchmarks/study.py --task TASK` (`--part K/M` splits it by seeds across
sessions; `--device cuda` on a GPU). The variants are those of
`layerfreeze bench --list-variants`.
"""


#: Each method card (under docs/methods) and the study's variants it reports, in a
#: block between :data:`CARD_BEGIN` and :data:`CARD_END` that this script rewrites.
CARDS = {
    "layer_freezing.md": ("composer", "start0.1", "flops", "cache"),
    "freezeout.md": ("freezeout",),
    "gradient_change.md": ("gradient",),
    "convergence.md": ("convergence",),
    "fixed_depth.md": ("fixed0.7-cache", "fixed0.7-cache-lr2"),
}
CARD_BEGIN = "<!-- study figures: written by python benchmarks/evidence.py from docs/evidence; do not edit -->"
CARD_END = "<!-- end of study figures -->"


def card_block(variants: Sequence[str], documents: dict[tuple[str, str], Optional[dict[str, Any]]]) -> list[str]:
    """The study's figures for ``variants``: one table row per task (and device) that runs them.

    Only complete studies give rows; the others are named as pending, as on the evidence page.
    """
    rows, pending = [], []
    for (task, device), document in documents.items():
        plan = study_plan(task)
        if not any(name in plan.variants for name in variants):
            continue
        label = task + (" (GPU)" if device == "cuda" else "")
        if document is None or missing_runs(records_of(document), plan):
            if device == "cpu" or document is not None:
                pending.append(f"{label} ({'not yet run' if document is None else 'incomplete'})")
            continue
        summary, _ = summarize(document)
        by_name = {row["variant"]: row for row in summary}
        base = by_name[BASELINE]
        for name in variants:
            row = by_name.get(name)
            if row is None:
                continue
            verdict = row["verdict"] + (f": {row['frontier_side']}" if row["frontier_side"] else "")
            rows.append(f"| {label} | {name} | {row['speedup']:.2f}x "
                        f"| {_accuracy(row['accuracy_mean'], row['accuracy_ci95'])} "
                        f"| {_accuracy(base['accuracy_mean'], base['accuracy_ci95'])} | {_delta(row)} | {verdict} |")
    lines = [CARD_BEGIN, ""]
    if rows:
        lines += ["| task | variant | speedup (wall) | test accuracy (95% CI) | baseline's accuracy "
                  "| vs baseline at equal time (95% CI) | verdict |",
                  "| --- | --- | ---: | ---: | ---: | ---: | --- |", *rows, ""]
    else:
        lines += ["No study that runs this method is complete yet.", ""]
    if pending:
        lines += [f"Pending: {', '.join(pending)}.", ""]
    return lines + [CARD_END]


def with_card_block(text: str, block: Sequence[str], name: str) -> str:
    """``text`` (a method card) with its study block replaced by ``block``.

    Raises:
        ValueError: if the card lacks the markers (or has them out of order).
    """
    start, end = text.find(CARD_BEGIN), text.find(CARD_END)
    if start < 0 or end < start:
        raise ValueError(f"{name}: no study block; put the lines {CARD_BEGIN!r} and {CARD_END!r} where the "
                         "study's figures go")
    return text[:start] + "\n".join(block) + text[end + len(CARD_END):]


def load_all(evidence_dir: Path) -> dict[tuple[str, str], Optional[dict[str, Any]]]:
    """Every study's results, keyed ``(task, device)`` in the page's order (None where not run)."""
    return {(task, device): load(Path(study.output_dir(task, device, str(evidence_dir))) / "bench.json")
            for device in ("cpu", "cuda") for task in study.STUDIES}


def cards(evidence_dir: Path, methods_dir: Path) -> dict[Path, str]:
    """Each method card's text with its study block brought up to date."""
    documents = load_all(evidence_dir)
    return {methods_dir / name: with_card_block((methods_dir / name).read_text(encoding="utf-8"),
                                                card_block(variants, documents), name)
            for name, variants in CARDS.items()}


def build(evidence_dir: Path, docs_dir: Path, plots: bool = True) -> str:
    """docs/evidence.md's text; with ``plots``, also (re)draws each section's Pareto plot."""
    from layerfreeze.bench.report import plot_runs

    documents = load_all(evidence_dir)
    lines = [INTRO]
    for device, title in (("cpu", "CPU"), ("cuda", "GPU")):
        lines += [f"## {title}", ""]
        if device == "cuda":
            lines += ["The same studies run on a GPU (`--device cuda`), where one is available; these figures "
                      "are not comparable with the CPU ones above.", ""]
        for task in study.STUDIES:
            folder = Path(study.output_dir(task, device, str(evidence_dir)))
            document = documents[task, device]
            plot = None
            if document is not None and document["runs"]:
                png = folder / "pareto.png"
                if plots:
                    summary, _ = summarize(document)
                    if summary:
                        records = records_of(document)
                        missing = missing_runs(records, study_plan(task))
                        partial = f", partial: {len(records)} of {len(study_plan(task).keys())} runs" if missing else ""
                        plot_runs(records, summary, str(png),
                                  f"{task} ({title}{partial}): accuracy against training time", BASELINE)
                if png.is_file():
                    plot = os.path.relpath(png, docs_dir)
            lines += section(task, document, study_plan(task), device, plot, level="###")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/evidence.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(DOCS / "evidence.md"), help="the Markdown file to write")
    parser.add_argument("--evidence-dir", default=str(DOCS / "evidence"), help="where the results folders are")
    parser.add_argument("--methods-dir", default=str(DOCS / "methods"),
                        help="the method cards whose study blocks to rewrite")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the output or a card is not what the JSON files give")
    args = parser.parse_args(argv)
    output = Path(args.output)
    texts = {output: build(Path(args.evidence_dir), output.parent, plots=not args.check),
             **cards(Path(args.evidence_dir), Path(args.methods_dir))}
    stale = [path for path, text in texts.items()
             if (path.read_text(encoding="utf-8") if path.is_file() else "") != text]
    if args.check:
        for path in stale:
            print(f"{path} is out of date; run python benchmarks/evidence.py", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(texts[path], encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
