"""Composer's own DDP on 2 CPU ranks (gloo) with layerfreeze's LayerFreezing (tests/_dist_composer.py).

The algorithm reports ``find_unused_parameters=False`` where layerfreeze rebuilds DDP's
reducer, so Composer builds DDP without it: the ranks must train through every freeze
(no "Expected to have finished reduction" error) and end with the same weights.
Each rank runs in its own session, killed after ``TIMEOUT`` seconds.
"""

from __future__ import annotations

from pathlib import Path

import _dist
import pytest
import torch

pytest.importorskip("composer", reason="composer (PyPI mosaicml) is not installed here; `make test` runs this file in .venv-composer")
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = Path(__file__).with_name("_dist_composer.py")
TIMEOUT = 180


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("composer")
    return _dist.launch(SCRIPT, out, timeout=TIMEOUT, env={"LOCAL_WORLD_SIZE": "2", "NODE_RANK": "0"},
                        rank_env=lambda r: {"RANK": str(r), "LOCAL_RANK": str(r)}, result="composer-rank{rank}.pt")


def test_composer_builds_ddp_without_find_unused_parameters(results):
    assert [(r["is_ddp"], r["find_unused_parameters"]) for r in results] == [(True, False), (True, False)]


def test_ranks_freeze_alike_and_end_identical(results):
    r0, r1 = results
    # 16 samples over 2 ranks, batch 4: 2 steps an epoch, 8 in all; depths at epoch ends 1/4..4/4
    assert r0["steps"] == r1["steps"] == 8
    assert r0["depths"] == r1["depths"] == [0, 1, 3, 5]
    assert r0["frozen"] == r1["frozen"] == [f"module.module.{i}.{k}" for i in (0, 2, 4, 6, 8) for k in ("bias", "weight")]
    assert r0["params"].keys() == r1["params"].keys()
    for name, value in r0["params"].items():
        assert torch.equal(value, r1["params"][name]), name
