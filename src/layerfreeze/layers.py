"""Which layers a model has, in which order, and what each costs.

A *layer* is a leaf module (no children) that owns at least one parameter, as in
Composer. Layers are listed depth-first in module-definition order, or in the
order the forward pass first runs them (``order="execution"``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from .validation import check_choice

__all__ = [
    "Layer",
    "unwrap_model",
    "definition_order",
    "parameter_names",
    "ExecutionTracer",
    "execution_order",
    "layer_flops",
]

log = logging.getLogger("layerfreeze")


@dataclass(frozen=True)
class Layer:
    """One freezable unit: a leaf module and the parameters it owns.

    Attributes:
        name: qualified module name in the unwrapped model ("" for the root).
        module: the module itself.
        param_names: canonical qualified names of its parameters (for a tied
            parameter, the name ``model.named_parameters()`` reports first).
    """

    name: str
    module: nn.Module
    param_names: tuple[str, ...]

    @property
    def type_name(self) -> str:
        return type(self.module).__name__


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the user's model inside a DDP / DataParallel / FSDP1 / compiled wrapper."""
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        elif type(model).__name__ == "FullyShardedDataParallel" and hasattr(model, "module"):
            model = model.module
        else:
            break
    return model


def parameter_names(model: nn.Module) -> dict[int, str]:
    """Map ``id(parameter)`` to its canonical qualified name (first occurrence)."""
    return {id(p): name for name, p in model.named_parameters()}


UNITS = ("leaf", "owner")


def _leaf_modules(module: nn.Module, prefix: str, out: list[tuple[str, nn.Module]]) -> None:
    # Same traversal as Composer's ``_get_layers``: a module with no children and
    # at least one parameter is a layer; otherwise recurse into its children.
    # A module reused under two parents is listed twice, as Composer lists it.
    children = list(module.named_children())
    if not children and any(True for _ in module.parameters()):
        out.append((prefix, module))
        return
    for child_name, child in children:
        _leaf_modules(child, f"{prefix}.{child_name}" if prefix else child_name, out)


def _owner_modules(module: nn.Module, prefix: str, out: list[tuple[str, nn.Module]]) -> None:
    # Every module that owns parameters directly is a unit holding just those,
    # listed before its children (pre-order). Leaves come out as in Composer.
    if any(p is not None for p in module._parameters.values()):
        out.append((prefix, module))
    for child_name, child in module.named_children():
        _owner_modules(child, f"{prefix}.{child_name}" if prefix else child_name, out)


def definition_order(model: nn.Module, unit: str = "leaf") -> list[Layer]:
    """Layers of ``model`` depth-first in module-definition order (Composer's order).

    Args:
        model: the model (wrappers such as DDP are looked through).
        unit: ``"leaf"`` (Composer): leaf modules with parameters; parameters owned
            directly by a module that has children (``nn.MultiheadAttention``'s
            ``in_proj_weight``, say) belong to no layer and never freeze.
            ``"owner"``: every module owning parameters directly is a layer holding
            those parameters, placed before its children, so nothing is left out.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> [layer.name for layer in definition_order(net)]
        ['0', '2']
    """
    unit = check_choice("unit", unit, UNITS)
    model = unwrap_model(model)
    names = parameter_names(model)
    found: list[tuple[str, nn.Module]] = []
    if unit == "leaf":
        _leaf_modules(model, "", found)
    else:
        _owner_modules(model, "", found)
    return [
        Layer(name, module, tuple(names[id(p)] for p in module.parameters(recurse=False)))
        for name, module in found
    ]


def _is_compiling() -> bool:
    # torch.compiler.is_compiling() from torch 2.3; dynamo folds it to True while tracing.
    check = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
    return check()


@contextlib.contextmanager
def _eager() -> Iterator[None]:
    """Run modules eagerly even where ``torch.compile`` or ``module.compile()`` wraps them.

    A measuring pass (an execution trace, a FLOP count) must see every layer's own
    forward; compiled code runs the hooks it measures with only at compile time.
    """
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield


class ExecutionTracer:
    """Records the order in which layers first run, from forward pre-hooks.

    The first complete eager forward pass of the model fixes the order, and the
    hooks go at once. A forward pass that TorchDynamo compiles cannot record
    anything (hooks run only while dynamo traces them, and removing them inside
    the compiled region is an error under ``fullgraph=True``), so there the hooks
    only keep a reference to the call's inputs; :meth:`resolve` then replays that
    call eagerly, outside the compiled region. Hooks that a compiled graph has
    inlined stay on the model, doing nothing, until :meth:`remove`, which
    :class:`layerfreeze.LayerFreezing` calls at the next change of the frozen set,
    when dynamo recompiles anyway: one graph per frozen set.

    Layers that never ran keep their definition order, after those that did.
    """

    def __init__(self, model: nn.Module, layers: Sequence[Layer]):
        self._layers = list(layers)
        self._seen: dict[int, int] = {}  # id(module) -> first call rank
        self._handles: list[Any] = []
        self._call: Optional[tuple[tuple[Any, ...], dict[str, Any]]] = None  # last root call's inputs
        self._compiled = False  # some hook was inlined by dynamo: removing hooks forces a recompile
        self._partial = False  # part of the current root call ran compiled: its record is incomplete
        self.done = False
        for layer in {id(layer.module): layer for layer in self._layers}.values():
            self._handles.append(layer.module.register_forward_pre_hook(self._record))
        root = unwrap_model(model)
        self._handles.append(root.register_forward_pre_hook(self._root_start, with_kwargs=True))
        self._handles.append(root.register_forward_hook(self._root_done))

    # Under dynamo these hooks only store attributes and never read the tracer's
    # state: a read would become a guard, and the guard a recompilation.
    def _root_start(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if _is_compiling():
            self._call, self._compiled = (args, kwargs), True
        elif not self.done:
            self._call, self._partial = (args, kwargs), False
            self._seen.clear()

    def _record(self, module: nn.Module, args: Any) -> None:
        if _is_compiling():
            self._compiled = self._partial = True
        elif not self.done:
            self._seen.setdefault(id(module), len(self._seen))

    def _root_done(self, module: nn.Module, args: Any, output: Any) -> None:
        if _is_compiling() or self.done or self._partial or not self._seen:
            return
        self.done = True
        self._call = None
        if not self._compiled:
            self.remove()

    def resolve(self, model: nn.Module) -> Optional[list[Layer]]:
        """The traced order, or None while no forward pass has run.

        If the forward passes so far ran compiled, the last one is replayed here,
        eagerly, under ``no_grad`` and with buffers restored (as
        :func:`execution_order` runs ``example_inputs``).

        Args:
            model: what the training loop calls (the model or its wrapper).
        """
        if not self.done and self._call is not None:
            args, kwargs = self._call
            try:
                with _side_effect_free(model):
                    model(*args, **kwargs)
            except Exception as error:
                raise RuntimeError(
                    f"order='execution' could not replay the model's compiled forward pass eagerly to trace "
                    f"its layers ({type(error).__name__}: {error}). HINT: pass example_inputs to attach()"
                ) from error
            self._call = None
        return self.order() if self.done else None

    def remove(self) -> None:
        """Remove every hook (the recorded order stays)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._call = None

    def order(self) -> list[Layer]:
        """Layers sorted by first execution.

        A layer whose own forward never ran (``nn.MultiheadAttention`` reads
        ``out_proj.weight`` without calling ``out_proj``) is placed just before the
        next layer in definition order that did run (just after the previous one
        when none follows), so it never ends up last by accident.
        """
        ranks = [self._seen.get(id(layer.module)) for layer in self._layers]
        keys: list[Optional[tuple[float, int]]] = [None] * len(ranks)
        following: Optional[int] = None
        for index in range(len(ranks) - 1, -1, -1):
            if ranks[index] is not None:
                following = ranks[index]
                keys[index] = (float(following), index)
            elif following is not None:
                keys[index] = (following - 0.5, index)
        previous = -1.0
        for index, rank in enumerate(ranks):
            if rank is not None:
                previous = float(rank)
            elif keys[index] is None:
                keys[index] = (previous + 0.5, index)
        unused = [layer.name for layer in self._layers if id(layer.module) not in self._seen]
        if unused:
            log.info(
                "layerfreeze: %d layer(s) did not run their own forward in the traced pass and keep "
                "their place after their definition-order predecessor: %s", len(unused), ", ".join(unused[:5]),
            )
        order = sorted(range(len(self._layers)), key=lambda i: keys[i])
        return [self._layers[i] for i in order]


@contextlib.contextmanager
def _side_effect_free(model: nn.Module) -> Iterator[None]:
    """Run a measuring forward pass eagerly, under ``no_grad``, and put every buffer back after it.

    BatchNorm in train mode updates its running statistics on any forward; a
    trace or a FLOP count must leave the model exactly as it found it. Eagerly
    (see :func:`_eager`), also where the model is compiled in place: the pass
    must see its hooks run, and must not spend compiled graphs of the model
    (dynamo would compile one for each set of hooks it meets). The random number
    generators are forked too: dropout in the pass must not shift the training run's
    random stream (a replayed compiled forward would otherwise differ from eager).
    """
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    cuda = sorted({t.device.index for t in model.parameters() if t.is_cuda and t.device.index is not None})
    try:
        with _eager(), torch.no_grad(), torch.random.fork_rng(devices=cuda):
            yield
    finally:
        with torch.no_grad():
            for buffer, copy in saved:
                buffer.copy_(copy)


def execution_order(model: nn.Module, run: Callable[[nn.Module], Any], unit: str = "leaf") -> list[Layer]:
    """Layers in the order a forward pass first runs them.

    ``run(model)`` performs one forward pass (for example ``lambda m: m(x)``). It
    runs under ``torch.no_grad()``; buffers (BatchNorm statistics) are restored
    afterwards, so tracing changes nothing in the model.
    """
    model = unwrap_model(model)
    layers = definition_order(model, unit)
    tracer = ExecutionTracer(model, layers)
    try:
        with _side_effect_free(model):
            run(model)
    finally:
        tracer.remove()
    return tracer.order()


def layer_flops(model: nn.Module, layers: Sequence[Layer], run: Callable[[nn.Module], Any]) -> list[int]:
    """Forward FLOPs of each layer for one forward pass ``run(model)``.

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` around each layer's
    own forward (through hooks), so a module reused twice counts both calls.
    Buffers are restored afterwards, as in :func:`execution_order`.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = unwrap_model(model)
    counts: dict[int, int] = {id(layer.module): 0 for layer in layers}
    handles = []
    # Stack of (module id, mode, FLOPs of nested layers): with unit="owner" a
    # layer's forward can run other layers; their FLOPs are theirs, not its own.
    stack: list[list[Any]] = []

    def pre(module: nn.Module, args: Any) -> None:
        mode = FlopCounterMode(display=False)
        stack.append([id(module), mode, 0])
        mode.__enter__()

    def post(module: nn.Module, args: Any, output: Any) -> None:
        module_id, mode, nested = stack.pop()
        mode.__exit__(None, None, None)
        inclusive = mode.get_total_flops()
        counts[module_id] += inclusive - nested
        if stack:
            stack[-1][2] += inclusive

    for layer in {id(layer.module): layer for layer in layers}.values():
        handles.append(layer.module.register_forward_pre_hook(pre))
        handles.append(layer.module.register_forward_hook(post))
    try:
        with _side_effect_free(model):
            run(model)
    finally:
        # A forward that raised inside a layer never reached its post-hook: leave
        # no counter mode active, or every later op in the process pays for it.
        while stack:
            stack.pop()[1].__exit__(None, None, None)
        for handle in handles:
            handle.remove()
    return [counts[id(layer.module)] for layer in layers]


def total_flops(model: nn.Module, run: Callable[[nn.Module], Any]) -> int:
    """Forward FLOPs of the whole model for one forward pass ``run(model)``."""
    from torch.utils.flop_counter import FlopCounterMode

    model = unwrap_model(model)
    with _side_effect_free(model), FlopCounterMode(display=False) as mode:
        run(model)
    return mode.get_total_flops()


def iter_unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """Parameters without repeats, first occurrence kept."""
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
