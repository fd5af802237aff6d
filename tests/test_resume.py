"""Checkpoint at step k, resume in a new process: bit-identical to an uninterrupted run."""

import json
import os
import subprocess
import sys

import pytest
import torch

WORKER = os.path.join(os.path.dirname(__file__), "_resume_worker.py")
# k before freezing starts, exactly at a freeze event, after several events
CASES = {"convbn_sgd_epoch": [2, 6, 9], "encoder_adamw_step": [2, 4, 10]}


def _run(*args):
    result = subprocess.run([sys.executable, WORKER, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def _equal(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _equal(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.slow  # a subprocess per run
@pytest.mark.parametrize("config", sorted(CASES))
def test_resume_in_new_process_is_bit_identical(config, tmp_path):
    ks = CASES[config]
    _run(config, tmp_path, "full", ",".join(map(str, ks)))
    history = json.loads((tmp_path / "history.json").read_text())
    before, at_event, after = ks
    assert history[before - 1] == 0 and history[-1] > 0
    assert history[at_event - 1] > history[at_event - 2]  # a freeze event happens at step k
    assert len(set(history[:after])) >= 3  # several events before k
    for k in ks:
        _run(config, tmp_path, "resume", k)
    full = torch.load(tmp_path / "final_full.pt", weights_only=False)
    for k in ks:
        resumed = torch.load(tmp_path / f"final_resume{k}.pt", weights_only=False)
        _equal(full["model"], resumed["model"], f"k={k} model")
        _equal(full["opt"], resumed["opt"], f"k={k} optimizer")
        _equal(full["freezing"], resumed["freezing"], f"k={k} freezing")
