"""Where a bench runs: device choice, mixed precision, clocks and peak memory.

CUDA kernels run asynchronously: a clock read while kernels are still queued
measures the queue, not the work. :class:`Clock` synchronizes the device before
every read. Peak memory is what a run adds: on a GPU the peak of
``torch.cuda.max_memory_allocated`` (reset when the run starts); on the CPU the
growth of the process's peak resident set size over its size at the start (on
Linux the peak is reset through ``/proc/self/clear_refs``, so each run reports its
own peak; elsewhere the figure is not available). Before the start is read, memory
that earlier runs freed is handed back to the system (``malloc_trim`` on glibc):
otherwise a run would reuse it unseen, and report only the growth beyond the
largest run before it. (Those pages then fault back in during the run, a cost
every run pays alike.)
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import time
from typing import Any, Callable, Optional

import torch

__all__ = ["resolve_device", "autocast", "Clock", "MemoryMeter", "device_environment", "PRECISIONS"]

PRECISIONS = ("fp32", "bf16")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``.

    Raises:
        ValueError: for another name, or ``"cuda"`` on a machine without a usable GPU.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            built = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device cuda: {built} (torch {torch.__version__}); use --device cpu or --device auto")
        return torch.device("cuda")
    raise ValueError(f"--device must be one of auto, cpu, cuda, got {name!r}")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass: bf16 autocast, or nothing for fp32.

    Raises:
        ValueError: for a precision other than fp32 / bf16.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


class Clock:
    """Wall and process-CPU time, with the device synchronized before each read."""

    def __init__(self, device: torch.device):
        self.device = device

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wall(self) -> float:
        """``time.perf_counter()`` once the device's queued work is done."""
        self._sync()
        return time.perf_counter()

    def both(self) -> tuple[float, float]:
        """``(perf_counter, process_time)`` read together, after one synchronization."""
        self._sync()
        return time.perf_counter(), time.process_time()


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    try:
        return ctypes.CDLL(None).malloc_trim  # the C library this process already runs on
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None


def _release_freed_memory() -> None:
    """Return the C heap's free pages to the system (glibc; elsewhere a no-op); the harness
    collects garbage just before."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class MemoryMeter:
    """Peak memory of one run, in bytes: call :meth:`start` before it and :meth:`peak` after."""

    def __init__(self, device: torch.device):
        self.device = device
        self._base: Optional[int] = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = 0  # max_memory_allocated counts everything allocated, weights included
            return
        self._base = None
        _release_freed_memory()
        rss = _status_kib("VmRSS")
        try:
            # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
            with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")
        except OSError:
            return
        self._base = rss * 1024 if rss is not None else None

    def peak(self) -> Optional[int]:
        """Bytes: the GPU's peak allocation during the run, or the CPU's peak RSS growth;
        None where it cannot be measured."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self._base is None:
            return None
        high = _status_kib("VmHWM")
        return None if high is None else max(0, high * 1024 - self._base)

    @property
    def kind(self) -> str:
        """What :meth:`peak` measures, for the results JSON."""
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated"
        return "peak RSS growth"


def device_environment(device: torch.device, precision: str) -> dict[str, Any]:
    """The device, precision, GPU name and CUDA version (None on the CPU) for the results JSON."""
    on_gpu = device.type == "cuda"
    return {
        "device": str(device),
        "precision": precision,
        "gpu": torch.cuda.get_device_name(device) if on_gpu else None,
        "cuda": torch.version.cuda if on_gpu else None,
        "cpu_count": os.cpu_count(),
    }
