"""Lightning's DDP strategy on 2 CPU ranks with freezing (tests/_dist_lightning.py).

Lightning starts rank 1 itself, by running the script again; the test starts
rank 0 in a new session and kills the whole session after ``TIMEOUT`` seconds,
so neither rank can outlive it. Tolerance against one process over the same
global batches: ``atol=1e-6`` after 8 steps, as in tests/test_distributed.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = Path(__file__).with_name("_dist_lightning.py")
TIMEOUT = 180


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lightning")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log = proc.communicate(timeout=TIMEOUT)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log = proc.communicate()[0]
        pytest.fail(f"Lightning DDP run did not finish in {TIMEOUT}s:\n{log}")
    if proc.returncode != 0:
        pytest.fail(f"Lightning DDP run exited with {proc.returncode}:\n{log}")
    return out


def _load(out: Path, mode: str) -> tuple[dict, dict]:
    paths = [out / f"lightning-{mode}-rank{rank}.pt" for rank in (0, 1)]
    if not all(p.exists() for p in paths):
        pytest.fail(f"no results for mode {mode!r}")
    return tuple(torch.load(p, weights_only=False) for p in paths)


def _check(r0: dict, r1: dict) -> None:
    ref = r0["reference"]
    assert r0["frozen"] == r1["frozen"] == ref["frozen"] != []
    for name, value in r0["params"].items():
        assert torch.equal(value, r1["params"][name]), name
        torch.testing.assert_close(value, ref["params"][name], atol=1e-6, rtol=0, msg=name)


def test_lightning_ddp_with_layerfreezing_on_the_wrapped_model(runs):
    r0, r1 = _load(runs, "direct")
    assert r0["depths"] == r1["depths"] == r0["reference"]["depths"]
    _check(r0, r1)


def test_lightning_ddp_with_the_lightning_callback(runs):
    pytest.importorskip("layerfreeze.integrations.lightning",
                        reason="LayerFreezingCallback is not importable")
    _check(*_load(runs, "callback"))
