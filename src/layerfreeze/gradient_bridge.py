"""Keep gradients flowing when frozen layers feed reentrant activation checkpointing.

Reentrant checkpointing (``torch.utils.checkpoint(..., use_reentrant=True)``, the
default of Hugging Face's ``gradient_checkpointing_enable()`` before transformers 5)
runs each segment under ``no_grad`` and builds a graph for it only if one of the
segment's *inputs* requires grad. Once the bottom layers are frozen nothing before
the first segment requires grad, so every checkpointed layer silently gets no
gradient (transformers issues #21381, #23170). Non-reentrant checkpointing has no
such problem, and is what we recommend.

:class:`GradientBridge` detects reentrant checkpointing from the first forward pass
(a layer running with grad disabled inside a forward that had it enabled) and,
while any layer is frozen, makes the output of the last frozen layer that runs
outside checkpointed segments require grad, so the segments after it build their
graphs again. Backward then reaches that activation but no frozen parameter.

Under ``torch.compile`` the hooks do nothing inside the compiled region: dynamo
traces ``torch.utils.checkpoint`` as a higher-order op whose backward does not
depend on its inputs requiring grad, so compiled segments need no bridge, and a
hook that records or removes hooks there is a graph break (an error under
``fullgraph=True``). Detection waits for a training forward that runs eagerly; the
probes that dynamo inlined leave at the next change of the frozen set, when dynamo
recompiles anyway, and until detection every frozen layer is bridged (correct, at
the cost of one activation gradient). A checkpointed function that dynamo cannot
trace (a graph break inside it) runs eagerly, with reentrant semantics, inside the
compiled forward; the probes see that, and the bridges then act in compiled code
too, as a graph break.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .layers import Layer, _is_compiling

__all__ = ["GradientBridge"]

log = logging.getLogger("layerfreeze")


def _may_checkpoint(model: nn.Module) -> bool:
    # Probe only models that may checkpoint: a Hugging Face layer with gradient
    # checkpointing on, or a module whose forward names something "checkpoint"
    # (torch.utils.checkpoint.checkpoint, checkpoint_sequential). The probes are
    # hooks, and hooks removed mid-run break torch.compile's graph.
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            return True
        code = getattr(type(module).forward, "__code__", None)
        if code is not None and any("checkpoint" in name for name in code.co_names):
            return True
    return False


def _require_grad(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        if torch.is_grad_enabled() and output.is_floating_point() and not output.requires_grad:
            # A non-leaf copy, so in-place ops downstream (ReLU(inplace=True)) stay legal.
            return output.detach().requires_grad_().clone()
        return output
    if isinstance(output, tuple):
        return tuple(_require_grad(item) for item in output)
    return output


class GradientBridge:
    """Detects reentrant checkpointing and bridges gradients past the frozen layers.

    Models that show no sign of activation checkpointing at attach (see
    ``_may_checkpoint``) get no hooks at all.

    Created by :class:`layerfreeze.LayerFreezing` at attach; :meth:`update` is called
    after every change of the frozen set and :meth:`remove` at detach.

    Args:
        model: the unwrapped model.
        layers: its layers (any order).
    """

    def __init__(self, model: nn.Module, layers: Sequence[Layer]):
        self.reentrant = False
        self._outside: set[int] = set()  # id(module) of layers seen running with grad enabled
        self._root_grad: Optional[bool] = None
        self._detected = False
        self._compiled = False  # dynamo inlined a probe: removing the probes forces a recompile
        self._partial = False  # part of the current training forward ran compiled: it tells nothing
        self._compiled_training = False  # a compiled training forward is running (set by dynamo's side effects)
        # A layer ran eagerly under no_grad inside a compiled training forward: a checkpointed
        # function dynamo could not trace (a graph break in it) ran with reentrant semantics.
        self._eager_checkpoint = False
        self._frozen: list[nn.Module] = []
        self._bridges: list[Any] = []
        self._probes: list[Any] = []
        if not _may_checkpoint(model):
            self._detected = True
            return  # no probes: nothing on the model, so torch.compile sees no hooks
        self._probes = [model.register_forward_pre_hook(self._enter), model.register_forward_hook(self._exit)]
        for module in {id(layer.module): layer.module for layer in layers}.values():
            self._probes.append(module.register_forward_pre_hook(self._seen))

    # -- detection (first eager forward pass in training mode) -------------
    # Under dynamo the probes only store constants and never read the bridge's state:
    # a read would become a guard, and the guard a recompilation.
    def _enter(self, module: nn.Module, args: Any) -> None:
        if _is_compiling():
            self._compiled, self._compiled_training = True, module.training and torch.is_grad_enabled()
        elif module.training and self._root_grad is None:
            self._root_grad = torch.is_grad_enabled()
            self._partial, self.reentrant = False, False
            self._outside.clear()

    def _seen(self, module: nn.Module, args: Any) -> None:
        if _is_compiling():
            self._compiled = self._partial = True
        elif self._compiled_training and not torch.is_grad_enabled():
            self._eager_checkpoint = True
        elif self._root_grad:
            if torch.is_grad_enabled():
                self._outside.add(id(module))
            elif not self.reentrant:
                self.reentrant = True  # a layer ran under no_grad inside a grad-enabled forward

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        if _is_compiling():
            self._compiled_training = False
            return
        if self._root_grad is None:
            return
        if not self._root_grad or self._partial:
            self._root_grad = None  # an eval/no_grad or partly compiled pass tells nothing; wait for another
            return
        self._detected = True
        if self.reentrant:
            log.warning(
                "layerfreeze: reentrant activation checkpointing detected; frozen layers will pass "
                "gradients on to checkpointed ones (transformers #21381). HINT: non-reentrant "
                "checkpointing (use_reentrant=False) avoids the extra work"
            )
        if not self._compiled:
            self._remove_probes()
            self._place()
        # else: the probes and the bridges (on every frozen layer, a superset) stay until the next
        # change of the frozen set, when dynamo recompiles anyway (update).

    def _remove_probes(self) -> None:
        for handle in self._probes:
            handle.remove()
        self._probes = []

    # -- bridging ---------------------------------------------------------
    def _bridge_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if _is_compiling() and not self._eager_checkpoint:
            # Dynamo traces checkpointing as an op that needs no bridge, and requires_grad_()
            # on an intermediate is unsupported in a graph (an error under fullgraph=True).
            return output
        return _require_grad(output)  # compiled, a graph break: it runs eagerly

    def update(self, frozen_layers: Sequence[Layer]) -> None:
        """Set the frozen layers (in freeze order) after a change."""
        self._frozen = [layer.module for layer in frozen_layers]
        if self._compiled:
            self._remove_probes()  # dynamo inlined them; it recompiles for the new frozen set anyway
        self._place()

    def _place(self) -> None:
        for handle in self._bridges:
            handle.remove()
        if not self._detected:
            # Not detected yet (a resumed run frozen before its first forward, or a model
            # only run compiled): bridge every frozen layer; it only adds work.
            targets = self._frozen
        elif self.reentrant:
            outside = [m for m in self._frozen if id(m) in self._outside]
            targets = outside[-1:]
        else:
            targets = []
        self._bridges = [m.register_forward_hook(self._bridge_hook) for m in targets]

    def remove(self) -> None:
        """Remove every hook."""
        self._remove_probes()
        self._frozen = []
        self._place()
