"""Freeze layers whose representation has converged (after SVCCA freeze training).

Raghu et al. 2017 (SVCCA, arXiv:1706.05806) observed that networks converge
bottom-up and froze lower layers once their representation stopped changing. This
policy measures that directly: on a fixed probe batch, each trainable layer's
output is compared with its output ``every`` steps before, by linear CKA
(Kornblith et al. 2019, arXiv:1905.00414; cheap, and stable with few samples where
CCA is not), and the leading layers whose similarity reaches ``threshold`` freeze.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..layers import _is_compiling, _side_effect_free
from ..state import field_count, field_mapping, field_name_map, field_real
from ..validation import check_choice, check_int, check_number
from .base import Context, Policy, Progress

__all__ = ["Convergence", "centered_gram", "linear_cka", "METRICS"]

log = logging.getLogger("layerfreeze")

METRICS = ("cka",)


def centered_gram(output: torch.Tensor, max_samples: int) -> torch.Tensor:
    """The centred Gram matrix (float64, at most ``max_samples`` square) of a layer output.

    The output is read as rows along its first dimension, each flattened; more rows
    than ``max_samples`` are thinned to evenly spaced ones.
    """
    rows = output.detach().reshape(output.shape[0], -1) if output.dim() > 0 else output.detach().reshape(1, 1)
    if rows.shape[0] > max_samples:
        keep = torch.linspace(0, rows.shape[0] - 1, max_samples, device=rows.device).round().long()
        rows = rows[keep]
    rows = rows.to(torch.float64)
    rows = rows - rows.mean(dim=0, keepdim=True)
    return rows @ rows.T


def linear_cka(gram_a: torch.Tensor, gram_b: torch.Tensor) -> float:
    """Linear CKA of two centred Gram matrices: ``<A, B> / (|A| |B|)``, in [0, 1].

    Two constant representations count as identical (1.0); a constant one against a
    varying one as unrelated (0.0).

    Example:
        >>> x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
        >>> round(linear_cka(centered_gram(x, 8), centered_gram(2 * x + 1, 8)), 6)
        1.0
    """
    if gram_a.shape != gram_b.shape:
        return 0.0
    if torch.equal(gram_a, gram_b):
        return 1.0  # exactly, so that threshold=1.0 means "did not change at all"
    norm_a, norm_b = torch.linalg.norm(gram_a), torch.linalg.norm(gram_b)
    if norm_a == 0 or norm_b == 0:
        return 1.0 if norm_a == norm_b else 0.0
    return min(1.0, max(0.0, float((gram_a * gram_b).sum() / (norm_a * norm_b))))


def _first_tensor(value: Any) -> Optional[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    if isinstance(value, Mapping):
        for item in value.values():
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _map_tensors(value: Any, fn) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    if isinstance(value, Mapping):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _as_call(probe: Any) -> tuple[tuple, dict]:
    # Same convention as LayerFreezing.attach(example_inputs=...).
    if isinstance(probe, tuple):
        return probe, {}
    if isinstance(probe, Mapping):
        return (), dict(probe)
    return (probe,), {}


def _device_of(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _slice_batch(args: tuple, kwargs: dict, limit: int) -> tuple[tuple, dict]:
    # Keep the first `limit` samples of every tensor whose first dimension is the
    # batch size (the first dimension of the first tensor); leave the rest whole.
    first = _first_tensor((args, kwargs))
    if first is None or first.dim() == 0 or first.shape[0] <= limit:
        return args, kwargs
    size = first.shape[0]

    def cut(t: torch.Tensor) -> torch.Tensor:
        return t[:limit] if t.dim() > 0 and t.shape[0] == size else t

    return _map_tensors(args, cut), _map_tensors(kwargs, cut)


def _check_probe(value: Any, path: str) -> Optional[tuple[Any, Any]]:
    # A saved probe: None, or (positional inputs, keyword inputs) holding a tensor.
    if value is None:
        return None
    if (not isinstance(value, (tuple, list)) or len(value) != 2 or not isinstance(value[0], (tuple, list))
            or not isinstance(value[1], Mapping) or _first_tensor(value) is None):
        raise ValueError(
            f"{path} must be None or a pair (positional inputs, keyword inputs) holding a tensor, "
            f"got {type(value).__name__}"
        )
    return value[0], value[1]


def _check_gram(value: Any, path: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[0] != value.shape[1]:
        shown = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)[:80]
        raise ValueError(f"{path} must be a square matrix (a 2-d tensor), got {shown}")
    return value


class Convergence(Policy):
    """Freeze the leading layers whose output on a probe batch has stopped changing.

    Every ``every`` optimizer steps (after the step) the policy runs the model once
    on the probe batch and keeps, for each trainable layer, the centred Gram matrix
    of its output. From the second such probe on, a layer whose similarity with the
    previous probe is ``>= threshold`` counts one more converged check (any lower
    value resets the count); the leading layers with at least ``patience``
    consecutive converged checks are frozen, in order, stopping at the first that
    is not. A layer whose forward did not run on the probe, or returned no tensor,
    cannot be measured and does not hold the others back.

    The probe: pass ``probe=`` (a tensor, a tuple of positional inputs or a dict of
    keyword inputs, as ``example_inputs`` of ``attach``), or leave it None to use
    the first batch the model sees after attach (captured by a forward pre-hook,
    detached and copied). Either way at most ``max_samples`` samples are kept, and
    the probe is saved in :meth:`state_dict` so a resumed run probes the same batch.
    If that first forward runs under ``torch.compile``, the hook only keeps a
    reference to the batch inside the compiled region (removing a hook there breaks
    the graph, an error under ``fullgraph=True``); the copy is taken at the next
    ``LayerFreezing.step()``, and the hook, inert, leaves at the next change of the
    frozen set, when dynamo recompiles anyway.

    The probe pass changes nothing in training: it runs under ``torch.no_grad()``
    in eval mode (no dropout, BatchNorm on running statistics), then every module's
    mode, every buffer and the CPU and CUDA random number generators are restored.

    Cost, bounded: one no-grad forward of at most ``max_samples`` samples every
    ``every`` steps (about ``max_samples / (3 * batch * every)`` of training compute,
    a forward being about a third of a training step), plus a
    ``max_samples x features`` product per trainable layer. Memory: one
    ``max_samples x max_samples`` float64 matrix per layer (32 KiB at 64 samples)
    and the probe itself.

    Under torch.distributed, each layer's similarity is all-reduced (minimum), so
    every rank takes the same decision even when each captured its own probe.

    Args:
        metric: ``"cka"`` (linear CKA), the one offered; see the method card for
            why not SVCCA.
        threshold: similarity at or above which a layer counts as converged, in
            (0, 1]. Default 0.99.
        every: optimizer steps between probes (> 0). Default 100.
        probe: the probe batch, or None for the first training batch.
        max_samples: most samples kept in the probe and rows per layer output. Default 64.
        patience: consecutive converged checks before a layer may freeze. Default 1.

    Example:
        >>> from layerfreeze import LayerFreezing
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.0)  # nothing moves: converged
        >>> policy = Convergence(threshold=0.99, every=2, probe=torch.randn(8, 4))
        >>> freezing = LayerFreezing(policy=policy, interval="step").attach(net, opt, total_steps=4)
        >>> for _ in range(4):
        ...     net(torch.randn(2, 4)).sum().backward(); opt.step(); opt.zero_grad(); freezing.step()
        >>> freezing.frozen_depth
        1
    """

    def __init__(
        self,
        metric: str = "cka",
        threshold: float = 0.99,
        every: int = 100,
        probe: Any = None,
        max_samples: int = 64,
        patience: int = 1,
    ):
        self.metric = check_choice("metric", metric, METRICS)
        self.threshold = check_number("threshold", threshold, 0.0, 1.0, low_open=True)
        self.every = check_int("every", every)
        if probe is not None and _first_tensor(probe) is None:
            raise ValueError(f"probe must be a tensor, a tuple or a dict holding tensors, or None; got {type(probe).__name__}")
        self.max_samples = check_int("max_samples", max_samples)
        self.patience = check_int("patience", patience)
        self._given = probe
        self._probe: Optional[tuple[tuple, dict]] = None
        self._capture: Any = None
        self._call: Optional[tuple[tuple, dict]] = None  # a compiled forward's inputs, copied at after_step
        self._capture_compiled = False  # dynamo inlined the capture hook: remove it at a freeze change
        self._grams: dict[str, torch.Tensor] = {}
        self._streaks: dict[str, int] = {}
        self._similarity: dict[str, float] = {}
        self._target = 0
        self._told_unmeasured = False

    # -- probe -------------------------------------------------------------
    def check(self, context: Context) -> None:
        if self._given is None:
            return
        try:  # fail at attach, not at the first probe deep into training
            self._measure(0, context, self._given_probe(context))
        except Exception as error:
            raise ValueError(
                f"Convergence: the model cannot run on the given probe ({type(error).__name__}: {error}). "
                "HINT: pass probe= a batch the model accepts (a tensor, a tuple of positional inputs or a "
                "dict of keyword inputs), or leave it None to use the first training batch"
            ) from error

    def bind(self, context: Context) -> None:
        super().bind(context)
        if self._given is not None:
            self._probe = self._given_probe(context)
        elif self._probe is None:
            self._capture = context.model.register_forward_pre_hook(self._capture_first, with_kwargs=True)

    def _given_probe(self, context: Context) -> tuple[tuple, dict]:
        device = _device_of(context.model)
        args, kwargs = _slice_batch(*_as_call(self._given), self.max_samples)
        return _map_tensors((args, kwargs), lambda t: t.detach().to(device).clone())

    def _device(self) -> torch.device:
        return _device_of(self.context.model)

    def _capture_first(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if _is_compiling():
            # Only store: reading the policy's state would become a guard (a recompile
            # when it changes), and removing the hook is an error under fullgraph=True.
            self._call, self._capture_compiled = (args, kwargs), True
        elif self._probe is None:
            self._take_probe(*(self._call or (args, kwargs)))  # a compiled first call comes first
            if not self._capture_compiled:
                self._stop_capture()

    def _take_probe(self, args: tuple, kwargs: dict) -> None:
        args, kwargs = _slice_batch(tuple(args), dict(kwargs), self.max_samples)
        self._probe = _map_tensors((args, kwargs), lambda t: t.detach().clone())
        self._call = None

    def _stop_capture(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        self._call = None

    def _frozen_set_changed(self) -> None:
        if self._capture_compiled and self._probe is not None:
            self._stop_capture()  # inert since the probe was taken; dynamo recompiles now anyway

    def release(self) -> None:
        self._stop_capture()

    def hints(self, context: Context) -> list[str]:
        # The first probe is the reference; the first comparison comes at the second.
        if context.total_steps is not None and 2 * self.every > context.total_steps:
            return [
                f"Convergence(every={self.every}) compares its first two probes at step {2 * self.every}, but "
                f"the run has {context.total_steps} steps: nothing will freeze. HINT: pass every <= "
                f"{context.total_steps // 2}"
            ]
        return []

    def _measure(self, depth: int, context: Optional[Context] = None,
                 probe: Optional[tuple[tuple, dict]] = None) -> dict[str, Optional[torch.Tensor]]:
        """Centred Gram of each trainable layer's output on the probe; None if unmeasured."""
        context = context or self.context
        model = context.model
        layers = list(context.layers)[depth:]
        grams: dict[str, Optional[torch.Tensor]] = {layer.name: None for layer in layers}
        by_module: dict[int, list[str]] = {}
        for layer in layers:
            by_module.setdefault(id(layer.module), []).append(layer.name)

        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            for name in by_module.get(id(module), ()):
                if grams[name] is None and tensor is not None:  # first call of a reused module
                    grams[name] = centered_gram(tensor, self.max_samples)

        modules = {id(layer.module): layer.module for layer in layers}
        handles = [m.register_forward_hook(record) for m in modules.values()]
        modes = [(m, m.training) for m in model.modules()]
        cuda = sorted({t.device.index for t in model.parameters() if t.is_cuda and t.device.index is not None})
        args, kwargs = probe or self._probe
        try:
            with torch.random.fork_rng(devices=cuda), _side_effect_free(model):
                for module, _ in modes:
                    module.training = False  # eval without calling train(): no side effects
                model(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
            for module, mode in modes:
                module.training = mode
        return grams

    # -- decisions ---------------------------------------------------------
    def after_step(self, progress: Progress) -> None:
        if self._call is not None:  # the first forward ran compiled: take the probe now, eagerly
            if self._probe is None:
                self._take_probe(*self._call)
            self._call = None  # an inert hook stores each compiled call; keep no batch alive
        if progress.step % self.every != 0 or self._probe is None:
            return
        depth = progress.depth
        grams = self._measure(depth)
        names = [layer.name for layer in self.context.layers]
        trainable = names[depth:]
        similarity: dict[str, Optional[float]] = {}
        for name in trainable:
            now, before = grams.get(name), self._grams.get(name)
            similarity[name] = None if now is None or before is None else linear_cka(now, before)
        similarity = self._agree(trainable, similarity)
        unmeasured = [name for name in trainable if grams.get(name) is None]
        if unmeasured and not self._told_unmeasured:
            self._told_unmeasured = True
            log.info("layerfreeze: Convergence cannot measure %d layer(s) (no tensor output on the probe); "
                     "they do not hold the others back: %s", len(unmeasured), ", ".join(unmeasured[:5]))
        self._grams = {name: gram for name, gram in grams.items() if gram is not None}
        if all(value is None for value in similarity.values()):
            return  # nothing to compare with yet: this probe is the reference
        for name in trainable:
            value = similarity[name]
            if value is not None:
                self._similarity[name] = value
                self._streaks[name] = self._streaks.get(name, 0) + 1 if value >= self.threshold else 0
        target = depth
        for name in trainable:
            if grams.get(name) is None or self._streaks.get(name, 0) >= self.patience:
                target += 1
            else:
                break
        self._target = max(self._target, target)
        log.debug("layerfreeze: Convergence at step %d: similarity %s -> target depth %d",
                  progress.step, similarity, self._target)

    def _agree(self, names: list[str], similarity: dict[str, Optional[float]]) -> dict[str, Optional[float]]:
        # Ranks may hold different probes; the minimum makes every rank decide alike.
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return similarity
        device = self._device() if dist.get_backend() == "nccl" else torch.device("cpu")
        values = torch.tensor([2.0 if similarity[n] is None else similarity[n] for n in names],
                              dtype=torch.float64, device=device)
        dist.all_reduce(values, op=dist.ReduceOp.MIN)
        return {n: (None if v == 2.0 else v) for n, v in zip(names, values.tolist())}

    def decide(self, progress: Progress) -> tuple[int, float]:
        depth = max(self._target, progress.depth)
        return depth, depth / max(len(self.context.layers) - 1, 1)

    @property
    def similarity(self) -> dict[str, float]:
        """Each layer's similarity at its last measured probe."""
        return dict(self._similarity)

    # -- state -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        cpu = (lambda t: t.detach().cpu().clone())
        return {
            "probe": None if self._probe is None else _map_tensors(self._probe, cpu),
            "grams": {name: cpu(gram) for name, gram in self._grams.items()},
            "streaks": dict(self._streaks),
            "similarity": dict(self._similarity),
            "target": self._target,
        }

    def check_state(self, state: Any, path: str = "policy") -> dict[str, Any]:
        keys = ("probe", "grams", "streaks", "similarity", "target")
        state = field_mapping(state, path, keys, source="Convergence")
        return {
            "probe": _check_probe(state["probe"], f"{path}.probe"),
            "grams": field_name_map(state["grams"], f"{path}.grams", _check_gram),
            "streaks": field_name_map(state["streaks"], f"{path}.streaks", field_count),
            "similarity": field_name_map(state["similarity"], f"{path}.similarity", field_real),
            "target": field_count(state["target"], f"{path}.target"),
        }

    def apply_state(self, checked: dict[str, Any]) -> None:
        device = self._device()
        move = (lambda t: t.detach().to(device).clone())
        if checked["probe"] is not None:
            args, kwargs = checked["probe"]
            self._probe = (tuple(_map_tensors(list(args), move)), dict(_map_tensors(kwargs, move)))
            self._stop_capture()
        self._grams = {name: move(gram) for name, gram in checked["grams"].items()}
        self._streaks = checked["streaks"]
        self._similarity = checked["similarity"]
        self._target = checked["target"]

    def describe(self) -> dict[str, Any]:
        return {
            "policy": "Convergence",
            "metric": self.metric,
            "threshold": self.threshold,
            "every": self.every,
            "max_samples": self.max_samples,
            "patience": self.patience,
        }
