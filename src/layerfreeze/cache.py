"""Frozen-prefix activation caching: compute a frozen prefix once per example.

Once the leading layers of a model are frozen, their output for a training
example never changes, provided the example's input is fixed (no random
augmentation, as in fine-tuning on tokenized text) and the prefix is
deterministic. Caching that output per example (keyed by its dataset index)
skips the prefix's forward pass too, so a step costs about ``1 - f`` of an
unfrozen one instead of ``1 - 2f/3`` (the performance model of docs/performance.md). The idea is the one
behind FreezeOut's and AutoFreeze's caching of frozen activations (Brock et al.
2017; Liu et al. 2021, "AutoFreeze", section 3.3).

The model is given as *stages*, modules called one after the other; the cache
cuts after the longest run of leading stages whose parameters are all frozen
(``requires_grad=False``), so the cut follows :class:`layerfreeze.LayerFreezing`
by itself. When the cut moves deeper, cached outputs are kept and carried through
the newly frozen stages on their next use (so a progressive schedule recomputes
only what it newly froze); they are dropped when the cut moves back or a frozen
weight is changed in place.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    >>> net[0].requires_grad_(False)  # frozen, e.g. by LayerFreezing
    Linear(in_features=4, out_features=8, bias=True)
    >>> cache = PrefixCache(net)
    >>> x, keys = torch.randn(3, 4), torch.tensor([10, 11, 12])
    >>> y = cache(x, keys)     # computes net[0:2] and stores it per example
    >>> y2 = cache(x, keys)    # reads net[0:2]'s output back; only net[2] runs
    >>> bool(torch.equal(y, y2)), cache.cut, cache.hits
    (True, 2, 3)
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Hashable, Optional, Sequence, Union

import torch
from torch import nn

from .validation import check_int

__all__ = ["PrefixCache", "nondeterministic_modules"]

log = logging.getLogger("layerfreeze")

Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]


def nondeterministic_modules(module: nn.Module) -> list[str]:
    """Names of submodules whose output in their current mode depends on more than the example.

    Dropout (and AlphaDropout, RReLU) in training mode draw random numbers;
    BatchNorm in training mode normalises with the statistics of the whole batch,
    so one example's output depends on the others in its batch. Either makes a
    cached output differ from the one the model would compute now.
    """
    found = []
    for name, sub in module.named_modules():
        if not sub.training:
            continue
        if isinstance(sub, (nn.modules.dropout._DropoutNd, nn.RReLU)):
            if getattr(sub, "p", 1.0) > 0 or isinstance(sub, nn.RReLU):
                found.append(name or type(sub).__name__)
        elif isinstance(sub, nn.MultiheadAttention) and sub.dropout > 0:
            found.append(name or type(sub).__name__)
        elif isinstance(sub, nn.modules.batchnorm._NormBase) and not isinstance(
            sub, nn.modules.instancenorm._InstanceNorm
        ):
            found.append(name or type(sub).__name__)
    return found


class _DiskStore:
    """Per-example tensors appended to one file and read back with ``os.pread``."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        handle, path = tempfile.mkstemp(prefix="layerfreeze-prefix-", suffix=".bin", dir=directory)
        self.fd = handle
        self.path = Path(path)
        self.index: dict[Hashable, tuple[int, int, int, torch.dtype, torch.Size]] = {}
        self.nbytes = 0

    def put(self, key: Hashable, cut: int, tensor: torch.Tensor) -> None:
        # Appends; space of a replaced entry is reclaimed only by clear().
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        os.pwrite(self.fd, data, self.nbytes)
        self.index[key] = (cut, self.nbytes, len(data), tensor.dtype, tensor.shape)
        self.nbytes += len(data)

    def get(self, key: Hashable, device: torch.device) -> Optional[tuple[int, torch.Tensor]]:
        entry = self.index.get(key)
        if entry is None:
            return None
        cut, offset, size, dtype, shape = entry
        data = bytearray(os.pread(self.fd, size, offset))
        return cut, torch.frombuffer(data, dtype=dtype).reshape(shape).to(device)

    def clear(self) -> None:
        self.index.clear()
        os.ftruncate(self.fd, 0)
        self.nbytes = 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.path.unlink(missing_ok=True)


def _check_storage(max_bytes: object, spill_dir: object) -> tuple[int, Optional[Path]]:
    """The storage arguments both caches take: ``max_bytes`` and ``spill_dir``, checked."""
    max_bytes = check_int("max_bytes", max_bytes, minimum=0)
    if spill_dir is not None and not isinstance(spill_dir, (str, os.PathLike)):
        raise TypeError(f"spill_dir must be a path or None, got {type(spill_dir).__name__}")
    return max_bytes, Path(spill_dir) if spill_dir is not None else None


class _Store:
    """Per-key tensors (each tagged with the cut it was computed at) in memory up to a bound, then on disk.

    Nothing is evicted: with epochs that visit every example once, eviction would
    only trade one miss for another. A key that fits nowhere is dropped (and
    recomputed on its next use).
    """

    def __init__(self, max_bytes: int, spill_dir: Optional[Path]):
        self.max_bytes = max_bytes
        self.spill_dir = spill_dir
        self.memory: dict[Hashable, tuple[int, torch.Tensor]] = {}
        self.disk: Optional[_DiskStore] = None
        self.nbytes = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self.memory) + (len(self.disk.index) if self.disk is not None else 0)

    @property
    def disk_bytes(self) -> int:
        return self.disk.nbytes if self.disk is not None else 0

    def room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more can be stored (in memory, or on disk when spilling)."""
        return self.spill_dir is not None or self.nbytes + nbytes <= self.max_bytes

    def get(self, key: Hashable, device: torch.device) -> Optional[tuple[int, torch.Tensor]]:
        entry = self.memory.get(key)
        if entry is None and self.disk is not None:
            entry = self.disk.get(key, device)
        return entry

    def put(self, key: Hashable, cut: int, row: torch.Tensor) -> None:
        old = self.memory.get(key)
        if old is not None and old[0] == cut or self.disk is not None and self.disk.index.get(key, (None,))[0] == cut:
            return  # a key repeated in one batch
        if old is not None:
            self.nbytes -= old[1].nelement() * old[1].element_size()
            del self.memory[key]
        size = row.nelement() * row.element_size()
        if self.nbytes + size <= self.max_bytes:
            self.memory[key] = (cut, row.detach().clone())
            self.nbytes += size
            if self.disk is not None:
                self.disk.index.pop(key, None)
            return
        if self.spill_dir is not None:
            if self.disk is None:
                self.disk = _DiskStore(self.spill_dir)
                log.info("layerfreeze: prefix cache is full (max_bytes=%d); spilling to %s",
                         self.max_bytes, self.disk.path)
            self.disk.put(key, cut, row)
            return
        if self.disk is not None:
            self.disk.index.pop(key, None)
        self.dropped += 1

    def clear(self) -> None:
        self.memory.clear()
        self.nbytes = 0
        if self.disk is not None:
            self.disk.clear()

    def close(self) -> None:
        self.clear()
        if self.disk is not None:
            self.disk.close()
            self.disk = None


def _check_stages(stages: object) -> list[nn.Module]:
    if isinstance(stages, nn.Module) and not isinstance(stages, nn.Sequential):
        raise TypeError(
            f"stages must be an nn.Sequential or a sequence of nn.Modules, got a {type(stages).__name__}; "
            "HINT: give a split as [prefix_module, suffix_module]"
        )
    try:
        modules = list(stages)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(
            f"stages must be an nn.Sequential or a sequence of nn.Modules, got {type(stages).__name__}"
        ) from None
    if len(modules) < 2:
        raise ValueError(f"stages must hold at least 2 modules (a prefix and a suffix), got {len(modules)}")
    for index, module in enumerate(modules):
        if not isinstance(module, nn.Module):
            raise TypeError(f"stages[{index}] must be an nn.Module, got {type(module).__name__}")
    return modules


class _CachedStages:
    """What PrefixCache and EncoderCache share: per-example outputs of leading
    stages in a :class:`_Store`, kept while those stages' weights stay as they were.

    The subclass sets ``stages``, ``_store``, ``_params`` (each stage's
    parameters), ``_state`` (the tensors whose edits make an output stale),
    ``_cut`` and ``_versions``.
    """

    stages: list[nn.Module]
    _store: _Store
    _params: list[list[nn.Parameter]]
    _state: list[list[torch.Tensor]]
    _cut: Optional[int]
    _versions: list[tuple[int, ...]]

    @staticmethod
    def _frozen_run(params: Sequence[list[nn.Parameter]]) -> int:
        """How many of ``params`` in a row, from the first, hold no trainable parameter."""
        cut = 0
        for stage_params in params:
            if any(p.requires_grad for p in stage_params):
                break
            cut += 1
        return cut

    @property
    def nbytes(self) -> int:
        """Bytes of stored outputs held in memory (at most ``max_bytes``)."""
        return self._store.nbytes

    @property
    def disk_bytes(self) -> int:
        """Bytes spilled to ``spill_dir``."""
        return self._store.disk_bytes

    def __len__(self) -> int:
        return len(self._store)

    def _move_cut(self, cut: int) -> Optional[str]:
        """Record ``cut`` and the frozen stages' versions; say why stored outputs are stale, if they are."""
        # The tensors' version counters move on every in-place write (an optimizer
        # step, load_state_dict), so an edited prefix is noticed without hashing it.
        versions = [tuple(t._version for t in state) for state in self._state[:cut]]
        previous = self._cut
        reason = None
        if previous is not None and len(self):
            if cut < previous:
                reason = f"the cut moved back from {previous} to {cut} stages"
            elif versions[:previous] != self._versions:
                reason = "a frozen stage's weights changed"
        self._cut, self._versions = cut, versions
        return reason

    def _random_modules(self, cut: int) -> Optional[str]:
        """The dropout and training-mode BatchNorm modules in ``stages[:cut]``, as a short list; None if none."""
        random = [f"stages[{i}].{name}" if name else f"stages[{i}]"
                  for i, stage in enumerate(self.stages[:cut]) for name in nondeterministic_modules(stage)]
        if not random:
            return None
        return ", ".join(random[:3]) + (f" and {len(random) - 3} more" if len(random) > 3 else "")


class PrefixCache(_CachedStages):
    """Cache, per training example, the output of a model's frozen leading stages.

    Call it in place of the model: ``cache(inputs, keys)`` runs the frozen prefix
    (or reads its output back) and then the trainable stages. Use it only when
    each example's input is the same every time it is seen. Off unless you build
    one: nothing in :class:`layerfreeze.LayerFreezing` caches by itself.

    Args:
        stages: the model as modules called in order, each on the previous one's
            output: an ``nn.Sequential``, or a list such as ``[prefix, suffix]``
            for a model split by hand. The first stage gets ``*inputs``.
        max_bytes: memory the cached outputs may take, in bytes. Default 1 GiB.
            When it is full, new outputs spill to ``spill_dir`` or, without one,
            are recomputed each time (entries are never evicted: with epochs that
            visit every example, evicting would only trade one miss for another).
        spill_dir: a directory for outputs past ``max_bytes`` (one file, removed
            by :meth:`close`); None keeps everything in memory.
        allow_nondeterministic: cache even if a prefix module is random or batch
            dependent in its current mode (dropout, BatchNorm in training mode).
            By default that raises, because the cached output would differ from
            the one the model computes.

    Note:
        On a model that may use activation checkpointing, ``LayerFreezing``
        finishes its checks on the first training forward of the whole model and
        until then makes frozen layers' outputs require grad; a loop that only
        calls the stages should call the model once after attach.

    Attributes:
        hits, misses: examples read back from the cache / computed from their
            input, since the last invalidation.
        advanced: examples whose cached output of an earlier, shallower cut was
            carried through the newly frozen stages.

    Raises:
        TypeError, ValueError: for bad arguments.
    """

    def __init__(
        self,
        stages: Union[nn.Sequential, Sequence[nn.Module]],
        *,
        max_bytes: int = 1 << 30,
        spill_dir: Optional[Union[str, os.PathLike]] = None,
        allow_nondeterministic: bool = False,
    ):
        self.stages = _check_stages(stages)
        self.max_bytes, self.spill_dir = _check_storage(max_bytes, spill_dir)
        self.allow_nondeterministic = bool(allow_nondeterministic)
        self._params = [[p for p in stage.parameters()] for stage in self.stages]
        # What the fingerprint watches. Buffers only when the prefix must be
        # deterministic: a BatchNorm left training (allowed by the caller) moves
        # its statistics on every miss, which would clear the cache each time.
        self._state = [
            [*params, *(stage.buffers() if not self.allow_nondeterministic else ())]
            for stage, params in zip(self.stages, self._params)
        ]
        # key -> (cut the output was computed at, output). Entries of an earlier,
        # shallower cut stay valid when the cut moves deeper: they are advanced
        # through the newly frozen stages on their next use.
        self._store = _Store(self.max_bytes, self.spill_dir)
        self.hits = 0
        self.misses = 0
        self.advanced = 0
        self._cut: Optional[int] = None
        self._versions: list[tuple[int, ...]] = []

    # -- queries -----------------------------------------------------------
    @property
    def cut(self) -> int:
        """Number of leading stages cached now: those whose parameters are all frozen.

        The last stage never counts: something must train.
        """
        return self._frozen_run(self._params[:-1])

    # -- use ---------------------------------------------------------------
    def __call__(self, inputs: Inputs, keys: Union[torch.Tensor, Sequence[Hashable]]) -> torch.Tensor:
        """Run the whole model on a batch, its frozen prefix from the cache where possible.

        Args:
            inputs: the batch: a tensor, or a tuple of tensors given to the first
                stage as positional arguments; examples along dimension 0.
            keys: one key per example (its dataset index), a 1-D tensor or a list.

        Returns:
            The output of the last stage.
        """
        cut = self.cut
        if cut == 0:
            args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
            hidden = self.stages[0](*args)
            cut = 1
        else:
            hidden = self.prefix(inputs, keys, cut=cut)
        for stage in self.stages[cut:]:
            hidden = stage(hidden)
        return hidden

    def prefix(self, inputs: Inputs, keys: Union[torch.Tensor, Sequence[Hashable]],
               cut: Optional[int] = None) -> Any:
        """Output of the first ``cut`` stages (default: the frozen ones) for the batch.

        With ``cut == 0`` it returns ``inputs`` as a tuple, untouched.

        Raises:
            ValueError: for a ``cut`` past the frozen stages, whose outputs still change.
        """
        args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        frozen = self.cut
        if cut is None:
            cut = frozen
        elif isinstance(cut, bool) or not isinstance(cut, int) or not 0 <= cut <= frozen:
            raise ValueError(f"cut must be an int in [0, {frozen}] (the frozen stages), got {cut!r}")
        if cut == 0:
            return args
        key_list = keys.tolist() if isinstance(keys, torch.Tensor) else list(keys)
        batch = args[0].shape[0]
        if len(key_list) != batch:
            raise ValueError(f"keys must hold one key per example: got {len(key_list)} keys for a batch of {batch}")
        self._validate(cut)
        device = args[0].device
        found = [self._lookup(key, device) for key in key_list]
        rows: list[Optional[torch.Tensor]] = [None] * batch
        stale: dict[int, list[int]] = {}  # earlier cut -> positions to advance
        missing = []
        for i, entry in enumerate(found):
            if entry is None:
                missing.append(i)
            elif entry[0] == cut:
                rows[i] = entry[1]
            else:
                stale.setdefault(entry[0], []).append(i)
        self.hits += batch - len(missing) - sum(len(v) for v in stale.values())
        self.misses += len(missing)
        for earlier, positions in stale.items():
            self.advanced += len(positions)
            with torch.no_grad():
                hidden = torch.stack([found[i][1] for i in positions])  # type: ignore[index]
                for stage in self.stages[earlier:cut]:
                    hidden = stage(hidden)
            self._store_rows([key_list[i] for i in positions], cut, hidden)
            for position, i in enumerate(positions):
                rows[i] = hidden[position]
        if len(missing) == batch:
            computed = self._run_prefix(args, cut)
            self._store_rows(key_list, cut, computed)
            return computed
        if missing:
            index = torch.tensor(missing, device=device)
            computed = self._run_prefix(tuple(a.index_select(0, index) for a in args), cut)
            self._store_rows([key_list[i] for i in missing], cut, computed)
            for position, i in enumerate(missing):
                rows[i] = computed[position]
        return torch.stack(rows)  # type: ignore[arg-type]

    def invalidate(self) -> None:
        """Drop every cached output (done by itself when the cut moves back or a frozen weight changes)."""
        self._store.clear()
        self.hits = self.misses = self.advanced = 0

    def close(self) -> None:
        """Drop everything and delete the spill file."""
        self.invalidate()
        self._store.close()

    def __del__(self) -> None:  # the spill file must not outlive the cache
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    # -- internals ---------------------------------------------------------
    def _validate(self, cut: int) -> None:
        reason = self._move_cut(cut)
        if reason is not None:
            log.info("layerfreeze: prefix cache cleared (%d entries): %s", len(self), reason)
            self.invalidate()
        if self.allow_nondeterministic:
            return
        shown = self._random_modules(cut)
        if shown is not None:
            raise RuntimeError(
                f"PrefixCache refuses to cache a prefix that is not deterministic: {shown} "
                "(dropout or BatchNorm in training mode) would give a different output than the cached one. "
                "HINT: run the frozen stages in eval mode: LayerFreezing(dropout='eval', batchnorm='eval') "
                "keeps frozen layers there through model.train(); or pass allow_nondeterministic=True to cache anyway"
            )

    def _run_prefix(self, args: tuple[torch.Tensor, ...], cut: int) -> torch.Tensor:
        with torch.no_grad():
            hidden = self.stages[0](*args)
            for stage in self.stages[1:cut]:
                hidden = stage(hidden)
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(
                f"the prefix (stages[:{cut}]) must return a tensor to be cached, got {type(hidden).__name__}"
            )
        return hidden

    def _lookup(self, key: Hashable, device: torch.device) -> Optional[tuple[int, torch.Tensor]]:
        return self._store.get(key, device)

    def _store_rows(self, keys: Sequence[Hashable], cut: int, computed: torch.Tensor) -> None:
        for key, row in zip(keys, computed):
            self._store.put(key, cut, row)
