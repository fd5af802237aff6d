"""Launching a worker script on several local ranks (gloo on 127.0.0.1), for the distributed tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    script: Path,
    out: Path,
    *,
    timeout: float,
    world: int = 2,
    env: Optional[dict[str, str]] = None,
    rank_env: Callable[[int], dict[str, str]] = lambda rank: {"RANK": str(rank)},
    result: str = "rank{rank}.pt",
) -> list[dict]:
    """Run ``script out`` on ``world`` ranks and load what each rank saved in ``out``.

    Each rank runs in its own session and is killed, with anything it started,
    if the ranks have not all finished ``timeout`` seconds after the first wait
    began. The test fails, with every rank's output, when a rank times out,
    exits non-zero or saves nothing.

    Args:
        script: the worker; it gets ``out`` as its one argument.
        out: the folder the ranks save ``result`` in.
        timeout: seconds to wait for each rank.
        world: how many ranks.
        env: variables on top of this process's and the rendezvous ones.
        rank_env: each rank's own variables.
        result: the file each rank saves, ``{rank}`` filled in.
    """
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
                OMP_NUM_THREADS="1", **(env or {}))
    base.pop("TORCH_DISTRIBUTED_DEBUG", None)  # its extra checks and logs are not what the tests compare
    procs = [subprocess.Popen([sys.executable, str(script), str(out)], env=dict(base, **rank_env(rank)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for rank in range(world)]
    logs: list[str] = []
    timed_out = False
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if timed_out:
        logs += [proc.communicate()[0] for proc in procs[len(logs):]]
        pytest.fail(f"{script.name} did not finish in {timeout}s:\n" + "\n".join(logs))
    results = []
    for rank, proc in enumerate(procs):
        path = out / result.format(rank=rank)
        if proc.returncode != 0 or not path.exists():
            pytest.fail(f"rank {rank} exited with {proc.returncode}:\n" + "\n".join(logs))
        results.append(torch.load(path, weights_only=False))
    return results
