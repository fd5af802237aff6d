"""Keep data-parallel training consistent when the trainable set changes.

DistributedDataParallel (DDP) builds its gradient reducer once, at wrap time,
from the parameters that require grad then. Freezing later breaks it: with the
default ``find_unused_parameters=False`` the reducer waits for gradients that
never come ("Expected to have finished reduction in the prior iteration");
Composer's answer, ``find_unused_parameters=True``, walks the autograd graph at
every step and still all-reduces the frozen parameters' buckets (zeros). And a
parameter unfrozen after wrapping is not in the reducer at all, so its gradients
are never averaged and the ranks drift apart silently.

What this module does, called by :class:`layerfreeze.LayerFreezing`:

* at attach (:func:`on_attach`): rejects set-ups that cannot
  work (FSDP1 without ``use_orig_params``), checks that this torch exposes the DDP
  internals used below, and falls back with a warning where it does not;
* after every change (:func:`on_trainable_change`): all ranks compare a
  fingerprint of their trainable set (an error, never a silent divergence, if they
  differ), the reducer is rebuilt in place from the parameters that require grad
  now, the same way DDP's own ``__setstate__`` rebuilds it (so the user keeps the
  same DDP object; frozen parameters are neither waited for nor all-reduced), and
  parameters thawed since the last change are broadcast from rank 0;
* at every decision, when ``TORCH_DISTRIBUTED_DEBUG`` is ``INFO`` or ``DETAIL``
  (:func:`check_agreement`): ranks compare their step and depth, catching a
  disagreement on *when* to change before it reaches the reducer.

FSDP2 (``fully_shard``) follows ``requires_grad`` changes by itself and needs
nothing here; FSDP1 needs ``use_orig_params=True`` (see docs/distributed.md).

ZeroRedundancyOptimizer keeps a local optimizer over this rank's share of the
parameters and the partition that assigned them: :func:`sync_zero` makes both
follow each change of its param groups. DeepSpeed engines fix the trainable set
at ``deepspeed.initialize`` and are refused (:func:`check_deepspeed`).
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
import weakref
import zlib
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

__all__ = [
    "is_ddp",
    "check_model",
    "on_attach",
    "on_trainable_change",
    "check_agreement",
    "rebuild_unsupported_reason",
    "torch_rebuild_unsupported_reason",
    "check_deepspeed",
    "check_optimizer",
    "is_zero",
    "remember_partition",
    "sync_zero",
]

log = logging.getLogger("layerfreeze")

# DDP methods the in-place rebuild calls; present with these signatures from
# torch 1.12 (when _build_params_for_reducer stopped returning per-device
# lists) through 2.13. Checked by name and signature, not by version string.
_INTERNALS = {
    "_build_params_for_reducer": (),
    "_build_debug_param_to_name_mapping": ("parameters",),
    "_ddp_init_helper": ("parameters", "expect_sparse_gradient", "param_to_name_mapping", "static_graph"),
}


@dataclass
class _State:
    """What we know about one DDP wrapper between changes."""

    rebuild: bool
    # id() of the parameters requiring grad after the last change (to find thawed ones).
    trainable: set[int] = field(default_factory=set)


_STATES: "weakref.WeakKeyDictionary[nn.Module, _State]" = weakref.WeakKeyDictionary()


def is_ddp(model: nn.Module) -> bool:
    """Whether ``model`` is a ``torch.nn.parallel.DistributedDataParallel`` wrapper."""
    return isinstance(model, nn.parallel.DistributedDataParallel)


def _fsdp1_class() -> Optional[type]:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - builds without FSDP
        return None
    return FullyShardedDataParallel


def check_model(model: nn.Module) -> None:
    """Reject distributed wrappers that freezing cannot work with; changes nothing.

    Raises:
        ValueError: for a model holding FSDP1 (``FullyShardedDataParallel``)
            units built with ``use_orig_params=False``: their parameters are
            flattened into ``FlatParameter`` s, so no layer owns a parameter that
            could be frozen on its own.
    """
    fsdp = _fsdp1_class()
    if fsdp is None:
        return
    for name, module in model.named_modules():
        if isinstance(module, fsdp) and not getattr(module, "_use_orig_params", True):
            raise ValueError(
                f"model holds FullyShardedDataParallel unit {name or '<root>'!r} with "
                "use_orig_params=False; its parameters are flattened, so layers cannot be "
                "frozen one by one. HINT: wrap with FullyShardedDataParallel(..., "
                "use_orig_params=True), or use FSDP2's torch.distributed.fsdp.fully_shard"
            )


def torch_rebuild_unsupported_reason() -> Optional[str]:
    """Why this torch cannot rebuild any DDP reducer in place, or None when it can.

    The part of :func:`rebuild_unsupported_reason` known before a model is wrapped
    (trainers that choose ``find_unused_parameters`` up front, as Composer does).
    """
    for name, args in _INTERNALS.items():
        method = getattr(nn.parallel.DistributedDataParallel, name, None)
        if method is None:
            return f"this torch ({torch.__version__}) has no DistributedDataParallel.{name}"
        if args and tuple(inspect.signature(method).parameters)[1 : len(args) + 1] != args:
            return f"DistributedDataParallel.{name} has an unexpected signature in torch {torch.__version__}"
    return None


def rebuild_unsupported_reason(ddp: nn.parallel.DistributedDataParallel) -> Optional[str]:
    """Why the reducer of ``ddp`` cannot be rebuilt in place, or None when it can."""
    for name, args in _INTERNALS.items():
        method = getattr(ddp, name, None)
        if method is None:
            return f"this torch ({torch.__version__}) has no DistributedDataParallel.{name}"
        if args and tuple(inspect.signature(method).parameters)[: len(args)] != args:
            return f"DistributedDataParallel.{name} has an unexpected signature in torch {torch.__version__}"
    if not hasattr(ddp, "reducer") or not hasattr(ddp, "_comm_hooks"):
        return f"this torch ({torch.__version__}) keeps DDP's reducer in an unknown place"
    if getattr(ddp, "_use_python_reducer", False):
        return "DDP runs the compiled (python_reducer) path"
    if getattr(ddp, "_delay_all_reduce_params", None):
        return "DDP was built with delay_all_reduce_named_params"
    if getattr(ddp, "mixed_precision", None) is not None:
        return "DDP was built with mixed_precision"
    if any(hasattr(p, "_in_backward_optimizers") for p in ddp.module.parameters()):
        return "an optimizer runs in backward (_apply_optimizer_in_backward)"
    hook_name = _logged_comm_hook(ddp)
    if hook_name and not ddp._comm_hooks:
        return f"a built-in communication hook ({hook_name}) is registered and cannot be re-registered"
    if any(_keyed_by_bucket(state) for _, state in ddp._comm_hooks):
        return "the communication hook keeps state per bucket index (PowerSGD), which a rebuild reorders"
    return None


def _keyed_by_bucket(hook_state: object) -> bool:
    try:
        from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState
    except ImportError:  # pragma: no cover
        return False
    return isinstance(hook_state, PowerSGDState)


def _logged_comm_hook(ddp: nn.parallel.DistributedDataParallel) -> str:
    try:
        return str(ddp._get_ddp_logging_data().get("comm_hook", "") or "")
    except Exception:  # pragma: no cover - logging data is best effort
        return ""


def _trainable_ids(ddp: nn.parallel.DistributedDataParallel) -> set[int]:
    ignored = getattr(ddp, "parameters_to_ignore", set())
    return {id(p) for n, p in ddp.module.named_parameters() if p.requires_grad and n not in ignored}


def _reducer_size(ddp: nn.parallel.DistributedDataParallel) -> Optional[tuple[int, int]]:
    # (tensors, bytes) the reducer was built over, from DDP's own logging data.
    try:
        data = ddp._get_ddp_logging_data()
        return int(data["num_parameter_tensors"]), int(data["total_parameter_size_bytes"])
    except Exception:  # pragma: no cover - older torch without these fields
        return None


def _trainable_size(ddp: nn.parallel.DistributedDataParallel) -> tuple[int, int]:
    ids = _trainable_ids(ddp)
    params = {id(p): p for p in ddp.module.parameters() if id(p) in ids}.values()
    return len(params), sum(p.numel() * p.element_size() for p in params)


def on_attach(model: nn.Module) -> None:
    """Check ``model`` and, for DDP, choose how to handle changes of its trainable set.

    Called by ``LayerFreezing.attach`` after every other check, before anything
    changes. For DDP it runs collectives only when ``requires_grad`` was changed
    after wrapping (then the reducer is rebuilt and parameters broadcast from
    rank 0 at once).

    Raises:
        ValueError: from :func:`check_model` (FSDP1 without ``use_orig_params``);
            when ``model`` is DDP with ``find_unused_parameters=False`` and its
            reducer cannot be rebuilt on this torch (the first freeze would make
            the next backward fail); or when the reducer cannot be rebuilt and
            ``requires_grad`` changed after wrapping.
    """
    check_model(model)
    if not is_ddp(model):
        return
    reason = rebuild_unsupported_reason(model)
    if reason is not None and not model.find_unused_parameters:
        raise ValueError(
            f"model is DistributedDataParallel(find_unused_parameters=False) and its gradient "
            f"reducer cannot be rebuilt after a freeze: {reason}. HINT: wrap the model with "
            "DistributedDataParallel(..., find_unused_parameters=True)"
        )
    built = _reducer_size(model)
    stale = built is not None and built != _trainable_size(model)
    if reason is not None:
        if stale:
            raise ValueError(
                f"requires_grad of the model's parameters changed after DistributedDataParallel "
                f"wrapped it, and its reducer cannot be rebuilt ({reason}): gradients would not be "
                "averaged. HINT: set requires_grad before wrapping the model"
            )
        log.warning(
            "layerfreeze: the DDP reducer cannot be rebuilt (%s); relying on "
            "find_unused_parameters=True, so frozen parameters are still all-reduced (as zeros). "
            "HINT: remove the cause above to let layerfreeze rebuild the reducer", reason,
        )
    elif stale:
        log.warning(
            "layerfreeze: requires_grad changed after DistributedDataParallel wrapped the model; "
            "rebuilding its reducer and broadcasting parameters from rank 0 now. HINT: set "
            "requires_grad before wrapping"
        )
        _verify_same_everywhere(model, _trainable_names(model))
        _rebuild_reducer(model)
        _broadcast_from_rank0(model, [p for p in model.module.parameters() if p.requires_grad])
    _STATES[model] = _State(rebuild=reason is None, trainable=_trainable_ids(model))


def _trainable_names(ddp: nn.parallel.DistributedDataParallel) -> list[str]:
    return sorted(n for n, p in ddp.module.named_parameters() if p.requires_grad)


def on_trainable_change(model: nn.Module) -> None:
    """Called after every change of the trainable set of ``model``.

    A no-op unless ``model`` is wrapped in DistributedDataParallel. Every rank must
    call it at the same step; it runs collectives on the DDP process group.

    Raises:
        RuntimeError: when ranks disagree on the trainable set, or when no
            parameter is left trainable.
    """
    if not is_ddp(model):
        return
    state = _STATES.get(model)
    if state is None:  # called without on_attach: decide now; broadcast everything trainable
        state = _State(rebuild=rebuild_unsupported_reason(model) is None)
        _STATES[model] = state
    if state.rebuild:
        # A hook registered after attach may rule the rebuild out; never drop it silently.
        reason = rebuild_unsupported_reason(model)
        if reason is not None:
            if not model.find_unused_parameters:
                raise RuntimeError(
                    f"the DDP reducer can no longer be rebuilt after a freeze change: {reason}. "
                    "HINT: register communication hooks before LayerFreezing.attach, or wrap with "
                    "find_unused_parameters=True"
                )
            log.warning("layerfreeze: the DDP reducer can no longer be rebuilt (%s); continuing "
                        "with find_unused_parameters=True as built", reason)
            state.rebuild = False
    _verify_same_everywhere(model, _trainable_names(model))
    now = _trainable_ids(model)
    thawed = [p for p in model.module.parameters() if id(p) in now - state.trainable]
    if state.rebuild:
        _rebuild_reducer(model)
    if thawed:
        _broadcast_from_rank0(model, thawed)
    state.trainable = now


def _rebuild_reducer(ddp: nn.parallel.DistributedDataParallel) -> None:
    # Mirrors DistributedDataParallel.__setstate__, torch's own path for building a
    # reducer on an existing DDP object: parameters that require grad now, fresh
    # buckets (rebuilt again in execution order after the first iteration), the
    # static-graph flag, and the user's Python communication hook re-registered.
    old = ddp.reducer
    if hasattr(old, "_remove_autograd_hooks"):
        old._remove_autograd_hooks()
    parameters, expect_sparse_gradient = ddp._build_params_for_reducer()
    if not parameters:
        raise RuntimeError(
            "no parameter of the DistributedDataParallel model requires grad after this change; "
            "DDP needs at least one. HINT: keep at least one layer trainable"
        )
    mapping = ddp._build_debug_param_to_name_mapping(parameters)
    ddp._ddp_init_helper(parameters, expect_sparse_gradient, mapping, ddp.static_graph)
    if ddp.static_graph:
        ddp.reducer._set_static_graph()
        ddp.logger._set_static_graph()
        ddp._static_graph_delay_allreduce_enqueued = False
    for hook, hook_state in ddp._comm_hooks:
        ddp.logger._set_comm_hook_name(hook.__qualname__)
        torch.distributed._register_comm_hook(ddp.reducer, hook_state, hook)
    ddp._has_rebuilt_buckets = False
    log.debug("layerfreeze: rebuilt the DDP reducer over %d parameters", len(parameters))


def _comm_device(ddp: nn.parallel.DistributedDataParallel) -> torch.device:
    backend = torch.distributed.get_backend(ddp.process_group)
    return ddp.device if backend != "gloo" else torch.device("cpu")


def _all_gather_ints(ddp: nn.parallel.DistributedDataParallel, values: list[int]) -> list[list[int]]:
    group = ddp.process_group
    size = torch.distributed.get_world_size(group)
    mine = torch.tensor(values, dtype=torch.int64, device=_comm_device(ddp))
    gathered = [torch.empty_like(mine) for _ in range(size)]
    torch.distributed.all_gather(gathered, mine, group=group)
    return [t.tolist() for t in gathered]


def _verify_same_everywhere(ddp: nn.parallel.DistributedDataParallel, names: list[str]) -> None:
    # The schedule is a function of step counts and of all-reduced state, so ranks
    # agree unless they were driven differently; check anyway, since a mismatch
    # would otherwise hang or corrupt the next all-reduce.
    crc = zlib.crc32("\n".join(names).encode())
    everyone = _all_gather_ints(ddp, [len(names), crc])
    if any(other != everyone[0] for other in everyone):
        detail = ", ".join(f"rank {r}: {n} trainable (crc {c:08x})" for r, (n, c) in enumerate(everyone))
        raise RuntimeError(
            f"ranks disagree on the trainable parameters after a freeze change ({detail}). "
            "HINT: every rank must call freezing.step() / epoch_end() equally often, with the "
            "same total_steps and policy inputs"
        )


def _broadcast_from_rank0(ddp: nn.parallel.DistributedDataParallel, params: list[nn.Parameter]) -> None:
    # Frozen weights do not move, so thawed ones should already agree; broadcasting
    # them makes agreement certain (a rank-local edit while frozen cannot survive).
    src = torch.distributed.get_global_rank(ddp.process_group, 0) if hasattr(
        torch.distributed, "get_global_rank") else 0
    with torch.no_grad():
        for p in params:
            torch.distributed.broadcast(p.data, src=src, group=ddp.process_group)


def _debug_enabled() -> bool:
    return os.environ.get("TORCH_DISTRIBUTED_DEBUG", "OFF").upper() in ("INFO", "DETAIL")


def check_agreement(model: nn.Module, step: int, depth: int) -> None:
    """At a decision point, check that all ranks are at the same step and depth.

    Runs only for a DDP ``model`` and when ``TORCH_DISTRIBUTED_DEBUG`` is ``INFO``
    or ``DETAIL`` (one small all-gather per decision); otherwise returns at once.

    Raises:
        RuntimeError: naming each rank's step and depth when they differ.
    """
    if not is_ddp(model) or not _debug_enabled():
        return
    everyone = _all_gather_ints(model, [step, depth])
    if any(other != everyone[0] for other in everyone):
        detail = ", ".join(f"rank {r}: step {s} depth {d}" for r, (s, d) in enumerate(everyone))
        raise RuntimeError(
            f"layerfreeze ranks disagree ({detail}). HINT: call freezing.step() after every "
            "optimizer step on every rank"
        )


# -- ZeroRedundancyOptimizer ---------------------------------------------------------
# The partition each ZeroRedundancyOptimizer made at construction: for every rank,
# the parameters of each param group it owns. Kept per optimizer, so that a thawed
# parameter returns to the rank that held it (and whose local optimizer it left).
_PARTITIONS: "weakref.WeakKeyDictionary[torch.optim.Optimizer, list[list[list[nn.Parameter]]]]" = (
    weakref.WeakKeyDictionary()
)


def _zero_class() -> Optional[type]:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.optim import ZeroRedundancyOptimizer
    except ImportError:  # pragma: no cover - builds without torch.distributed.optim
        return None
    return ZeroRedundancyOptimizer


def is_zero(optimizer: object) -> bool:
    """Whether ``optimizer`` is a ``torch.distributed.optim.ZeroRedundancyOptimizer``."""
    zero = _zero_class()
    return zero is not None and isinstance(optimizer, zero)


def remember_partition(optimizer: torch.optim.Optimizer) -> None:
    """Record a ZeroRedundancyOptimizer's partition before its groups first change; else a no-op."""
    if is_zero(optimizer) and optimizer not in _PARTITIONS:
        _PARTITIONS[optimizer] = [
            [list(group["params"]) for group in rank_groups] for rank_groups in optimizer._partition_parameters()
        ]


def sync_zero(optimizer: torch.optim.Optimizer) -> None:
    """Make a ZeroRedundancyOptimizer follow a change of its (outer) param groups; else a no-op.

    Every rank keeps the parameters the partition gave it at construction, less
    those out of the groups now: no optimizer state has to move between ranks,
    and a thawed parameter goes back to its rank's local optimizer with fresh
    state. The local optimizer's groups (edited in place, its state of removed
    parameters dropped), the partition and every index ZeRO derives from it
    (rank of each parameter, global state indices used by ``state_dict`` and
    ``load_state_dict``, per-device buckets, the trainable mask) follow, the same
    on every rank and without communication. As layers freeze the ranks' shares
    can become uneven; ZeRO's greedy partition spreads each group's parameters by
    size, so every rank usually keeps part of the trainable suffix.
    """
    if not is_zero(optimizer):
        return
    remember_partition(optimizer)
    original = _PARTITIONS[optimizer]
    groups = optimizer.param_groups
    if any(len(rank_groups) != len(groups) for rank_groups in original):
        raise RuntimeError(
            f"ZeroRedundancyOptimizer has {len(groups)} param group(s) but had {len(original[0])} when "
            "layerfreeze first saw it; add param groups before LayerFreezing.attach"
        )
    present = [{id(p) for p in group["params"]} for group in groups]
    partition: list[list[dict]] = []
    for rank, rank_groups in enumerate(original):
        rank_partition = []
        for index, params in enumerate(rank_groups):
            kept = [p for p in params if id(p) in present[index]]
            if rank == optimizer.rank:
                local = optimizer.optim.param_groups[index]
                for p in local["params"]:
                    if id(p) not in present[index]:
                        optimizer.optim.state.pop(p, None)
                local["params"][:] = kept
                rank_partition.append(local)
            else:
                group = copy.copy(groups[index])
                group["params"] = kept
                rank_partition.append(group)
        partition.append(rank_partition)
    optimizer._clear_cache()
    optimizer._partition_parameters_cache = partition
    optimizer._is_trainable_mask = optimizer._get_is_trainable_mask()  # handled here: no warning at step
    if optimizer.parameters_as_bucket_view:
        optimizer._build_param_buckets()


def check_optimizer(optimizer: object, index: int) -> None:
    """Refuse an optimizer whose trainable set cannot change: changes nothing.

    Raises:
        TypeError: for a DeepSpeed optimizer wrapper (see :func:`check_deepspeed`).
        ValueError: for ``ZeroRedundancyOptimizer(overlap_with_ddp=True)``, whose
            partition follows DDP's gradient buckets and which refuses a change of
            trainability at its next step.
    """
    name = _deepspeed_name(optimizer, _DEEPSPEED_OPTIMIZERS)
    if name is not None:
        raise TypeError(
            f"optimizers[{index}] is a DeepSpeed optimizer ({name}): {_DEEPSPEED_WHY} HINT: {_DEEPSPEED_HINT}"
        )
    if is_zero(optimizer) and getattr(optimizer, "_overlap_with_ddp", False):
        raise ValueError(
            f"optimizers[{index}] is ZeroRedundancyOptimizer(overlap_with_ddp=True): its partition is "
            "tied to DDP's gradient buckets and it refuses any change of the trainable parameters. "
            "HINT: construct it with overlap_with_ddp=False (the default)"
        )


# -- DeepSpeed (detected by name: deepspeed is never imported) ------------------------
_DEEPSPEED_ENGINES = ("DeepSpeedEngine",)
_DEEPSPEED_OPTIMIZERS = (
    "DeepSpeedOptimizer", "ZeROOptimizer", "DeepSpeedZeroOptimizer", "DeepSpeedZeroOptimizer_Stage3",
    "FP16_Optimizer", "FP16_UnfusedOptimizer", "BF16_Optimizer",
)
_DEEPSPEED_WHY = (
    "DeepSpeed fixes the trainable parameters at deepspeed.initialize, flattening them into its "
    "partitions and fp32 master copies, so layers cannot leave or rejoin its optimizer later "
    "(DeepSpeed issue #5639)."
)
_DEEPSPEED_HINT = (
    "train with DistributedDataParallel, FSDP2 (torch.distributed.fsdp.fully_shard) or "
    "ZeroRedundancyOptimizer, which layerfreeze supports, or freeze a fixed prefix (requires_grad=False) "
    "before deepspeed.initialize"
)


def _deepspeed_name(obj: object, names: tuple[str, ...]) -> Optional[str]:
    # Any class in the MRO: PipelineEngine and DeepSpeedHybridEngine derive from
    # DeepSpeedEngine, the ZeRO stages from ZeROOptimizer.
    for cls in type(obj).__mro__:
        if cls.__name__ in names and (cls.__name__.startswith("DeepSpeed") or cls.__module__.split(".")[0] == "deepspeed"):
            return type(obj).__name__
    return None


def check_deepspeed(model: object) -> None:
    """Refuse a DeepSpeed engine, or a model whose parameters ZeRO-3 partitions; changes nothing.

    Raises:
        ValueError: for a ``DeepSpeedEngine`` (or a model holding one), or a
            parameter carrying ZeRO-3's ``ds_id``.
    """
    if not isinstance(model, nn.Module):
        return
    for name, module in model.named_modules():
        found = _deepspeed_name(module, _DEEPSPEED_ENGINES)
        if found is not None:
            where = "model" if not name else f"model holds {name!r}, which"
            raise ValueError(f"{where} is a DeepSpeed engine ({found}): {_DEEPSPEED_WHY} HINT: {_DEEPSPEED_HINT}")
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id"):
            raise ValueError(
                f"parameter {name!r} is partitioned by DeepSpeed ZeRO-3 (it has ds_id): {_DEEPSPEED_WHY} "
                f"HINT: {_DEEPSPEED_HINT}"
            )
