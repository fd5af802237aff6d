"""What optimizers keep about their parameters, kept right when the parameters change.

Freezing takes parameters out of param groups and unfreezing puts them back
(:mod:`layerfreeze.freezer`). Most torch optimizers read their groups at every
step and need nothing more; the ones here keep parameters, or state shaped by
them, elsewhere: LBFGS (its own list and flat history), Adagrad before torch
2.13 (state built at construction), fused SGD (momentum buffers all-or-nothing
per group), torch's ``param_names`` and ``_NamedOptimizer`` (names by position),
and ZeroRedundancyOptimizer (:func:`layerfreeze.distributed.sync_zero`). At
attach, :func:`check_references` refuses wrappers whose inner optimizer has
groups of its own. docs/optimizers.md tells the whole story.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch
from torch import nn

from . import distributed

__all__ = ["group_pairs", "set_group", "sync", "check_references"]

log = logging.getLogger("layerfreeze")


def group_pairs(group: dict[str, Any]) -> list[tuple[nn.Parameter, Optional[str]]]:
    params, names = group["params"], group.get("param_names")
    if names is None or len(names) != len(params):
        return [(p, None) for p in params]
    return list(zip(params, names))


def set_group(group: dict[str, Any], pairs: Sequence[tuple[nn.Parameter, Optional[str]]]) -> None:
    """Make ``pairs`` (from :func:`group_pairs`) the group's parameters and names."""
    # In place: anything holding the group's list (LBFGS's _params, a wrapper that
    # shares it) sees the change. torch's own ``param_names`` (optimizers built from
    # named_parameters()) move in step, so state_dict() names the right parameters.
    params = [p for p, _ in pairs]
    if isinstance(group["params"], list):
        group["params"][:] = params
    else:
        group["params"] = params
    names = [n for _, n in pairs]
    if "param_names" in group and None not in names:
        if isinstance(group["param_names"], list):
            group["param_names"][:] = names
        else:
            group["param_names"] = names


def sync(optimizer: torch.optim.Optimizer, thawed: Sequence[nn.Parameter] = ()) -> None:
    """Bring what ``optimizer`` keeps outside its param groups in line with them.

    Called after each change of its groups. LBFGS keeps its parameter list and
    the size of their flat concatenation, and its history (directions, steps,
    previous gradient) lives as flat vectors over all its parameters under the
    first one: a new parameter set invalidates all of it, so LBFGS restarts, as
    at its first step. Adagrad builds its state at construction on torch before
    2.13 and reads it unconditionally at each step: ``thawed`` parameters get the
    state its constructor gives. ZeroRedundancyOptimizer follows in
    :func:`layerfreeze.distributed.sync_zero`.
    """
    if isinstance(optimizer, torch.optim.Adagrad):
        _init_adagrad_state(optimizer, thawed)
    if isinstance(optimizer, torch.optim.SGD):
        _fill_fused_momentum(optimizer)
    if isinstance(getattr(optimizer, "ordered_param_keys", None), list) and isinstance(
        getattr(optimizer, "named_parameters", None), dict
    ):
        # torch.distributed.optim._NamedOptimizer names its state by position in this list.
        names = {id(p): name for name, p in optimizer.named_parameters.items()}
        optimizer.ordered_param_keys[:] = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    if isinstance(optimizer, torch.optim.LBFGS):
        optimizer._params = optimizer.param_groups[0]["params"]
        optimizer._numel_cache = None
        optimizer.state.clear()
    distributed.sync_zero(optimizer)


def _init_adagrad_state(optimizer: torch.optim.Adagrad, thawed: Sequence[nn.Parameter]) -> None:
    ids = {id(p) for p in thawed}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in ids or optimizer.state.get(p):
                continue
            init = optimizer.defaults["initial_accumulator_value"]
            state = optimizer.state[p]
            # As Adagrad does: the step on the parameter's device when fused, in float32 unless
            # the default dtype is float64 (torch.optim.optimizer._get_scalar_dtype).
            fused = bool(group.get("fused"))
            dtype = torch.float64 if not fused and torch.get_default_dtype() == torch.float64 else torch.float32
            state["step"] = (torch.zeros((), dtype=dtype, device=p.device) if fused
                             else torch.tensor(0.0, dtype=dtype))
            state["sum"] = torch.full_like(p, complex(init, init) if torch.is_complex(p) else init,
                                           memory_format=torch.preserve_format)


def _fill_fused_momentum(optimizer: torch.optim.SGD) -> None:
    # Fused SGD treats a group's momentum buffers all-or-nothing: a parameter
    # thawed back into a group whose others have buffers makes its kernel fail
    # ("expected Tensor ... but got NoneType"). A zero buffer gives the first
    # step torch's own first-step result (buffer = gradient) exactly when
    # dampening is 0, the default; with dampening d the thawed parameter's first
    # step takes (1 - d) of its gradient, as every later step does.
    for group in optimizer.param_groups:
        if not group.get("fused") or not group.get("momentum"):
            continue
        buffers = [optimizer.state.get(p, {}).get("momentum_buffer") for p in group["params"]]
        if any(b is None for b in buffers) and any(b is not None for b in buffers):
            for p, buffer in zip(group["params"], buffers):
                if buffer is None:
                    optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def check_references(optimizer: torch.optim.Optimizer, index: int, model_ids: set[int]) -> None:
    """Refuse a wrapper with groups of its own; warn of parameter lists outside the groups.

    Raises:
        ValueError: when an attribute of ``optimizer`` is another optimizer whose
            param groups (not the same list) hold parameters of the model.
    """
    # Freezing edits the groups of the optimizer it is given. A wrapper whose inner
    # optimizer has groups of its own (not the same list) would keep training
    # frozen parameters; ZeroRedundancyOptimizer is such a wrapper and is followed
    # (distributed.sync_zero). Wrappers that share their inner optimizer's groups
    # (Lightning's LightningOptimizer, PostLocalSGDOptimizer, accelerate's) are fine.
    if distributed.is_zero(optimizer):
        return
    groups = optimizer.param_groups
    group_lists = {id(g["params"]) for g in groups}
    for attribute, value in getattr(optimizer, "__dict__", {}).items():
        if isinstance(value, torch.optim.Optimizer) and value is not optimizer:
            if value.param_groups is not groups and any(
                id(p) in model_ids for g in value.param_groups for p in g["params"]
            ):
                raise ValueError(
                    f"optimizers[{index}] ({type(optimizer).__name__}) wraps another optimizer "
                    f"(.{attribute}, {type(value).__name__}) with param groups of its own; freezing edits "
                    "the groups of the optimizer it is given, so the inner one would keep updating frozen "
                    f"parameters. HINT: pass the inner optimizer (optimizer.{attribute}) to LayerFreezing, "
                    "or make the wrapper share its param_groups list"
                )
        elif (
            isinstance(value, (list, tuple)) and id(value) not in group_lists
            and any(isinstance(v, torch.Tensor) and id(v) in model_ids for v in value)
        ):
            log.warning(
                "layerfreeze: optimizers[%d] (%s) keeps parameters in .%s besides its param groups; "
                "freezing removes parameters from the groups only, so if it updates from .%s, frozen "
                "weights may still move. HINT: have the optimizer read its parameters from param_groups at "
                "each step, as torch's optimizers do",
                index, type(optimizer).__name__, attribute, attribute,
            )
