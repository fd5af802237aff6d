"""Convergence under DDP: ranks that captured different probes still decide alike.

Two gloo processes, each training the same DDP model on its own batches; each
rank's Convergence captures its own first batch as the probe, so the similarities
differ per rank. The all-reduce (MIN) must make the depths identical, or the DDP
reducer would be rebuilt differently on each rank.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

WORKER = textwrap.dedent(
    """
    import gc, json, os, sys
    import torch, torch.distributed as dist
    from torch import nn
    import layerfreeze as lf

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 2))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    policy = lf.policies.Convergence(threshold=0.9999, every=2, max_samples=8)
    freezing = lf.LayerFreezing(policy=policy, interval="step").attach(ddp, opt, total_steps=16)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data, hence its own probe
    depths = []
    for step in range(16):
        ddp(torch.randn(8, 6, generator=gen) * (1 + rank)).pow(2).mean().backward()
        opt.step(); opt.zero_grad(); freezing.step()
        depths.append(freezing.frozen_depth)
    probe = freezing.state_dict()["policy"]["probe"][0][0]
    print(json.dumps({"depths": depths, "probe_sum": float(probe.sum()),
                      "weights": float(sum(p.double().sum() for p in model.parameters()))}))
    # No DDP reducer may outlive the process group: gloo can abort at exit otherwise.
    # DDP holds reference cycles, so del alone does not free it.
    del ddp, freezing, policy
    gc.collect()
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_convergence_decides_alike_on_every_rank_with_different_probes():
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER], env=dict(env, RANK=str(rank)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-2000:]
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    r0, r1 = outputs
    assert r0["probe_sum"] != r1["probe_sum"]  # the ranks did probe different batches
    assert r0["depths"] == r1["depths"] and r0["depths"][-1] > 0
    assert r0["weights"] == pytest.approx(r1["weights"], rel=0, abs=0)
