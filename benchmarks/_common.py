"""Helpers shared by the benchmark scripts in this folder.

Timing rule of the project (the performance model of docs/performance.md): every speed figure is a ratio of
medians measured side by side in one run, with the variants interleaved so that
noise from other processes hits them alike.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import socket
import statistics
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

__all__ = [
    "CLOCKS",
    "set_threads",
    "interleaved_medians",
    "interleaved_times",
    "paired_ratio",
    "no_grad_until",
    "first_forward",
    "saved_bytes",
    "backward_nodes",
    "grad_bytes",
    "optimizer_state_bytes",
    "table",
    "fmt_ratio",
    "launch_ranks",
    "init_rank",
    "slowest_medians",
]


def set_threads(threads: int) -> None:
    """Fix torch's intra-op threads, so every variant runs on the same cores."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def interleaved_times(
    variants: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1, clock: str = "cpu"
) -> dict[str, list[float]]:
    """Seconds of each callable in each of ``repeats`` rounds that run every variant once.

    The order inside a round rotates, so no variant always runs first (after a
    pause) or last. ``warmup`` untimed rounds run first. ``clock="cpu"`` measures
    the process's CPU time (the work done, all threads together), which other
    tenants of a shared machine disturb far less than ``"wall"`` time.
    """
    now = CLOCKS[clock]
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = now()
            variants[name]()
            times[name].append(now() - start)
    return times


def interleaved_medians(
    variants: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1, clock: str = "cpu"
) -> dict[str, float]:
    """Median seconds of each callable over interleaved rounds (see :func:`interleaved_times`)."""
    times = interleaved_times(variants, repeats, warmup, clock)
    return {name: statistics.median(values) for name, values in times.items()}


def paired_ratio(times: Mapping[str, Sequence[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of ``numerator``'s time divided by ``denominator``'s in the same round.

    The two ran in the same round, moments apart, so load that comes and goes on
    a shared machine hits both alike and cancels in the ratio, which the ratio of
    two medians (each over all rounds) does not do.
    """
    return statistics.median(n / d for n, d in zip(times[numerator], times[denominator]))


@contextlib.contextmanager
def no_grad_until(model: nn.Module, boundary: Optional[nn.Module]) -> Iterator[None]:
    """Run the forward pass of ``model`` under ``torch.no_grad()`` up to ``boundary``'s output.

    The hand-written limit of freezing: the frozen prefix runs without autograd
    at all, and gradients are enabled again as ``boundary`` returns. Grad mode is
    thread-local state, so switching it from hooks is the same as wrapping the
    prefix's code in ``with torch.no_grad():`` (which needs the model split in
    two by hand). ``boundary=None`` means nothing is frozen.
    """
    if boundary is None:
        yield
        return

    def start(module: nn.Module, args: Any) -> None:
        torch.set_grad_enabled(False)

    def stop(module: nn.Module, args: Any, output: Any) -> None:
        torch.set_grad_enabled(True)

    handles = [model.register_forward_pre_hook(start), boundary.register_forward_hook(stop)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        torch.set_grad_enabled(True)


def first_forward(model: nn.Module, *inputs: Any) -> None:
    """One training forward of the whole model after ``LayerFreezing.attach``; buffers restored.

    The library may watch the model's first training forward (execution-order
    tracing; detection of reentrant activation checkpointing on models that may
    checkpoint) and until then keep hooks on layers. A training loop calls the
    model anyway; code that only calls parts of it (``PrefixCache`` stages) should
    do this once.
    """
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    was_training = model.training
    model.train()
    with torch.enable_grad():
        model(*inputs)
    model.train(was_training)
    with torch.no_grad():
        for buffer, copy in saved:
            buffer.copy_(copy)


def saved_bytes(fn: Callable[[], torch.Tensor], model: Optional[nn.Module] = None) -> tuple[torch.Tensor, int]:
    """Run ``fn`` (a forward pass) and count the bytes autograd saves for backward.

    Saved activations are what freezing frees beside gradients and optimizer
    state; each storage is counted once (parameters saved by reference are
    excluded when ``model`` is given, since they exist anyway).
    """
    seen: set[int] = set()
    total = 0
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()} if model is not None else set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        try:
            ptr = tensor.untyped_storage().data_ptr()
        except RuntimeError:
            return tensor
        if ptr not in seen and ptr not in param_ptrs:
            seen.add(ptr)
            total += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def backward_nodes(output: torch.Tensor) -> int:
    """Number of autograd nodes behind ``output``: the work backward will do, counted, not timed."""
    seen: set[Any] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


def grad_bytes(model: nn.Module) -> int:
    """Bytes held by ``.grad`` tensors of ``model``'s parameters."""
    return sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of tensors in the optimizer's per-parameter state (momentum, Adam moments)."""
    return sum(
        value.nbytes
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    )


def fmt_ratio(value: float) -> str:
    return f"{value:.3f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (what docs/performance.md shows)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


RankMain = Callable[[int, int, argparse.Namespace], None]


def _spawned(rank: int, main: RankMain, world: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    main(rank, world, args)


def launch_ranks(main: RankMain, args: argparse.Namespace) -> None:
    """Run ``main(rank, world, args)`` on every rank: the ranks torchrun gives, or ``args.world`` spawned here.

    Spawned ranks meet on a free port of 127.0.0.1. ``main`` must be a module-level
    function (the spawned processes import it).
    """
    if "RANK" in os.environ:  # under torchrun
        main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(main, args.world, args, port), nprocs=args.world, join=True)


def init_rank(rank: int, world: int, threads: int) -> None:
    """Fix this rank's torch threads and join the gloo group (collectives time out after 120 s)."""
    set_threads(threads)
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))


def slowest_medians(steps: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each callable over interleaved rounds on this rank, then the largest over the ranks.

    Every rank runs the same steps; the slowest rank sets the pace of a
    synchronous step, so its median is the one reported.
    """
    medians = interleaved_medians(steps, repeats)
    times = torch.tensor([medians[name] for name in steps], dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    return dict(zip(steps, times.tolist()))
