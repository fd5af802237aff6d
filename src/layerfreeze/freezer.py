"""Apply a frozen depth to a model and its optimizers, exactly and reversibly.

Freezing a parameter here means all of: ``requires_grad=False``, ``grad=None``,
removal from its param group (the group itself stays, even empty, so LR
schedulers and positional optimizer state keep lining up) and deletion of its
optimizer state. Frozen weights therefore never move again, bit for bit: no
momentum, no weight decay, no Adam moments. Composer only does the first and the
third, which is why saving its optimizer raises (its issue #1002).
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from . import distributed
from .layers import Layer, iter_unique, parameter_names, unwrap_model
from .optimizers import check_references, group_pairs, set_group
from .optimizers import sync as sync_optimizer

__all__ = ["Freezer", "freeze_parameters", "names_for_depth", "BATCHNORM_MODES", "DROPOUT_MODES", "SHARED_RULES"]

log = logging.getLogger("layerfreeze")

BATCHNORM_MODES = ("train", "eval")
DROPOUT_MODES = ("train", "eval")
SHARED_RULES = ("freeze", "trainable")


def names_for_depth(
    layers: Sequence[Layer], depth: int, shared: str = "freeze", *, keep_trainable: Optional[Iterable[str]] = None
) -> set[str]:
    """The one rule for which parameters a depth freezes, used by ``freeze_layers`` and ``LayerFreezing`` alike.

    The parameters of the first ``depth`` layers, by canonical name. A parameter
    held by several layers (tied weights) follows ``shared``: ``"freeze"``
    (Composer) freezes it with the first frozen layer holding it; ``"trainable"``
    keeps it trainable while any layer after the prefix holds it.

    ``keep_trainable``: the names trainable before freezing. When given and the
    prefix would freeze every one of them (a last layer whose only weight is tied
    to a frozen embedding, as in GPT-style models), the last layer's parameters
    stay trainable: with nothing left to train the next backward would fail and
    DDP could not keep a reducer. ``LayerFreezing`` passes it; ``freeze_layers``,
    Composer's function, does not, and freezes them as Composer does.

    Example:
        >>> from layerfreeze.layers import definition_order
        >>> net = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 3), nn.Linear(3, 5, bias=False))
        >>> net[2].weight = net[0].weight  # tied
        >>> sorted(names_for_depth(definition_order(net), 2))
        ['0.weight', '1.bias', '1.weight']
        >>> sorted(names_for_depth(definition_order(net), 2, keep_trainable=["0.weight", "1.weight", "1.bias"]))
        ['1.bias', '1.weight']
    """
    frozen = {n for layer in layers[:depth] for n in layer.param_names}
    if shared == "trainable":
        frozen -= {n for layer in layers[depth:] for n in layer.param_names}
    if keep_trainable is not None and depth and layers:
        trainable = set(keep_trainable)
        if trainable and trainable <= frozen:
            frozen -= set(layers[-1].param_names)
    return frozen


def freeze_parameters(params: Iterable[nn.Parameter], optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Freeze ``params`` completely: no grad, out of every param group, no optimizer state.

    Runs one pass over each param group whatever the number of parameters, so a
    freeze change on a model with thousands of layers stays cheap. Optimizers that
    keep parameters outside their groups follow (:func:`layerfreeze.optimizers.sync`).
    """
    params = list(params)
    if not params:
        return
    ids = {id(p) for p in params}
    for p in params:
        # Attribute assignment, as Composer does: requires_grad_() refuses the
        # uninitialized parameters of lazy modules.
        p.requires_grad = False
        p.grad = None
    for optimizer in optimizers:
        distributed.remember_partition(optimizer)  # ZeRO's partition before any edit
        changed = False
        for group in optimizer.param_groups:
            if any(id(q) in ids for q in group["params"]):
                set_group(group, [(q, n) for q, n in group_pairs(group) if id(q) not in ids])
                changed = True
        for p in params:
            optimizer.state.pop(p, None)
        if changed:
            sync_optimizer(optimizer)


class _EvalPin:
    """``train`` of a frozen BatchNorm layer under batchnorm="eval": eval mode whatever is asked.

    Installed as an instance attribute, so whatever mode a trainer asks for
    (Lightning calls model.train() each epoch, issue #15062) the layer stays in
    eval mode. The pin belongs to the freezer that controls this model: a copy
    (``copy.deepcopy``, pickling; ``torch.optim.swa_utils.AveragedModel`` deep-copies
    the model, and its ``update_bn`` must put every BatchNorm in training mode to
    recompute the statistics) gets an inactive pin, which trains normally.
    """

    __slots__ = ("module", "active")

    def __init__(self, module: nn.Module, active: bool = True):
        self.module = module
        self.active = active

    def __call__(self, mode: bool = True) -> nn.Module:
        if self.active:
            self.module.training = False
            return self.module
        return type(self.module).train(self.module, mode)

    def __deepcopy__(self, memo: dict[int, Any]) -> "_EvalPin":
        return _EvalPin(copy.deepcopy(self.module, memo), active=False)

    def __reduce__(self) -> tuple[Any, ...]:
        return _EvalPin, (self.module, False)


def _sequence_first(value: object, relaid: dict[int, torch.Tensor]) -> object:
    # The same values as ``value`` (batch, sequence, embed), laid out in memory so
    # that its (sequence, batch, embed) transpose passes torch.matmul's folding
    # test literally: stride(0) == stride(1) * size(1). is_contiguous() is not
    # that test (it ignores the strides of size-1 dimensions, as at batch 1).
    if not isinstance(value, torch.Tensor) or value.dim() != 3 or value.is_nested:
        return value
    if id(value) not in relaid:
        seq_first = value.transpose(0, 1)
        if seq_first.stride(0) != seq_first.stride(1) * seq_first.size(1):
            seq_first = seq_first.clone(memory_format=torch.contiguous_format)
        relaid[id(value)] = seq_first.transpose(0, 1)
    return relaid[id(value)]


def _relaid_attention_forward(module: nn.MultiheadAttention, *args: Any, **kwargs: Any) -> Any:
    # Installed as the instance's forward on a frozen batch-first
    # nn.MultiheadAttention. In training mode its input projection transposes the
    # input to (sequence, batch, embed) and runs F.linear on that view.
    # torch.matmul folds such a view into one matrix product (copying it) only
    # while the weight requires grad; frozen, it falls back to one small product
    # per sequence position, up to 1.3x slower and not bit-equal. Handing the
    # module the same values laid out sequence-first makes the view fold again:
    # the same copy and product as before freezing. Identity between query, key
    # and value is kept (self-attention tests it). An instance attribute rather
    # than a hook, since any hook on self_attn turns off the fused inference path
    # of nn.TransformerEncoderLayer; eval mode is passed through untouched.
    if module.training and module.batch_first:
        relaid: dict[int, torch.Tensor] = {}
        args = tuple(_sequence_first(a, relaid) if i < 3 else a for i, a in enumerate(args))
        kwargs = {k: _sequence_first(v, relaid) if k in ("query", "key", "value") else v for k, v in kwargs.items()}
    return type(module).forward(module, *args, **kwargs)


class Freezer:
    """Holds a model's layers and optimizers and moves the frozen depth up or down.

    It remembers where every parameter was at construction time (which groups,
    in which position, whether it required grad), so that unfreezing puts each
    parameter back where it was and a resumed run rebuilds the very same groups.

    Args:
        model: the model (may be wrapped in DistributedDataParallel).
        optimizers: the optimizers that train it.
        layers: the layers in freeze order.
        batchnorm: ``"train"`` keeps frozen BatchNorm layers updating their
            running statistics (Composer); ``"eval"`` pins them to eval mode.
        shared: ``"freeze"`` freezes a parameter shared by several layers as soon
            as one of them is frozen (Composer); ``"trainable"`` keeps it trainable
            while any layer holding it is still trainable.
        dropout: ``"train"`` leaves the frozen prefix's mode alone; ``"eval"`` pins
            it to eval mode (see :meth:`_update_dropout`).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        layers: Sequence[Layer],
        *,
        batchnorm: str = "train",
        shared: str = "freeze",
        dropout: str = "train",
    ):
        self.model = unwrap_model(model)
        self.optimizers = list(optimizers)
        self.layers = list(layers)
        self.batchnorm = batchnorm
        self.shared = shared
        self.dropout = dropout
        self._eval_pinned: list[nn.Module] = []
        self._by_name = dict(self.model.named_parameters())
        self._original_requires_grad = {n: p.requires_grad for n, p in self._by_name.items()}
        self._trainable = {n for n, flag in self._original_requires_grad.items() if flag}
        self._kept_last_warned = False
        self._emptied_hinted: set[int] = set()
        # Original order of every group (with torch's param_names, where the
        # optimizer was built from named_parameters()), to put unfrozen parameters
        # back in place.
        self._original_groups = [[group_pairs(g) for g in opt.param_groups] for opt in self.optimizers]
        for opt in self.optimizers:
            distributed.remember_partition(opt)
        self._frozen: set[str] = set()
        self._pinned: list[nn.Module] = []
        # Batch-first attention modules, by the name of their input projection weight.
        self._attention = {
            f"{prefix}.{weight}" if prefix else weight: module
            for prefix, module in self.model.named_modules()
            if isinstance(module, nn.MultiheadAttention) and module.batch_first
            for weight in (("in_proj_weight",) if module._qkv_same_embed_dim else ("q_proj_weight",))
        }
        self._relaid: dict[str, nn.Module] = {}
        self.depth = 0

    # -- queries -----------------------------------------------------------
    @property
    def frozen_names(self) -> frozenset[str]:
        """Names of the parameters this freezer has frozen."""
        return frozenset(self._frozen)

    def names_for_depth(self, depth: int, layers: Optional[Sequence[Layer]] = None) -> set[str]:
        """Parameter names frozen when the first ``depth`` layers (default: this freezer's) are frozen.

        :func:`names_for_depth` with this freezer's ``shared`` rule, keeping the last
        layer trainable should the prefix cover every parameter trainable at
        construction (and saying so once).
        """
        layers = self.layers if layers is None else layers
        frozen = names_for_depth(layers, depth, self.shared, keep_trainable=self._trainable)
        if frozen != names_for_depth(layers, depth, self.shared):
            if not self._kept_last_warned:
                self._kept_last_warned = True
                log.warning(
                    "layerfreeze: the last layer (%s) shares all its parameters with frozen layers; they "
                    "stay trainable, since the last layer is never frozen and nothing else would be left "
                    "to train", layers[-1].name,
                )
        return frozen

    # -- changes -----------------------------------------------------------
    def apply(self, depth: int) -> bool:
        """Freeze exactly the first ``depth`` layers; returns whether anything changed."""
        if not 0 <= depth < max(len(self.layers), 1):
            raise ValueError(f"depth must be in [0, {max(len(self.layers) - 1, 0)}], got {depth}")
        return self.apply_names(self.names_for_depth(depth), depth)

    def apply_names(self, target: set[str], depth: int) -> bool:
        """Make ``target`` the frozen parameter set (used by resume with saved names)."""
        unknown = sorted(target - self._by_name.keys())
        if unknown:
            raise KeyError(f"no parameter named {unknown[0]!r} in the model")
        self._note_new_groups()
        to_freeze = [self._by_name[n] for n in sorted(target - self._frozen)]
        to_thaw = [n for n in sorted(self._frozen - target)]
        changed = bool(to_freeze or to_thaw) or depth != self.depth
        if to_thaw:
            self._thaw(to_thaw)
        freeze_parameters(iter_unique(to_freeze), self.optimizers)
        if to_freeze:
            self._hint_emptied()
        self._frozen = set(target)
        self.depth = depth
        self._update_batchnorm()
        self._update_dropout()
        self._update_attention()
        return changed

    def _note_new_groups(self) -> None:
        # Groups added since construction (optimizer.add_param_group, as fine-tuning
        # recipes do) hold no frozen parameter yet: their order now is their original.
        for opt, original_groups in zip(self.optimizers, self._original_groups):
            original_groups.extend(group_pairs(g) for g in opt.param_groups[len(original_groups):])

    def _thaw(self, names: Sequence[str]) -> None:
        params = [self._by_name[n] for n in names]
        for name, p in zip(names, params):
            p.requires_grad = self._original_requires_grad[name]
        ids = {id(p) for p in params}
        for opt, original_groups in zip(self.optimizers, self._original_groups):
            changed = False
            for group, original in zip(opt.param_groups, original_groups):
                if not any(id(p) in ids for p, _ in original):
                    continue
                present = {id(p) for p in group["params"]} | ids
                known = {id(p) for p, _ in original}
                in_order = [(p, n) for p, n in original if id(p) in present]
                extra = [(p, n) for p, n in group_pairs(group) if id(p) not in known]
                set_group(group, in_order + extra)
                changed = True
            if changed:
                sync_optimizer(opt, params)

    def _hint_emptied(self) -> None:
        for index, (opt, original) in enumerate(zip(self.optimizers, self._original_groups)):
            if index in self._emptied_hinted or not any(original) or any(g["params"] for g in opt.param_groups):
                continue
            self._emptied_hinted.add(index)
            log.warning(
                "layerfreeze: optimizers[%d] (%s) holds no parameters now; its step() has nothing to do. "
                "HINT: skip stepping an optimizer without parameters (if any(g['params'] for g in "
                "opt.param_groups): scaler.step(opt)): torch.amp.GradScaler.step raises 'No inf checks were "
                "recorded for this optimizer' for it, and LBFGS.step raises IndexError", index, type(opt).__name__,
            )

    def _update_batchnorm(self) -> None:
        for module in self._pinned:
            module.__dict__.pop("train", None)
            module.training = self.model.training
        self._pinned = []
        if self.batchnorm != "eval":
            return
        for layer in self.layers[: self.depth]:
            module = layer.module
            # An inactive pin (this model was copied or unpickled from a pinned one) is ours to replace.
            own = module.__dict__.get("train")
            if isinstance(module, nn.modules.batchnorm._NormBase) and (own is None or isinstance(own, _EvalPin)):
                module.__dict__["train"] = _EvalPin(module)
                module.training = False
                self._pinned.append(module)

    def _update_dropout(self) -> None:
        # dropout="eval": the frozen prefix runs in eval mode, whatever mode a
        # trainer asks for (the HF Trainer calls model.train() at every step), so
        # its output is a function of the input alone, as a cache of it needs
        # (cache.py, encoder_cache.py). Pinned: every largest module whose
        # parameters are all frozen (eval reaches code that reads the flag itself,
        # like Hugging Face attention's dropout), and parameterless dropout modules
        # defined before the first trainable layer.
        for module in self._eval_pinned:
            module.__dict__.pop("train", None)
            type(module).train(module, self.model.training)
        self._eval_pinned = []
        if self.dropout != "eval" or not self._frozen:
            return
        frozen = {id(self._by_name[name]) for name in self._frozen}
        roots: list[nn.Module] = []

        def visit(module: nn.Module) -> None:
            params = list(module.parameters())
            if params and all(id(p) in frozen for p in params):
                roots.append(module)
            else:
                for child in module.children():
                    visit(child)

        visit(self.model)
        inside = {id(m) for root in roots for m in root.modules()}
        first = self.layers[self.depth].module if self.depth < len(self.layers) else None
        for module in self.model.modules():
            if module is first:
                break
            if isinstance(module, nn.modules.dropout._DropoutNd) and id(module) not in inside:
                roots.append(module)
        for module in roots:
            own = module.__dict__.get("train")
            if own is None or isinstance(own, _EvalPin):
                type(module).train(module, False)
                module.__dict__["train"] = _EvalPin(module)
                self._eval_pinned.append(module)

    def _update_attention(self) -> None:
        # Keep frozen attention as fast as it was trainable (see _relaid_attention_forward).
        for name, module in self._attention.items():
            if name in self._frozen and name not in self._relaid and "forward" not in module.__dict__:
                module.__dict__["forward"] = functools.partial(_relaid_attention_forward, module)
                self._relaid[name] = module
            elif name not in self._frozen and name in self._relaid:
                self._relaid.pop(name).__dict__.pop("forward", None)

    def release(self) -> None:
        """Unfreeze everything, unpin BatchNorm layers and the eval-mode prefix, restore frozen attention's own forward."""
        self.apply_names(set(), 0)


def validate_optimizers(model: nn.Module, optimizers: object) -> list[torch.optim.Optimizer]:
    """Return ``optimizers`` as a list after checking each trains part of ``model``.

    Raises:
        TypeError: for anything but an optimizer or a non-empty sequence of them,
            and for DeepSpeed's optimizer wrappers.
        ValueError: for an optimizer holding none of the model's parameters,
            ``ZeroRedundancyOptimizer(overlap_with_ddp=True)``, or a wrapper whose
            inner optimizer has param groups of its own.
    """
    for index, optimizer in enumerate(optimizers if isinstance(optimizers, (list, tuple)) else [optimizers]):
        distributed.check_optimizer(optimizer, index)
    if isinstance(optimizers, torch.optim.Optimizer):
        optimizer_list = [optimizers]
    elif isinstance(optimizers, (list, tuple)) and optimizers and all(
        isinstance(o, torch.optim.Optimizer) for o in optimizers
    ):
        optimizer_list = list(optimizers)
    else:
        raise TypeError(
            "optimizers must be a torch.optim.Optimizer or a non-empty list of them, "
            f"got {type(optimizers).__name__}"
        )
    model_ids = {id(p) for p in unwrap_model(model).parameters()}
    for index, optimizer in enumerate(optimizer_list):
        held = [p for g in optimizer.param_groups for p in g["params"]]
        # An optimizer emptied by earlier freezing is still the model's (repeated
        # freeze_layers calls, as in Composer); only a foreign one is an error.
        if held and not any(id(p) in model_ids for p in held):
            raise ValueError(
                f"optimizers[{index}] ({type(optimizer).__name__}) holds none of the model's "
                "parameters; pass the optimizer that trains this model"
            )
        check_references(optimizer, index, model_ids)
    return optimizer_list


def validate_model(model: object) -> nn.Module:
    """Check ``model`` is a module with at least one parameter; return it unwrapped.

    Raises:
        TypeError: for anything but an ``nn.Module``.
        ValueError: for a model without parameters, a DeepSpeed engine or a model
            whose parameters DeepSpeed ZeRO-3 partitions.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    distributed.check_deepspeed(model)
    inner = unwrap_model(model)
    if not any(True for _ in inner.parameters()):
        raise ValueError(f"model must have at least one parameter; {type(inner).__name__} has none")
    return inner
