"""What ``layerfreeze bench`` hands back: a table, a results JSON and a PNG.

Results JSON (``bench.json``, format ``"layerfreeze-bench/2"``)::

    {
      "format": "layerfreeze-bench/2",
      "created": "2025-01-01T12:00:00+00:00",     # UTC, ISO 8601
      "interrupted": false,                       # true while runs are missing (stopped, killed or still going)
      "command": ["layerfreeze", "bench", ...],
      "config": {                                 # --resume continues only a bench of the same config
        "task": "digits", "model": "resnet20", "epochs": 5, "batch_size": 128, "steps_per_epoch": 12,
        "total_steps": 60,                        # steps of a full-budget run
        "budgets": [0.5, 0.75, 1.0],              # the baseline's budgets
        "seeds": [0, 1, 2], "interval": "epoch", "lr": 0.1,
        "optimizer": "SGD(momentum=0.9, nesterov) weight_decay=0.0005, LR 0.1 peak, cosine decay to 0",
        "device": "cpu", "precision": "fp32", "threads": 2, "quick": false,
        "data": {"name": "digits", "train_size": 1437, "test_size": 360,
                 "input_shape": [1, 32, 32], "input_dtype": "float32", "num_classes": 10},
        "variants": [{"name": "none", "description": "...", "lr_scale": 1.0}, ...]
      },
      "environment": {"python": "3.12.3", "torch": "2.13.0+cpu", "layerfreeze": "0.1.0",
                      "platform": "Linux-...", "machine": "x86_64", "processor": "...", "cpu": "AMD EPYC",
                      "cpu_count": 2, "threads": 2,
                      "device": "cpu", "precision": "fp32",
                      "gpu": null, "cuda": null,          # the GPU's name and CUDA version on a GPU
                      "peak_memory": "peak RSS growth"},  # or "torch.cuda.max_memory_allocated"
      "runs": [                                   # one per finished run, in run order
        {"variant": "composer", "seed": 0,
         "budget": 1.0,                           # share of the full run's steps (the baseline runs several)
         "train_seconds": 41.2,                   # wall time of the training loop, attach included
         "train_cpu_seconds": 40.8,               # process CPU time of the same (all threads)
         "eval_seconds": 0.4, "test_accuracy": 0.97,   # accuracy in [0, 1]
         "final_train_loss": 0.05, "epoch_train_loss": [...],
         "epoch_seconds": [...],                  # wall time of each epoch (the first includes attach)
         "steps": 60,
         "layers": 43,                            # freezable layers of the model
         "frozen_depth_end": 25,                  # layers frozen during the last step
         "frozen_layer_share_end": 0.58, "frozen_flops_share_end": 0.41,
         "params_frozen_end": 50,
         "depth_changes": [[1, 0], [37, 8], ...], # [first step run at a depth, depth]
         "predicted_speedup": 1.12,               # the performance model of docs/performance.md
         "peak_memory_bytes": 52428800,           # see environment.peak_memory; null where not measurable
         "cache_hits": null, "cache_misses": null,     # PrefixCache lookups (cache variants only), and
         "cache_advanced": null}                  # cached outputs carried through newly frozen stages
      ],
      "summary": [                                # one per variant with full-budget runs
        {"variant": "composer", "runs": 3, "baseline": "none",
         "median_train_seconds": 40.9,
         "speedup": 1.14,                         # baseline's full-budget median / this median
         "median_train_cpu_seconds": 40.5,
         "cpu_speedup": 1.12,                     # the same with CPU time
         "accuracy_mean": 0.97, "accuracy_ci95": 0.01,   # half-width; null with one run
         "frozen_layer_share_end": 0.58, "frozen_flops_share_end": 0.41,
         "predicted_speedup": 1.12, "median_peak_memory_bytes": 52428800,
         "equal_time_delta": 0.004,               # mean over seeds of accuracy - the seed's frontier at the run's time
         "equal_time_ci95": 0.012,                # half-width of its 95% CI (Student's t); null with one seed
         "equal_time_runs": 3,                    # runs inside their frontier (the delta's sample)
         "frontier_side": null,                   # or e.g. "faster than the smallest budget (0.5) in 2 of 3 runs"
         "verdict": "no difference detected"}     # ahead | behind | no difference detected | outside the frontier;
      ],                                          # null for the baseline itself
      "frontier": [                               # the baseline per budget, smallest first
        {"budget": 0.5, "runs": 3, "steps": 30, "median_train_seconds": 20.1,
         "accuracy_mean": 0.95, "accuracy_ci95": 0.02}
      ]
    }

See :mod:`layerfreeze.bench.frontier` for how the equal-time fields are computed.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import textwrap
from typing import Any, Optional, Sequence

import torch

from .harness import RunRecord
from .stats import mean_ci95, median

__all__ = ["FORMAT", "environment", "results_document", "write_json", "read_previous", "check_resumable",
           "render_table", "plot_runs", "timing_notes"]

FORMAT = "layerfreeze-bench/2"
#: Config entries a resumed bench may change: it runs the (variant, seed, budget) runs it lacks.
_FREE_ON_RESUME = ("seeds", "variants", "quick")


def environment(threads: int, device: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Where the numbers were measured (``device``: from :func:`layerfreeze.bench.devices.device_environment`)."""
    from .. import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "layerfreeze": __version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        **(device or {}),
    }


def _cpu_model() -> Optional[str]:
    """The CPU's model name (Linux /proc/cpuinfo; None where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def results_document(config: dict[str, Any], records: Sequence[RunRecord], summary: list[dict[str, Any]],
                     frontier: list[dict[str, Any]], device: dict[str, Any], threads: int, interrupted: bool,
                     argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """The results JSON as a dict (see the module docstring for the schema)."""
    return {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "interrupted": interrupted,
        "command": ["layerfreeze", *(sys.argv[1:] if argv is None else argv)],
        "config": config,
        "environment": environment(threads, device),
        "runs": [record.to_json() for record in records],
        "summary": summary,
        "frontier": frontier,
    }


def read_previous(path: str) -> Optional[dict[str, Any]]:
    """The results JSON at ``path`` for ``--resume``; None when there is none yet.

    Raises:
        ValueError: when the file is not a results JSON of this format.
    """
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(f"--resume: cannot read {path}: {error}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT or not isinstance(document.get("runs"), list):
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise ValueError(f"--resume: {path} is not a layerfreeze bench results file of format {FORMAT} "
                         f"(found {found!r}); HINT: choose another --output-dir")
    return document


def check_resumable(previous: dict[str, Any], config: dict[str, Any], path: str) -> None:
    """Refuse to resume a bench whose configuration differs (seeds and variants may).

    Raises:
        ValueError: naming the first differences.
    """
    old = previous.get("config", {})
    keys = [key for key in {**old, **config} if key not in _FREE_ON_RESUME]
    differences = [f"{key}: {json.dumps(old.get(key))} there, {json.dumps(config.get(key))} now"
                   for key in keys if old.get(key) != config.get(key)]
    # Variants may come and go, but one kept under its name must train as it did
    # (results written before lr_scale existed trained every variant at the task's rate).
    scales = [{v["name"]: v.get("lr_scale", 1.0) for v in c.get("variants", []) if isinstance(v, dict)}
              for c in (old, config)]
    differences += [f"variant {name!r} lr_scale: {scales[0][name]:g} there, {scales[1][name]:g} now"
                    for name in scales[1] if name in scales[0] and scales[0][name] != scales[1][name]]
    if differences:
        shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
        raise ValueError(f"--resume: {path} holds a bench of another configuration ({shown}); HINT: give the same "
                         "options as that bench, or another --output-dir for a new one")


def write_json(document: dict[str, Any], path: str) -> None:
    """Write ``document`` to ``path`` (through a temporary file, so a reader never sees half)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, allow_nan=False)
        handle.write("\n")
    os.replace(tmp, path)


def _accuracy_text(mean: float, half: Optional[float]) -> str:
    if half is None:
        return f"{100 * mean:.1f}% (1 run)"
    return f"{100 * mean:.1f}% ± {100 * half:.1f}"


def _seconds(value: float) -> str:
    return f"{value:.{1 if value >= 10 else 2}f} s"


def _memory(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f} MiB"


def _delta_text(row: dict[str, Any]) -> str:
    if row["equal_time_delta"] is None:
        return "-"
    half = row["equal_time_ci95"]
    delta = f"{100 * row['equal_time_delta']:+.1f} pt"
    return delta if half is None else f"{delta} ± {100 * half:.1f}"


def _verdict_text(row: dict[str, Any]) -> str:
    if row["verdict"] is None:
        return "(the baseline)" if row["variant"] == row["baseline"] else "n/a (no baseline run)"
    if row["frontier_side"]:
        ways = [way for way in ("faster", "slower") if way in row["frontier_side"]]
        return f"{row['verdict']} ({' and '.join(ways)})"
    return row["verdict"]


def render_table(summary: Sequence[dict[str, Any]], frontier: Sequence[dict[str, Any]], title: str) -> Any:
    """A rich Table: the baseline's budgets first (the frontier), then one row per variant
    with its speedup, accuracy, equal-time delta (accuracy points over the frontier at the
    same time, 95% CI) and verdict."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("variant", no_wrap=True)
    table.add_column("runs", justify="right")
    table.add_column("median\ntime", justify="right", no_wrap=True)
    table.add_column("speedup\nwall / CPU / predicted", justify="right", no_wrap=True)
    table.add_column("test accuracy\n(95% CI)", justify="right", no_wrap=True)
    table.add_column("vs none at\nequal time", justify="right", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    table.add_column("frozen at end\nlayers / FLOPs", justify="right", no_wrap=True)
    table.add_column("peak\nmemory", justify="right", no_wrap=True)
    full = next((row for row in summary if row["variant"] == row["baseline"]), None)
    for point in frontier:
        if point["budget"] == 1.0:
            continue
        speedup = f"{full['median_train_seconds'] / point['median_train_seconds']:.2f}x" if full else "-"
        table.add_row(f"none@{point['budget']:g}", str(point["runs"]), _seconds(point["median_train_seconds"]),
                      speedup, _accuracy_text(point["accuracy_mean"], point["accuracy_ci95"]), "", "(frontier)",
                      "", "", style="dim")
    for row in summary:
        table.add_row(
            row["variant"],
            str(row["runs"]),
            _seconds(row["median_train_seconds"]),
            f"{row['speedup']:.2f}x / {row['cpu_speedup']:.2f}x / {row['predicted_speedup']:.2f}x",
            _accuracy_text(row["accuracy_mean"], row["accuracy_ci95"]),
            _delta_text(row),
            _verdict_text(row),
            f"{100 * row['frozen_layer_share_end']:.0f}% / {100 * row['frozen_flops_share_end']:.0f}%",
            _memory(row["median_peak_memory_bytes"]),
        )
    return table


def timing_notes(summary: Sequence[dict[str, Any]], seeds: int) -> list[str]:
    """Warnings about timings that cannot carry a conclusion: one seed, or wall and CPU time disagreeing."""
    notes = []
    if seeds == 1 and len(summary) > 1:
        notes.append("one seed: a single run per variant cannot tell a speedup from a busy spell of the machine, "
                     "and no confidence interval exists. HINT: use --seeds 3 or more, on an idle machine")
    for row in summary:
        wall, cpu = row["speedup"], row["cpu_speedup"]
        if row["variant"] != row["baseline"] and (wall < 1.0 < cpu or cpu < 1.0 < wall or
                                                  max(wall, cpu) / min(wall, cpu) > 1.25):
            notes.append(f"{row['variant']}: wall-time speedup {wall:.2f}x but CPU-time speedup {cpu:.2f}x: other "
                         "processes took CPU time during some runs, so the wall times are not comparable. "
                         "HINT: rerun on an idle machine, with more seeds")
    return notes


def plot_runs(records: Sequence[RunRecord], summary: Sequence[dict[str, Any]], path: str, title: str,
              baseline: str = "none") -> None:
    """Accuracy against training time: every run a point; the baseline's frontier per seed
    as a thin line (its budgets joined in time order) and the frontier of medians (median
    time, mean accuracy per budget) as a thick one; per variant, the mean accuracy with
    its 95% CI at the median time (the figure speedups come from)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .frontier import frontier_points

    fig, ax = plt.subplots(figsize=(8.5, 5.2), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    low, high = 100.0, 0.0
    base_runs = [r for r in records if r.variant == baseline]
    if base_runs:
        color = "0.35"
        for seed in sorted({r.seed for r in base_runs}):
            points = frontier_points(base_runs, seed, baseline)
            ax.plot([p.seconds for p in points], [100 * p.accuracy for p in points], color=color, alpha=0.35,
                    linewidth=1, zorder=1)
        budgets = sorted({r.budget for r in base_runs})
        xs, ys = [], []
        for budget in budgets:
            at = [r for r in base_runs if r.budget == budget]
            xs.append(median([r.train_seconds for r in at]))
            ys.append(100 * sum(r.test_accuracy for r in at) / len(at))
        ax.plot(xs, ys, color=color, linewidth=2.2, marker="o", zorder=2,
                label=f"{baseline} at budgets {', '.join(f'{b:g}' for b in budgets)}: the frontier")
        for x, y, budget in zip(xs, ys, budgets):
            ax.annotate(f"{budget:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7, color=color)
        ax.scatter([r.train_seconds for r in base_runs], [100 * r.test_accuracy for r in base_runs], color=color,
                   alpha=0.45, s=22, zorder=2)
        low = min(low, *(100 * r.test_accuracy for r in base_runs))
        high = max(high, *(100 * r.test_accuracy for r in base_runs))
    index = 0
    for row in summary:
        if row["variant"] == baseline:
            continue
        color = colors[index % len(colors)]
        index += 1
        runs = [r for r in records if r.variant == row["variant"] and r.budget == 1.0]
        seconds = [r.train_seconds for r in runs]
        accuracy = [100 * r.test_accuracy for r in runs]
        ax.scatter(seconds, accuracy, color=color, alpha=0.5, s=28, zorder=3)
        mean_accuracy, accuracy_half = mean_ci95(accuracy)
        half = accuracy_half or 0.0
        low, high = min(low, *accuracy, mean_accuracy - half), max(high, *accuracy, mean_accuracy + half)
        verdict = row["verdict"] or "n/a"
        delta = "" if row["equal_time_delta"] is None else f" ({100 * row['equal_time_delta']:+.1f} pt)"
        label = f"{row['variant']}: {row['speedup']:.2f}x, {mean_accuracy:.1f}%, {verdict}{delta}"
        ax.errorbar(row["median_train_seconds"], mean_accuracy, yerr=accuracy_half, color=color, marker="D",
                    markersize=8, capsize=4, linewidth=1.5, label=label, zorder=4)
    # Accuracy lies in [0, 100]; a CI from few seeds may reach past it.
    pad = max(0.5, 0.05 * (high - low))
    ax.set_ylim(max(0.0, low - pad), min(100.0, high) + pad)
    ax.set_xlim(left=0)
    ax.set_xlabel("training wall time per run (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(textwrap.fill(title, 100), fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(title="variant: speedup, mean accuracy, equal-time verdict", fontsize=7, title_fontsize=7,
              loc="lower right")
    fig.text(0.99, 0.005, "dots: runs; thin lines: each seed's frontier; diamonds: median time, mean accuracy "
             "with 95% CI", ha="right", fontsize=6.5, alpha=0.7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
