"""Progressive layer freezing under DistributedDataParallel, default settings.

Run it with torchrun (CPU and gloo here; CUDA and NCCL when GPUs are present)::

    torchrun --nproc_per_node 2 examples/ddp_train.py
    # the same run, stopped after 2 epochs and resumed from rank 0's checkpoint:
    torchrun --nproc_per_node 2 examples/ddp_train.py --stop-after 2
    torchrun --nproc_per_node 2 examples/ddp_train.py --resume

Each rank trains on its shard of a synthetic data set; LayerFreezing freezes the
leading layers at epoch ends and rebuilds DDP's gradient reducer in place, so
the frozen layers are neither waited for nor all-reduced. Rank 0 writes a
checkpoint holding the model, the optimizer and the freezing state.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import layerfreeze as lf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--checkpoint", default="ddp_checkpoint.pt")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--stop-after", type=int, default=None, help="stop after this many epochs")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(1)

    torch.manual_seed(0)  # same data and initial weights on every rank
    data = TensorDataset(torch.randn(512, 32), torch.randint(0, 4, (512,)))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=16, sampler=sampler)
    model = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4),
    ).to(device)
    ddp = DDP(model, device_ids=[device.index] if use_cuda else None)  # default settings
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    freezing = lf.LayerFreezing(freeze_start=0.25, freeze_level=1.0, interval="epoch")
    freezing.attach(ddp, opt, total_steps=args.epochs * len(loader), steps_per_epoch=len(loader))
    start_epoch = 0
    if args.resume:
        state = torch.load(args.checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        freezing.load_state_dict(state["freezing"])  # before the optimizer's state
        opt.load_state_dict(state["opt"])
        start_epoch = state["epoch"]

    stop = args.epochs if args.stop_after is None else min(args.stop_after, args.epochs)
    for epoch in range(start_epoch, stop):
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = nn.functional.cross_entropy(ddp(x.to(device)), y.to(device))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            freezing.step()  # freezes at epoch ends (steps_per_epoch given)
        if rank == 0:
            print(f"epoch {epoch}: loss {loss.item():.4f}, frozen layers {freezing.frozen_depth} "
                  f"of {len(freezing.layers)}, frozen parameters {freezing.frozen_parameters}", flush=True)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "freezing": freezing.state_dict(), "epoch": epoch + 1}, args.checkpoint)
        dist.barrier()  # the checkpoint is complete before anyone may read it

    # Every rank holds the same weights (a check for this example, not needed in training).
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    if rank == 0:
        agree = all(torch.equal(g, gathered[0]) for g in gathered)
        print(f"ranks agree: {agree}; weight checksum {checksum.item():.12f}")
    # Release DDP (its reducer holds gloo work) before the process group: with gloo,
    # a reducer that outlives destroy_process_group can abort the process at exit.
    del freezing, ddp
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
