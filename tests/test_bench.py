"""The bench package in-process: variants, statistics, data, model resolution, runs, plan, reports."""

from __future__ import annotations

import json
import math
import statistics
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
from layerfreeze.schedule import depth_for_fraction, linear_fraction

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
    # Decisions at epoch ends: depth int(fraction * 4) with fraction (t - 0.1) / 0.9.
    expected = [[1, 0]]
    for epoch in (1, 2, 3):
        depth = depth_for_fraction(linear_fraction(epoch / 4, 0.1, 1.0), 5)
        if depth != expected[-1][1]:
            expected.append([epoch * spe + 1, depth])
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
    decisions = range(spe, steps, spe) if interval == "epoch" else range(1, steps)
    depth, expected = 0, [0] * steps
    for step in range(1, steps):
        if step in decisions:
            depth = max(depth, depth_for_fraction(linear_fraction(step / steps, 0.25, 1.0), count))
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
