"""Frozen-prefix caching inside a model's own forward: the encoders people fine-tune.

:class:`EncoderCache` does for a Hugging Face encoder (BERT, RoBERTa, DistilBERT,
MiniLM, ViT, ...) what :class:`layerfreeze.cache.PrefixCache` does for a model
split by hand into stages, without a split and without changing the training
loop: the model is called as before (``model(**batch)``, by a plain loop or by
the Hugging Face ``Trainer``). The prefix is the embeddings module followed by
the first blocks; the cut is the longest leading run of those *stages* whose
parameters are all frozen, read from ``requires_grad`` at every forward, so it
follows :class:`layerfreeze.LayerFreezing` by itself.

How a training forward runs once the first ``cut`` stages are frozen:

- every example of the batch has its output of the frozen prefix stored: the
  embeddings module returns the stored outputs and the frozen blocks pass their
  input through, so the model's own code (attention mask, pooling, loss) runs
  from the first trainable block on (a *hit*);
- the examples' stored outputs were computed at an earlier, shallower cut: the
  newly frozen blocks run on them and the result is stored (*advanced*), cheaper
  than recomputing from the input;
- otherwise the batch runs whole, the frozen prefix without autograd (its
  parameters are frozen), and its output is stored per example (*misses*).

Examples are keyed by their content: the bytes of every tensor the model is
called with (``input_ids``, ``attention_mask``, ``labels``, ...), so no dataset
index is needed, and an example is found again only if its input is the same
tensor every time (fixed padding, no random augmentation). Evaluation forwards
(the model in eval mode) run as if there were no cache.

The stored output of an example is the one the model computes for it (per row,
bit for bit where the kernels do not depend on the batch's other rows, as on CPU
at a fixed batch size), so a run with the cache equals the run without it in
which the frozen prefix is deterministic: its dropout in eval mode. A prefix with
dropout (or BatchNorm) in training mode is refused.

Example:
    >>> import torch, layerfreeze as lf
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> config = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=3, num_attention_heads=2,
    ...                     intermediate_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    >>> model = BertForSequenceClassification(config).train()
    >>> model.bert.embeddings.requires_grad_(False) and model.bert.encoder.layer[0].requires_grad_(False)
    BertLayer(...)
    >>> cache = lf.EncoderCache(model)
    >>> batch = {"input_ids": torch.randint(1, 50, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long)}
    >>> first = model(**batch).logits      # computes embeddings + layer 0 and stores them per example
    >>> second = model(**batch).logits     # reads them back; only layers 1 and 2 and the head run
    >>> cache.cut, cache.hits, bool(torch.equal(first, second))
    (2, 4, True)
    >>> cache.remove()
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional, Sequence, Union

import torch
from torch import nn

from .cache import _CachedStages, _check_storage, _Store
from .validation import check_int

__all__ = ["EncoderCache", "encoder_stages"]

log = logging.getLogger("layerfreeze")

# Where Hugging Face models keep their blocks, relative to the base model.
_BLOCK_PATHS = ("encoder.layer", "encoder.layers", "transformer.layer", "layers", "layer")
# Names under which a block may receive its hidden state as a keyword.
_HIDDEN_KWARGS = ("hidden_states", "hidden_state", "x", "src", "hidden")


def _attribute(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def encoder_stages(model: nn.Module) -> list[nn.Module]:
    """The embeddings module and the blocks of a Hugging Face encoder, in the order they run.

    Looks at ``model.base_model`` (the backbone of a ``PreTrainedModel``, such as
    ``model.bert``), then at ``model`` and its submodules in order (a backbone
    inside a model of one's own), for an ``embeddings`` module and a
    ``ModuleList`` of blocks at ``encoder.layer`` (BERT, RoBERTa, ELECTRA, ViT),
    ``transformer.layer`` (DistilBERT), ``encoder.layers``, ``layers`` or ``layer``.

    Raises:
        ValueError: if no such pair is found.
    """
    for root in dict.fromkeys((getattr(model, "base_model", model), *model.modules())):
        embeddings = getattr(root, "embeddings", None)
        if not isinstance(embeddings, nn.Module):
            continue
        for path in _BLOCK_PATHS:
            blocks = _attribute(root, path)
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
                return [embeddings, *blocks]
    raise ValueError(
        f"EncoderCache found no embeddings module and block list in {type(model).__name__} (looked for "
        "`embeddings` and `encoder.layer`, `transformer.layer`, ... on the model and its base_model). "
        "HINT: pass stages=[embeddings, *blocks]: the modules of the prefix in the order they run, each "
        "called on the previous one's output"
    )


def _hidden_input(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    if args:
        return args[0] if isinstance(args[0], torch.Tensor) else None
    for name in _HIDDEN_KWARGS:
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name]
    return None


def _hidden_output(output: Any) -> Optional[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _shaped_like(kind: Optional[int], hidden: torch.Tensor) -> Any:
    # kind: 0 for a stage returning a tensor, n for one returning an n-tuple
    # (transformers 4 blocks return (hidden_states, ...)).
    return hidden if kind == 0 else (hidden,) + (None,) * (kind - 1)


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"  # pragma: no cover


@dataclass
class _Plan:
    """What one training forward does with the stages."""

    keys: list
    cut: int  # stages frozen now
    start: int  # stages replaced by stored outputs (0: none)
    served: Optional[torch.Tensor] = None  # stored outputs of stages[:start]
    stop: bool = False  # a prefix-only pass: stop the model once the output is stored
    outputs: dict = field(default_factory=dict)  # stage index -> its output in this forward


class _PrefixDone(Exception):
    """Raised by the last frozen stage to end a prefix-only pass of the model."""


class EncoderCache(_CachedStages):
    """Cache, per training example, the output of a model's frozen embeddings and first blocks.

    Built once on the model; from then on the model's own forward uses the cache
    whenever the model is in training mode and its leading stages are frozen.
    Nothing else changes in the training loop. :meth:`remove` takes it off again.
    The model holds the cache (so it lives as long as the model); pickling or
    copying the model copies the cache's settings, not its stored outputs.

    Args:
        model: the model as it is called in training (the ``Trainer``'s model,
            or what a loop calls), not wrapped in DistributedDataParallel.
        stages: the prefix's modules in the order they run, each called with the
            previous one's output as its first argument (or ``hidden_states=``),
            and the first one with the model's input; default
            :func:`encoder_stages` (embeddings, then every block). Modules that
            run before the first stage run anyway (keep them cheap).
        max_bytes: memory the stored outputs may take, in bytes (on the device
            they were computed on). Default 1 GiB. One example takes
            ``sequence length x hidden size x element size`` bytes (MiniLM at
            length 48: 48 x 384 x 4 = 72 KiB, so 1 GiB holds 14,563 examples);
            :attr:`bytes_per_example` and :meth:`summary` report it. Past the
            bound, outputs spill to ``spill_dir`` or, without one, are
            recomputed each time; nothing is evicted.
        spill_dir: a directory for outputs past ``max_bytes`` (one file, deleted
            by :meth:`remove`); None keeps everything in memory.
        examples: the number of distinct training examples, if known (for
            example ``len(train_dataset)``). With it, a warning tells when, after
            two passes over the data at one cut, fewer than a quarter of the
            lookups were served from the cache.

    Attributes:
        hits, misses, advanced: examples served from the cache / computed from
            their input / carried from a shallower cut through newly frozen
            blocks, since the last invalidation.
        invalidations: times the stored outputs were dropped (the cut moved
            back, or a frozen weight was changed in place).

    Raises:
        TypeError, ValueError: for bad arguments (nothing is installed then).
    """

    def __init__(
        self,
        model: nn.Module,
        stages: Optional[Sequence[nn.Module]] = None,
        *,
        max_bytes: int = 1 << 30,
        spill_dir: Optional[Union[str, os.PathLike]] = None,
        examples: Optional[int] = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if hasattr(model, "module") and isinstance(model.module, nn.Module) and type(model).__name__ in (
                "DistributedDataParallel", "DataParallel"):
            raise TypeError(f"model must be the model itself, not a {type(model).__name__}; pass model.module")
        stages = encoder_stages(model) if stages is None else self._check_stages(model, stages)
        max_bytes, spill_path = _check_storage(max_bytes, spill_dir)
        examples = check_int("examples", examples, optional=True)
        for index, stage in enumerate(stages):
            if "forward" in stage.__dict__:
                raise ValueError(
                    f"stages[{index}] ({type(stage).__name__}) already has an instance-level forward (another "
                    "EncoderCache on this model, or accelerate's device hooks); EncoderCache replaces it. "
                    "HINT: call remove() on the other cache first; a model dispatched over devices cannot be cached"
                )
        self.model = model
        self.stages = list(stages)
        try:
            self._signature: Optional[inspect.Signature] = inspect.signature(model.forward)
        except (TypeError, ValueError):  # pragma: no cover - builtins
            self._signature = None
        self.max_bytes = max_bytes
        self.examples = examples
        self._store = _Store(max_bytes, spill_path)
        self._params = [list(stage.parameters()) for stage in self.stages]
        self._state = [[*params, *stage.buffers()] for stage, params in zip(self.stages, self._params)]
        self._kinds: list[Optional[int]] = [None] * len(self.stages)  # output kind, seen on a real run
        self._linked: set[int] = set()  # i: stages[i] was seen receiving the output of stages[i - 1]
        self._plan: Optional[_Plan] = None
        self._nested = False  # inside a prefix-only pass of the model
        self._cut: Optional[int] = None
        self._versions: list[tuple[int, ...]] = []
        self._signatures: set[tuple] = set()
        self.hits = self.misses = self.advanced = 0
        self.invalidations = 0
        self.bytes_per_example: Optional[int] = None
        self._at_cut = [0, 0]  # lookups and served lookups since the cut last changed
        self._warned: set[str] = set()
        ref = functools.partial(_same, self)  # the model holds the cache, as ref() returns it
        for index, stage in enumerate(self.stages):
            stage.__dict__["forward"] = functools.partial(_stage_forward, ref, index, stage)
        self._handles = [
            model.register_forward_pre_hook(functools.partial(_root_pre_hook, ref), with_kwargs=True),
            model.register_forward_hook(functools.partial(_root_post_hook, ref), always_call=True),
        ]

    @staticmethod
    def _check_stages(model: nn.Module, stages: object) -> list[nn.Module]:
        try:
            modules = list(stages)  # type: ignore[call-overload]
        except TypeError:
            raise TypeError(f"stages must be a sequence of nn.Modules, got {type(stages).__name__}") from None
        if not modules:
            raise ValueError("stages must hold at least 1 module")
        inside = {id(m) for m in model.modules()}
        for index, module in enumerate(modules):
            if not isinstance(module, nn.Module):
                raise TypeError(f"stages[{index}] must be an nn.Module, got {type(module).__name__}")
            if id(module) not in inside:
                raise ValueError(f"stages[{index}] ({type(module).__name__}) is not a submodule of the model")
            if module is model:
                raise ValueError(f"stages[{index}] is the model itself; stages are parts of it")
        if len({id(m) for m in modules}) != len(modules):
            raise ValueError("stages must not hold the same module twice")
        return modules

    # -- queries -----------------------------------------------------------
    @property
    def cut(self) -> int:
        """Number of leading stages whose parameters are all frozen (those cached)."""
        return self._frozen_run(self._params)

    def summary(self) -> dict[str, Any]:
        """Counts and sizes, for logs and benchmark records.

        ``capacity`` is how many examples ``max_bytes`` holds at the current
        ``bytes_per_example`` (None before anything is stored).
        """
        per = self.bytes_per_example
        return {
            "cut": self.cut,
            "entries": len(self),
            "hits": self.hits,
            "misses": self.misses,
            "advanced": self.advanced,
            "invalidations": self.invalidations,
            "bytes_per_example": per,
            "capacity": self.max_bytes // per if per else None,
            "nbytes": self.nbytes,
            "disk_bytes": self.disk_bytes,
        }

    # -- control -----------------------------------------------------------
    def invalidate(self) -> None:
        """Drop every stored output (done by itself when the cut moves back or a frozen weight changes)."""
        self._store.clear()
        self.hits = self.misses = self.advanced = 0
        self._at_cut = [0, 0]

    def remove(self) -> None:
        """Take the cache off the model (its own forwards back) and free what it holds."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for stage in self.stages:
            forward = stage.__dict__.get("forward")
            if isinstance(forward, functools.partial) and forward.func is _stage_forward:
                del stage.__dict__["forward"]
        self._plan = None
        self._store.close()

    def __getstate__(self) -> dict[str, Any]:
        # Pickling or deep-copying the model carries the cache along: its settings
        # and what it learned about the stages, not the stored outputs.
        state = dict(self.__dict__)
        state["_store"] = _Store(self.max_bytes, self._store.spill_dir)
        state["_plan"] = None
        state.update(hits=0, misses=0, advanced=0, _at_cut=[0, 0])
        return state

    def __del__(self) -> None:  # the spill file must not outlive the cache
        try:
            self._store.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    # -- per forward ---------------------------------------------------------
    def _begin(self, args: tuple, kwargs: dict) -> None:
        self._plan = None
        if not self.model.training:
            return
        cut = self.cut
        if cut == 0:
            return
        keys = self._keys(args, kwargs)
        if keys is None:
            return
        self._validate(cut)
        self._plan = self._prepare(args, kwargs, keys, cut)

    def _prepare(self, args: tuple, kwargs: dict, keys: list[bytes], cut: int) -> _Plan:
        """Decide how this batch's frozen prefix is obtained; fill what is missing if that pays."""
        device = _device(args, kwargs)
        found = [self._store.get(key, device) for key in keys]
        depths = [entry[0] if entry is not None else 0 for entry in found]
        batch = len(keys)
        self._count(batch, served=sum(1 for d in depths if d))
        if len(set(depths)) == 1:  # the usual case: the whole batch at one depth
            start = depths[0] if self._servable(depths[0]) else 0
            if start == cut:
                self.hits += batch
            elif start:
                self.advanced += batch
            else:
                self.misses += batch
            served = torch.stack([entry[1] for entry in found]) if start else None  # type: ignore[index]
            return _Plan(keys, cut, start, served)
        # A mixed batch (a freeze change or the cache's first pass ended mid-epoch):
        # compute only the rows that lack an output at this cut, in prefix-only
        # passes of the model on those rows, then serve the whole batch.
        if self._servable(cut) and self._store.room(len([d for d in depths if d != cut]) * (self.bytes_per_example or 0)):
            groups: dict[int, list[int]] = {}
            for row, depth in enumerate(depths):
                if depth != cut:
                    groups.setdefault(depth if self._servable(depth) else 0, []).append(row)
            for depth, rows in groups.items():
                served = torch.stack([found[i][1] for i in rows]) if depth else None  # type: ignore[index]
                self._fill_rows(args, kwargs, batch, rows, _Plan([keys[i] for i in rows], cut, depth, served, stop=True))
                if depth:
                    self.advanced += len(rows)
                else:
                    self.misses += len(rows)
            found = [self._store.get(key, device) for key in keys]
            if all(entry is not None and entry[0] == cut for entry in found):
                self.hits += sum(1 for d in depths if d == cut)
                return _Plan(keys, cut, cut, torch.stack([entry[1] for entry in found]))  # type: ignore[index]
        self.misses += batch
        return _Plan(keys, cut, 0)

    def _fill_rows(self, args: tuple, kwargs: dict, batch: int, rows: list[int], plan: _Plan) -> None:
        # Runs the model itself on the given rows, in no-grad mode, and stops it
        # (_PrefixDone) once the last frozen stage has stored its output: the
        # model's own code prepares the stages' other inputs (attention mask).
        index = torch.tensor(rows, device=_device(args, kwargs))

        def take(value: Any) -> Any:
            batched = isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch
            return value.index_select(0, index) if batched else value

        self._nested, self._plan = True, plan
        try:
            with torch.no_grad():
                self.model(*(take(a) for a in args), **{k: take(v) for k, v in kwargs.items()})
        except _PrefixDone:
            pass
        finally:
            self._nested, self._plan = False, None

    def fill(self, batches: Any) -> None:
        """Compute and store the frozen prefix's output for every example of ``batches`` now.

        Optional: a training forward stores what it misses by itself. Filling
        ahead runs the prefix alone, without autograd, in whatever batches are
        given (larger ones run faster; on CPU, rows may then differ from those a
        training batch computes in the last bits).

        Args:
            batches: an iterable of model inputs: dicts of keyword arguments
                (``model(**batch)``), tuples of positional ones, or tensors.
        """
        cut = self.cut
        if cut == 0:
            return
        for batch in batches:
            args, kwargs = ((), dict(batch)) if isinstance(batch, dict) else (
                (batch,), {}) if isinstance(batch, torch.Tensor) else (tuple(batch), {})
            keys = self._keys(args, kwargs)
            if keys is None:
                continue
            self._validate(cut)
            device = _device(args, kwargs)
            rows = [i for i, key in enumerate(keys) if (self._store.get(key, device) or (0,))[0] != cut]
            if rows:
                self._fill_rows(args, kwargs, len(keys), rows, _Plan([keys[i] for i in rows], cut, 0, stop=True))
                self.misses += len(rows)

    def _end(self) -> None:
        self._plan = None

    def _servable(self, start: int) -> bool:
        # Stored outputs of stages[:start] can stand in for those stages only if
        # each of them was seen returning its output kind and stages[start] was
        # seen taking stages[start - 1]'s output unchanged.
        known = all(kind is not None for kind in self._kinds[:start])
        return known and (start == len(self.stages) or start in self._linked)

    def _keys(self, args: tuple, kwargs: dict) -> Optional[list[bytes]]:
        # Named by the forward's parameters, so model(ids, mask) and
        # model(ids, attention_mask=mask) look up the same examples.
        try:
            named = sorted(self._signature.bind(*args, **kwargs).arguments.items())  # type: ignore[union-attr]
        except (TypeError, AttributeError):
            named = [(str(i), a) for i, a in enumerate(args)] + sorted(kwargs.items())
        named = [(name, value) for key, group in named
                 for name, value in (group.items() if isinstance(group, dict) else [(key, group)])]
        tensors = [(name, t) for name, t in named if isinstance(t, torch.Tensor) and t.dim() >= 1]
        if not tensors:
            return None
        batch = tensors[0][1].shape[0]
        tensors = [(name, t) for name, t in tensors if t.shape[0] == batch]
        signature = tuple((name, str(t.dtype), tuple(t.shape[1:])) for name, t in tensors)
        self._note_signature(signature)
        rows = [t.detach().reshape(batch, -1).contiguous().view(torch.uint8).cpu().numpy() for _, t in tensors]
        head = repr(signature).encode()
        return [head + b"".join(r[i].tobytes() for r in rows) for i in range(batch)]

    def _validate(self, cut: int) -> None:
        previous = self._cut
        if previous is not None and cut != previous:
            self._at_cut = [0, 0]
        reason = self._move_cut(cut)
        if reason is not None:
            log.info("layerfreeze: EncoderCache cleared (%d entries): %s", len(self), reason)
            self.invalidations += 1
            self.invalidate()
        shown = self._random_modules(cut)
        if shown is not None:
            raise RuntimeError(
                f"EncoderCache refuses to cache a frozen prefix that is not deterministic: {shown} "
                "(dropout or BatchNorm in training mode) would give another output than the stored one. "
                "HINT: run the frozen stages in eval mode: LayerFreezing(dropout='eval', batchnorm='eval') "
                "keeps frozen layers there through model.train()"
            )

    def _store_rows(self, plan: _Plan, hidden: torch.Tensor) -> None:
        for key, row in zip(plan.keys, hidden.detach()):
            self._store.put(key, plan.cut, row)
        if self.bytes_per_example is None and len(hidden):
            self.bytes_per_example = hidden[0].nelement() * hidden[0].element_size()
            per = self.bytes_per_example
            log.info(
                "layerfreeze: EncoderCache stores %s per example (%s %s); max_bytes=%s holds %d examples",
                _size(per), " x ".join(str(s) for s in hidden.shape[1:]), str(hidden.dtype).replace("torch.", ""),
                _size(self.max_bytes), self.max_bytes // per,
            )
        if self._store.dropped and self._store.spill_dir is None:
            self._warn_once(
                "full",
                "layerfreeze: EncoderCache is full (max_bytes=%s, %s per example, %d examples stored); "
                "the others are recomputed at every step. HINT: raise max_bytes to cover the training "
                "set (examples x %s) or pass spill_dir to keep the rest on disk",
                _size(self.max_bytes), _size(self.bytes_per_example or 0), len(self),
                _size(self.bytes_per_example or 0),
            )

    def _count(self, lookups: int, served: int) -> None:
        self._at_cut[0] += lookups
        self._at_cut[1] += served
        total, hit = self._at_cut
        if self.examples is not None and total >= 2 * self.examples and 4 * hit < total:
            self._warn_once(
                "misses",
                "layerfreeze: EncoderCache served %d of %d lookups since its cut last moved (%.0f%%), "
                "over two passes of %d examples; the rest were recomputed. It finds an example again only "
                "if its input tensors are the same bytes every time. HINT: pad to a fixed length "
                "(padding='max_length'), turn off random augmentation or masking, and batch freeze "
                "changes (max_changes, a fixed-depth policy); or drop the cache",
                hit, total, 100.0 * hit / total, self.examples,
            )

    def _note_signature(self, signature: tuple) -> None:
        if signature in self._signatures:
            return
        self._signatures.add(signature)
        if len(self._signatures) == 3:
            self._warn_once(
                "shapes",
                "layerfreeze: EncoderCache sees inputs of %d different shapes (%s); an example padded to "
                "another length is another key, so the cache misses. HINT: pad every example to one "
                "fixed length (tokenizer(..., padding='max_length', max_length=N))",
                len(self._signatures), "; ".join(sorted({str([s[2] for s in sig]) for sig in self._signatures})),
            )

    def _warn_once(self, what: str, message: str, *args: Any) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning(message, *args)


def _same(cache: "EncoderCache") -> "EncoderCache":
    return cache


def _device(args: tuple, kwargs: dict) -> torch.device:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")  # pragma: no cover - _keys found a tensor


def _root_pre_hook(ref: Callable[[], Optional[EncoderCache]], module: nn.Module, args: tuple, kwargs: dict) -> None:
    cache = ref()
    if cache is not None and not cache._nested:
        if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
            cache._plan = None  # per-layer outputs asked for: every layer must really run
            return
        cache._begin(args, kwargs)


def _root_post_hook(ref: Callable[[], Optional[EncoderCache]], module: nn.Module, args: tuple, output: Any) -> None:
    cache = ref()
    if cache is not None and not cache._nested:
        cache._end()


def _stage_forward(ref: Callable[[], Optional[EncoderCache]], index: int, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # Installed as each stage's instance-level forward (a partial of a module-level
    # function, so the model stays picklable).
    cache = ref()
    plan = cache._plan if cache is not None else None
    if plan is None or index > plan.cut:
        return type(module).forward(module, *args, **kwargs)
    if index < plan.start:  # replaced by the stored outputs
        hidden = plan.served if index == 0 else _hidden_input(args, kwargs)
        return _shaped_like(cache._kinds[index], hidden)  # type: ignore[arg-type]
    hidden_in = _hidden_input(args, kwargs)
    if index > 0 and index - 1 in plan.outputs:
        if hidden_in is not None and hidden_in is plan.outputs[index - 1]:
            cache._linked.add(index)
        else:
            cache._plan = None
            raise RuntimeError(
                f"EncoderCache: stages[{index}] ({type(module).__name__}) did not receive the output of "
                f"stages[{index - 1}] as its first argument, so the model changes it in between and "
                "skipping the frozen stages would change the result. HINT: pass stages=[...] whose "
                "modules each take the previous one's output unchanged"
            )
    if index == plan.cut:
        if plan.stop:  # a prefix-only pass ends here, once the link above is checked
            raise _PrefixDone
        return type(module).forward(module, *args, **kwargs)
    output = type(module).forward(module, *args, **kwargs)
    hidden = _hidden_output(output)
    cache._kinds[index] = 0 if isinstance(output, torch.Tensor) else len(output) if hidden is not None else None
    if hidden is None:
        cache._plan = None
        raise RuntimeError(
            f"EncoderCache: stages[{index}] ({type(module).__name__}) returned a {type(output).__name__}, "
            "not a tensor or a tuple starting with one. HINT: pass stages=[...] whose modules return "
            "the hidden states"
        )
    plan.outputs[index] = hidden
    if index == plan.cut - 1:
        cache._store_rows(plan, hidden)
        if plan.stop and index == len(cache.stages) - 1:
            raise _PrefixDone
    return output
