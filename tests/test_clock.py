"""The trainer's clock: ``step(steps_done=...)``, ``epoch_end(epochs_done=...)``, ``sync`` and ``duration``.

A plain loop counts calls; an integration passes the trainer's own counts, so that
progress is the run's true progress (a resumed run, an event applied directly).
"""

from __future__ import annotations

import logging

import pytest
import torch

import layerfreeze as lf
from conftest import mlp


def _attached(**options) -> tuple[lf.LayerFreezing, torch.nn.Module]:
    net = mlp(6)  # 6 layers, 5 freezable
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    attach = {key: options.pop(key) for key in ("total_steps", "steps_per_epoch") if key in options}
    freezing = lf.LayerFreezing(**options).attach(net, opt, **{"total_steps": 16, **attach})
    return freezing, net


def _depths_after(freezing: lf.LayerFreezing, calls) -> list[int]:
    out = []
    for call in calls:
        call(freezing)
        out.append(freezing.frozen_depth)
    return out


def test_plain_step_counts_calls():
    freezing, _ = _attached(freeze_start=0.25, interval="step")
    # after step k of 16: int((k/16 - 0.25) / 0.75 * 5)
    assert _depths_after(freezing, [lambda f: f.step()] * 16) == [0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 5]


def test_steps_done_is_the_trainers_count():
    freezing, _ = _attached(freeze_start=0.25, interval="step")
    freezing.step(steps_done=12)  # e.g. the first step seen after a resume
    assert (freezing.frozen_depth, freezing.state_dict()["step"]) == (3, 12)
    freezing.step(steps_done=12)  # no optimizer step since: nothing happens
    assert freezing.state_dict()["step"] == 12
    freezing.step()  # a plain call goes on from the trainer's count
    assert (freezing.frozen_depth, freezing.state_dict()["step"]) == (3, 13)


def test_repeated_count_runs_no_policy_hook():
    calls = []

    class Counting(lf.policies.Linear):
        def after_step(self, progress):
            calls.append(progress.step)

    freezing, _ = _attached(policy=Counting(0.0), interval="step")
    for count in (1, 1, 1, 2, 2, 4):
        freezing.step(steps_done=count)
    assert calls == [1, 2, 4]


def test_duration_overrides_steps_until_the_next_call():
    freezing, _ = _attached(freeze_start=0.0, interval="step")
    freezing.step(steps_done=1, duration=0.8)  # a run measured in samples: 80% done after one batch
    assert freezing.frozen_depth == 4
    freezing.step(steps_done=2)  # no duration: steps / total_steps again, but freezing never shrinks
    assert (freezing.frozen_depth, freezing.frozen_fraction) == (4, 2 / 16)


def test_duration_above_one_is_held_at_one_with_a_warning(caplog):
    freezing, _ = _attached(freeze_start=0.0, interval="step")
    with caplog.at_level(logging.WARNING, logger="layerfreeze"):
        freezing.step(duration=1.25)
    assert freezing.frozen_depth == 5 and freezing.frozen_fraction == 1.0
    assert "progress is held at 1.0" in caplog.text and "HINT:" in caplog.text


def test_epoch_end_with_the_trainers_clock():
    """Composer's own tests apply EPOCH_END to a State at epoch 80 of 100 that saw no batches."""
    freezing, net = _attached(freeze_start=0.05, total_steps=10_000)
    freezing.epoch_end(80, steps_done=0, duration=0.8)
    # (0.8 - 0.05) / 0.95 = 0.789...; int(0.789 * 5) = 3
    assert freezing.frozen_depth == 3
    assert freezing.frozen_parameters == ["0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight"]
    assert freezing.state_dict()["epoch"] == 80


def test_epoch_end_counts_calls_without_a_clock():
    freezing, _ = _attached(freeze_start=0.0)
    for _ in range(4):
        freezing.step()
    freezing.epoch_end()
    freezing.epoch_end()
    assert freezing.state_dict()["epoch"] == 2


def test_sync_sets_the_clock_without_a_decision():
    freezing, _ = _attached(freeze_start=0.0, steps_per_epoch=4)
    freezing.sync(steps_done=9)  # resumed mid-epoch 3
    assert freezing.frozen_depth == 0
    assert (freezing.state_dict()["step"], freezing.state_dict()["epoch"]) == (9, 2)
    # steps 10 and 11 are inside epoch 3; step 12 ends it: int(12/16 * 5) = 3
    assert _depths_after(freezing, [lambda f: f.step()] * 3) == [0, 0, 3]


def test_an_epoch_boundary_jumped_over_decides_once():
    freezing, _ = _attached(freeze_start=0.0, steps_per_epoch=4)
    freezing.step(steps_done=9)  # from 0 to 9: boundaries 4 and 8 passed, one decision
    assert freezing.frozen_depth == 2  # int(9/16 * 5)
    assert freezing.state_dict()["epoch"] == 2


@pytest.mark.parametrize("method, kwargs, message", [
    ("step", {"steps_done": -1}, r"steps_done must be a non-negative int, got -1"),
    ("step", {"steps_done": 2.0}, r"steps_done must be a non-negative int, got 2\.0"),
    ("step", {"steps_done": True}, r"steps_done must be a non-negative int, got True"),
    ("step", {"duration": float("nan")}, r"duration must be a finite number >= 0 \(the elapsed fraction of the run\), got nan"),
    ("step", {"steps_done": 3, "duration": -0.1}, r"duration must be a finite number >= 0 .*got -0\.1"),
    ("epoch_end", {"epochs_done": -2}, r"epochs_done must be a non-negative int, got -2"),
    ("epoch_end", {"epochs_done": 1, "steps_done": "3"}, r"steps_done must be a non-negative int, got '3'"),
    ("sync", {"steps_done": 4, "duration": "half"}, r"duration must be a finite number >= 0 .*got 'half'"),
])
def test_bad_clock_values_are_refused_and_change_nothing(method, kwargs, message):
    freezing, _ = _attached(freeze_start=0.0, interval="step")
    freezing.step()
    before = freezing.state_dict()
    with pytest.raises(ValueError, match=message):
        getattr(freezing, method)(**kwargs)
    assert freezing.state_dict() == before
    freezing.step()  # and the clock still counts on from where it was
    assert freezing.state_dict()["step"] == 2 and freezing.frozen_fraction == 2 / 16


@pytest.mark.parametrize("method", ["step", "epoch_end", "sync"])
def test_clock_calls_before_attach_are_refused(method):
    with pytest.raises(RuntimeError, match=rf"{method}\(\) called before attach\(\)"):
        getattr(lf.LayerFreezing(), method)()
