"""How many graphs ``torch.compile`` needs for a freezing plan, against dynamo's limit.

TorchDynamo guards on each parameter's ``requires_grad``, so every frozen set is a
graph of its own. Evaluation doubles that: a forward pass under ``torch.no_grad()``
or in eval mode fails the training graph's guards (grad mode, ``module.training``)
and compiles a second graph for the same frozen set, and that graph guards on
``requires_grad`` as well, although nothing there needs gradients. Past
``torch._dynamo.config.recompile_limit`` graphs of one function dynamo stops
compiling it and runs it eagerly for the rest of the process.
"""

from __future__ import annotations

import inspect
import logging
from typing import Optional

import torch
from torch import nn

__all__ = ["recompile_limit", "is_compiled", "frozen_sets", "warn_recompile_limit"]

log = logging.getLogger("layerfreeze")


def recompile_limit() -> Optional[int]:
    """Dynamo's limit of compiled versions of one function, or None without dynamo.

    ``torch._dynamo.config.recompile_limit`` (named ``cache_size_limit`` before torch 2.6).
    """
    try:
        import torch._dynamo.config as config
    except ImportError:  # pragma: no cover - dynamo ships with every supported torch
        return None
    for name in ("recompile_limit", "cache_size_limit"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` or a wrapper around it is already compiled.

    True for ``torch.compile``'s wrapper and for a module compiled in place with
    ``module.compile()``, also inside DDP. A model compiled only after
    ``LayerFreezing.attach`` is not visible from here.
    """
    for _ in range(8):
        if getattr(model, "_compiled_call_impl", None) is not None:  # module.compile()
            return True
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            return True
        inner = getattr(model, "module", None)  # DDP, DataParallel, FSDP1
        if not isinstance(inner, nn.Module):
            return False
        model = inner
    return False


def frozen_sets(layer_count: int, max_changes: Optional[int], decisions: Optional[int]) -> int:
    """The most frozen sets a run can visit: depths 0 to ``layer_count - 1`` (the last
    layer never freezes), at most one more than ``max_changes`` and than the number of
    decisions (``None``: not bounded).

    Example:
        >>> frozen_sets(9, max_changes=7, decisions=16), frozen_sets(20, None, decisions=3)
        (8, 4)
    """
    sets = max(layer_count, 1)
    for bound in (max_changes, decisions):
        if bound is not None:
            sets = min(sets, bound + 1)
    return sets


def _raise_limit_hint(graphs: int) -> str:
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        return f"torch.compile(model, recompile_limit={graphs})"
    return f"torch._dynamo.config.recompile_limit = {graphs}"


def warn_recompile_limit(
    model: nn.Module,
    layer_count: int,
    max_changes: Optional[int],
    interval: str,
    total_steps: int,
    steps_per_epoch: Optional[int],
) -> None:
    """Warn when a compiled run of this plan will outgrow dynamo's recompile limit.

    Checked when the model is known to be compiled (see :func:`is_compiled`) or
    ``max_changes`` is set (the bound exists for ``torch.compile``): with up to
    ``n`` frozen sets, training compiles ``n`` graphs and a loop that also
    evaluates the compiled model up to ``2 n``.

    Args:
        model: what was passed to ``LayerFreezing.attach``.
        layer_count: number of layers.
        max_changes: ``LayerFreezing``'s bound on frozen-set changes, or None.
        interval: ``"step"`` or ``"epoch"``: when the frozen set may change.
        total_steps: optimizer steps in the run.
        steps_per_epoch: steps per epoch, or None (epoch ends then come from calls).
    """
    limit = recompile_limit()
    compiled = is_compiled(model)
    if limit is None or not (compiled or max_changes is not None):
        return
    if interval == "step":
        decisions: Optional[int] = total_steps
    else:
        decisions = total_steps // steps_per_epoch if steps_per_epoch else None
    sets = frozen_sets(layer_count, max_changes, decisions)
    if 2 * sets <= limit:
        return
    bounded = f"max_changes={max_changes}" if max_changes is not None and sets == max_changes + 1 else (
        f"{layer_count} layers" if sets == max(layer_count, 1) else f"{decisions} decision points")
    subject = "the compiled model" if compiled else "the model, if compiled,"
    raise_limit = f"raise the limit: {_raise_limit_hint(2 * sets)}"
    halved = f"max_changes={limit // 2 - 1} (recompile_limit // 2 - 1)" if limit >= 4 else None
    if sets > limit:
        problem = (
            f"up to {sets} frozen sets ({bounded}): {subject} needs one graph per frozen set in training "
            f"alone, more than torch._dynamo.config.recompile_limit={limit}"
        )
        fixes = [f"pass max_changes={limit - 1}" + (f", or {halved} if the loop also evaluates it" if halved else "")]
    else:
        problem = (
            f"up to {sets} frozen sets ({bounded}): {subject} needs one graph per frozen set in training, and a "
            f"loop that also evaluates it (model.eval() or torch.no_grad()) a second one per frozen set, "
            f"up to {2 * sets} graphs, more than torch._dynamo.config.recompile_limit={limit}"
        )
        fixes = ["evaluate with the uncompiled model (or under torch.compiler.set_stance('force_eager'))"]
        if halved:
            fixes.append(f"pass {halved}")
    fixes.append(raise_limit)
    message = (
        f"layerfreeze: {problem}; past the limit dynamo runs the model eagerly for the rest of the run "
        f"(its warning: 'hit config.recompile_limit'). HINT: {'; or '.join(fixes)}"
    )
    log.warning("%s", message)
