"""What ``layerfreeze bench`` hands back: a table, a results JSON and a PNG.

Results JSON (``bench.json``, format ``"layerfreeze-bench/1"``)::

    {
      "format": "layerfreeze-bench/1",
      "created": "2025-01-01T12:00:00+00:00",     # UTC, ISO 8601
      "interrupted": false,                       # true after Ctrl-C: only finished runs
      "command": ["layerfreeze", "bench", ...],
      "config": {
        "model": "resnet20", "epochs": 5, "batch_size": 128, "steps_per_epoch": 12,
        "total_steps": 60, "seeds": [0, 1, 2], "interval": "epoch", "lr": 0.1,
        "optimizer": "SGD(momentum=0.9, nesterov, weight_decay=0.0005), cosine LR",
        "threads": 2, "quick": false,
        "data": {"name": "digits", "train_size": 1437, "test_size": 360,
                 "input_shape": [1, 32, 32], "input_dtype": "float32", "num_classes": 10},
        "variants": [{"name": "none", "description": "..."}, ...]
      },
      "environment": {"python": "3.12.3", "torch": "2.13.0+cpu", "layerfreeze": "0.1.0",
                      "platform": "Linux-...", "machine": "x86_64", "processor": "...",
                      "cpu_count": 2, "threads": 2},
      "runs": [                                   # one per finished run, in run order
        {"variant": "composer", "seed": 0,
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
         "predicted_speedup": 1.12}               # the performance model of docs/performance.md, from the steps' depths
      ],
      "summary": [                                # one per variant with runs
        {"variant": "composer", "runs": 3, "baseline": "none",
         "median_train_seconds": 40.9,
         "speedup": 1.14,                         # baseline median / this median
         "median_train_cpu_seconds": 40.5,
         "cpu_speedup": 1.12,                     # the same with CPU time
         "accuracy_mean": 0.97, "accuracy_ci95": 0.01,   # half-width; null with one run
         "frozen_layer_share_end": 0.58, "frozen_flops_share_end": 0.41,
         "predicted_speedup": 1.12}
      ]
    }
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
from .stats import mean_ci95

__all__ = ["FORMAT", "environment", "results_document", "write_json", "render_table", "plot_runs"]

FORMAT = "layerfreeze-bench/1"


def environment(threads: int) -> dict[str, Any]:
    """Where the numbers were measured."""
    from .. import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "layerfreeze": __version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
    }


def results_document(config: dict[str, Any], records: Sequence[RunRecord], summary: list[dict[str, Any]],
                     threads: int, interrupted: bool, argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """The results JSON as a dict (see the module docstring for the schema)."""
    return {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "interrupted": interrupted,
        "command": ["layerfreeze", *(sys.argv[1:] if argv is None else argv)],
        "config": config,
        "environment": environment(threads),
        "runs": [record.to_json() for record in records],
        "summary": summary,
    }


def write_json(document: dict[str, Any], path: str) -> None:
    """Write ``document`` to ``path`` (through a temporary file, so a reader never sees half)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, allow_nan=False)
        handle.write("\n")
    os.replace(tmp, path)


def _accuracy_text(row: dict[str, Any]) -> str:
    mean = 100 * row["accuracy_mean"]
    if row["accuracy_ci95"] is None:
        return f"{mean:.1f}% (CI n/a, 1 run)"
    return f"{mean:.1f}% ± {100 * row['accuracy_ci95']:.1f}"


def render_table(summary: Sequence[dict[str, Any]], title: str) -> Any:
    """A rich Table of the summary rows."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("variant")
    table.add_column("runs", justify="right")
    table.add_column("median time", justify="right")
    table.add_column("speedup", justify="right")
    table.add_column("CPU-time speedup", justify="right")
    table.add_column("predicted", justify="right")
    table.add_column("test accuracy (95% CI)", justify="right")
    table.add_column("frozen at end (layers / FLOPs)", justify="right")
    for row in summary:
        table.add_row(
            row["variant"],
            str(row["runs"]),
            f"{row['median_train_seconds']:.{1 if row['median_train_seconds'] >= 10 else 2}f} s",
            f"{row['speedup']:.2f}x",
            f"{row['cpu_speedup']:.2f}x",
            f"{row['predicted_speedup']:.2f}x",
            _accuracy_text(row),
            f"{100 * row['frozen_layer_share_end']:.0f}% / {100 * row['frozen_flops_share_end']:.0f}%",
        )
    return table


def plot_runs(records: Sequence[RunRecord], summary: Sequence[dict[str, Any]], path: str, title: str) -> None:
    """Accuracy against training time: one point per run; per variant, the mean accuracy
    with its 95% CI at the median time (the figure speedups come from)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    low, high = 100.0, 0.0
    for index, row in enumerate(summary):
        color = colors[index % len(colors)]
        runs = [r for r in records if r.variant == row["variant"]]
        seconds = [r.train_seconds for r in runs]
        accuracy = [100 * r.test_accuracy for r in runs]
        ax.scatter(seconds, accuracy, color=color, alpha=0.45, s=28, zorder=2)
        mean_accuracy, accuracy_half = mean_ci95(accuracy)
        half = accuracy_half or 0.0
        low, high = min(low, *accuracy, mean_accuracy - half), max(high, *accuracy, mean_accuracy + half)
        # x: the median time, the figure the speedup is computed from.
        label = f"{row['variant']}: {row['speedup']:.2f}x, {mean_accuracy:.1f}%"
        ax.errorbar(row["median_train_seconds"], mean_accuracy, yerr=accuracy_half, color=color, marker="D",
                    markersize=8, capsize=4, linewidth=1.5, label=label, zorder=3)
    # Accuracy lies in [0, 100]; a CI from few seeds may reach past it.
    pad = max(0.5, 0.05 * (high - low))
    ax.set_ylim(max(0.0, low - pad), min(100.0, high) + pad)
    ax.set_xlim(left=0)
    ax.set_xlabel("training wall time per run (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(title="variant: speedup, mean accuracy", fontsize=8, title_fontsize=8, loc="lower left")
    fig.text(0.99, 0.01, "dots: runs; diamonds: median time, mean accuracy with 95% CI", ha="right",
             fontsize=7, alpha=0.7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
