"""Named freezing variants that ``layerfreeze bench`` compares side by side.

A variant is a name, a one-line description and a factory that builds a fresh
:class:`layerfreeze.LayerFreezing` for one run (or returns ``None`` for the
baseline without freezing). The bench calls the factory once per run, so state
never leaks from one run into the next.

Adding a variant is one call, typically at import time of the module that
defines its policy::

    from layerfreeze.bench.variants import register

    register("freezeout", lambda interval: LayerFreezing(policy=FreezeOut(t0=0.5),
                                                         interval=interval),
             "FreezeOut, cubic spacing from t0=0.5")

Factories are called with keyword arguments, each passed only when the factory's
signature takes it: ``interval`` (``"epoch"`` or ``"step"``, from ``layerfreeze bench
--interval``) and ``total_steps`` (the run's optimizer steps, for policies that look
every so many steps).

A variant registered with ``lr_scale=k`` trains at k times the task's peak
learning rate (the same schedule): a setting that trains only the top layers and a
new head may want a larger step than the whole model, whose rate the task's recipe
is tuned for. The baseline always trains at the task's rate.

A variant registered with ``cache=True`` also runs the model through
:class:`layerfreeze.PrefixCache` (the model split into stages, each example's frozen
prefix output kept by its index), which needs fixed inputs: every bench task qualifies
(no augmentation, tokenized once).
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..algorithm import LayerFreezing

__all__ = ["Variant", "VARIANTS", "register", "get_variant", "parse_variants", "DEFAULT_VARIANTS", "BASELINE"]

Factory = Callable[..., Optional[LayerFreezing]]


@dataclass(frozen=True)
class Variant:
    """One bench variant.

    Attributes:
        name: the name used on the command line (``--variants none,composer``).
        factory: ``factory(interval=...)`` returns a new LayerFreezing, or None for
            training without freezing.
        description: one line shown by ``layerfreeze bench --list-variants`` and in
            the results JSON.
        cache: run the model through PrefixCache (frozen-prefix activation caching).
        lr_scale: train at this multiple of the task's peak learning rate.
    """

    name: str
    factory: Factory
    description: str
    cache: bool = False
    lr_scale: float = 1.0

    def build(self, interval: str = "epoch", total_steps: Optional[int] = None) -> Optional[LayerFreezing]:
        """A fresh LayerFreezing for one run (None for the baseline)."""
        offered: dict[str, Any] = {"interval": interval, "total_steps": total_steps}
        try:
            parameters = inspect.signature(self.factory).parameters
        except (TypeError, ValueError):  # a builtin without a signature: give it the interval only
            parameters = {"interval": None}  # type: ignore[assignment]
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        kwargs = {k: v for k, v in offered.items() if takes_any or k in parameters}
        freezing = self.factory(**kwargs)
        if freezing is not None and not isinstance(freezing, LayerFreezing):
            raise TypeError(
                f"variant {self.name!r}: its factory must return a LayerFreezing or None, "
                f"got {type(freezing).__name__}"
            )
        return freezing


VARIANTS: dict[str, Variant] = {}

#: What ``layerfreeze bench`` runs with no ``--variants``: the baseline, Composer's
#: defaults, and the earlier start this project recommends.
DEFAULT_VARIANTS = ("none", "composer", "start0.1")
#: The variant without freezing: trained at every budget, it traces the equal-time frontier.
BASELINE = "none"


def register(name: str, factory: Factory, description: str, *, replace: bool = False,
             cache: bool = False, lr_scale: float = 1.0) -> Variant:
    """Add a variant under ``name``; returns it.

    Args:
        name: command-line name; letters, digits, ``.``, ``_`` and ``-``.
        factory: called as ``factory(interval="epoch"|"step")`` for each run; returns a
            new LayerFreezing, or None for no freezing.
        description: one line saying what the variant does.
        replace: allow overwriting an existing variant of that name.
        cache: also run the model through PrefixCache.
        lr_scale: train at this multiple of the task's peak learning rate (positive, finite).

    Raises:
        ValueError: if the name is malformed or taken (and ``replace`` is False), or
            ``lr_scale`` is not a positive finite number.
        TypeError: if ``factory`` is not callable.
    """
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "._-" for c in name):
        raise ValueError(f"variant name must be letters, digits, '.', '_' or '-', got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory for variant {name!r} must be callable, got {type(factory).__name__}")
    if name in VARIANTS and not replace:
        raise ValueError(f"variant {name!r} is already registered; pass replace=True to overwrite it")
    if isinstance(lr_scale, bool) or not isinstance(lr_scale, numbers.Real) or not 0 < lr_scale < math.inf:
        raise ValueError(f"lr_scale for variant {name!r} must be a positive finite number, got {lr_scale!r}")
    if name == BASELINE and lr_scale != 1:
        raise ValueError(f"lr_scale of the baseline {BASELINE!r} must be 1: its runs at every budget are the "
                         f"frontier, trained at the task's rate; got {lr_scale!r}")
    variant = Variant(name, factory, str(description), bool(cache), float(lr_scale))
    VARIANTS[name] = variant
    return variant


def get_variant(name: str) -> Variant:
    """The variant called ``name``; ValueError naming the registered ones otherwise."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; registered variants: {', '.join(VARIANTS)}") from None


def parse_variants(text: str) -> list[Variant]:
    """Variants from a comma-separated list such as ``"none,composer"``; ``"all"`` for every
    registered variant, in registration order.

    Raises:
        ValueError: for an empty list, an unknown name or a repeated name.
    """
    if text.strip() == "all":
        return list(VARIANTS.values())
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError(f"--variants needs at least one name, got {text!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--variants names {repeated[0]!r} twice")
    return [get_variant(name) for name in names]


def _none(interval: str = "epoch") -> None:
    return None


def _composer(interval: str = "epoch") -> LayerFreezing:
    # Composer's defaults (freeze_start=0.5, freeze_level=1.0), BatchNorm statistics
    # kept training as Composer does.
    return LayerFreezing(freeze_start=0.5, freeze_level=1.0, interval=interval)


def _start01(interval: str = "epoch") -> LayerFreezing:
    # Freezing from 10% of training on: the earlier start this project recommends
    # for short runs, where Composer's 0.5 leaves little time to save anything.
    return LayerFreezing(freeze_start=0.1, freeze_level=1.0, interval=interval)


register("none", _none, "no freezing (the baseline every speedup is measured against)")
register("composer", _composer, "Composer's defaults: freeze_start=0.5, freeze_level=1.0")
register("start0.1", _start01, "freeze_start=0.1, freeze_level=1.0 (recommended for short runs)")


def _flops(interval: str = "epoch") -> LayerFreezing:
    # Cost-aware: freeze_level counts forward FLOPs, not layers, so the schedule
    # removes compute at the pace of start0.1 (the layers of a ResNet's last stage
    # cost as much as its first stage's, with 4x fewer pixels and 4x more weights).
    return LayerFreezing(freeze_start=0.1, freeze_level=1.0, measure="flops", interval=interval)


def _cache(interval: str = "epoch") -> LayerFreezing:
    # start0.1's schedule, plus frozen-prefix caching (the bench wraps the model in a
    # PrefixCache). Frozen BatchNorm is pinned to eval mode: a BatchNorm normalising
    # with batch statistics makes an example's output depend on its batch, so it
    # cannot be cached.
    return LayerFreezing(freeze_start=0.1, freeze_level=1.0, batchnorm="eval", interval=interval)


register("flops", _flops, "cost-aware: freeze_start=0.1, freeze_level counts forward FLOPs (measure='flops')")
register("cache", _cache, "start0.1's schedule with PrefixCache: frozen prefix computed once per example "
         "(frozen BatchNorm and dropout in eval mode)", cache=True)


# Policies of issue 7. The adaptive ones look every `every` steps: about a dozen
# looks a run (at least 5 steps apart), whatever the run's length.
def _every(total_steps: Optional[int]) -> int:
    return max(5, (total_steps or 60) // 12)


def _freezeout(interval: str = "epoch") -> LayerFreezing:
    from ..policies import FreezeOut

    return LayerFreezing(policy=FreezeOut(t0=0.5, spacing="cubic", scale_lr=True), interval=interval)


def _gradient(interval: str = "epoch", total_steps: Optional[int] = None) -> LayerFreezing:
    from ..policies import GradientChange

    return LayerFreezing(policy=GradientChange(every=_every(total_steps), percentile=50.0), interval=interval)


def _convergence(interval: str = "epoch", total_steps: Optional[int] = None) -> LayerFreezing:
    from ..policies import Convergence

    return LayerFreezing(policy=Convergence(metric="cka", threshold=0.99, every=_every(total_steps)),
                         interval=interval)


register("freezeout", _freezeout, "FreezeOut: per-layer cosine LR to zero, then freeze; t0=0.5, cubic, scaled")
register("gradient", _gradient, "GradientChange (AutoFreeze): every max(5, steps/12) steps, percentile=50")
register("convergence", _convergence,
         "Convergence (linear CKA on a probe batch): threshold=0.99, every max(5, steps/12) steps")


def _fixed_cache(interval: str = "epoch") -> LayerFreezing:
    # The fastest fine-tuning setting of docs/performance.md (issue 11): 70% of the
    # layers (on MiniLM: the embeddings and the first four of six blocks) frozen from
    # the first decision on, never changed again, their outputs cached; dropout and
    # BatchNorm in eval mode there.
    from ..policies import FixedDepth

    return LayerFreezing(policy=FixedDepth(fraction=0.7), interval="step", dropout="eval", batchnorm="eval",
                         max_changes=1)


register("fixed0.7-cache", _fixed_cache, "70% of the layers (MiniLM: embeddings + 4 of 6 blocks) frozen after the "
         "first step, never changed, and cached (docs/performance.md, fine-tuning)", cache=True)
register("fixed0.7-cache-lr2", _fixed_cache, "fixed0.7-cache with a larger step for what still trains (the top "
         "layers and the new head; docs/performance.md, fine-tuning)", cache=True, lr_scale=2.0)
