"""Freeze a fixed set of leading layers once, at a given point of training.

The usual recipe for fine-tuning a pretrained encoder: the embeddings and the
lower blocks barely move, so they are frozen early and never change again
(AutoFreeze, Liu et al. 2021, freezes BERT's embeddings and lower blocks in
one go; Lee et al. 2019, "What would Elsa do?", freeze the lower blocks from the
start). One change of the frozen set means one rebuild of a
:class:`layerfreeze.EncoderCache` and one ``torch.compile`` recompilation at most.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

from ..schedule import check_fraction, depth_for_fraction
from ..validation import check_int
from .base import Context, Policy, Progress

if TYPE_CHECKING:  # pragma: no cover
    from ..layers import Layer

__all__ = ["FixedDepth"]


class FixedDepth(Policy):
    """Freeze the first ``depth`` layers (or every layer up to ``through``) once ``start`` of training is done.

    Args:
        depth: number of leading layers to freeze (in LayerFreezing's layer
            order), at least 1. Give one of ``depth``, ``through`` and ``fraction``.
        through: a qualified module name; every layer up to and including the last
            one at or under that name freezes, for example
            ``"bert.encoder.layer.3"`` for the embeddings and the first four blocks
            of a BERT model.
        fraction: a share of the layers, in [0, 1], by Composer's rule:
            ``int(fraction * (layers - 1))`` of them (for a model-independent setting).
        start: fraction of training after which the layers freeze, in [0, 1):
            the first decision with ``step / total_steps >= start`` freezes them.
            With ``start=0`` that is the first decision (after the first step, or
            the first epoch with ``interval="epoch"``); to train frozen from the
            very first step, call ``freezing.set_depth(policy.target(freezing.layers))``
            after ``attach`` (this policy keeps that depth).

    Raises:
        ValueError, TypeError: for bad arguments; ``attach`` raises ValueError when
            ``depth`` or ``through`` does not fit the model's layers.

    Example:
        >>> import torch, layerfreeze as lf
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> freezing = lf.LayerFreezing(policy=FixedDepth(through="1", start=0.5), interval="step")
        >>> _ = freezing.attach(net, opt, total_steps=4)
        >>> depths = []
        >>> for _ in range(4):
        ...     net(torch.randn(2, 4)).sum().backward(); opt.step(); opt.zero_grad(); freezing.step()
        ...     depths.append(freezing.frozen_depth)
        >>> depths
        [0, 2, 2, 2]
    """

    def __init__(self, depth: Optional[int] = None, *, through: Optional[str] = None,
                 fraction: Optional[float] = None, start: float = 0.0):
        given = [name for name, value in (("depth", depth), ("through", through), ("fraction", fraction))
                 if value is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of depth, through and fraction, got depth={depth!r}, through={through!r}, "
                f"fraction={fraction!r}"
            )
        depth = check_int("depth", depth) if depth is not None else None
        if through is not None and (not isinstance(through, str) or not through):
            raise ValueError(f"through must be a non-empty module name, got {through!r}")
        self.fraction = check_fraction("fraction", fraction) if fraction is not None else None
        self.start = check_fraction("start", start, allow_one=False)
        self.depth = depth
        self.through = through

    def target(self, layers: Sequence["Layer"]) -> int:
        """The depth this policy freezes on ``layers`` (LayerFreezing's ``layers``).

        Raises:
            ValueError: if ``depth`` or ``through`` does not fit these layers.
        """
        names = [layer.name for layer in layers]
        limit = len(names) - 1  # the last layer is never frozen
        if self.through is not None:
            under = [i for i, name in enumerate(names) if name == self.through or name.startswith(self.through + ".")]
            if not under:
                shown = ", ".join(repr(n) for n in names[:4]) + (", ..." if len(names) > 4 else "")
                raise ValueError(f"through={self.through!r} names no layer of this model (its layers: {shown})")
            depth = under[-1] + 1
            if depth > limit:
                raise ValueError(
                    f"through={self.through!r} reaches the last layer ({names[-1]!r}), which is never frozen; "
                    "name a module before it"
                )
            return depth
        if self.fraction is not None:  # Composer's rule: int(fraction * (layers - 1))
            depth = depth_for_fraction(self.fraction, len(names))
            if depth == 0:
                raise ValueError(
                    f"fraction={self.fraction} of this model's {limit} freezable layers is 0 layers; "
                    f"HINT: raise fraction to at least {1 / max(limit, 1):.3g}"
                )
            return depth
        if self.depth > limit:  # type: ignore[operator]
            raise ValueError(f"depth={self.depth} is more than this model's {limit} freezable layers")
        return self.depth  # type: ignore[return-value]

    def check(self, context: Context) -> None:
        self.target(context.layers)

    def decide(self, progress: Progress) -> tuple[int, float]:
        if progress.current_duration < self.start:
            return 0, 0.0
        # Resolved at each decision: order="execution" may reorder the layers after attach.
        depth = self.target(self.context.layers)
        return depth, depth / max(len(self.context.layers) - 1, 1)

    def describe(self) -> dict[str, Any]:
        return {"policy": "FixedDepth", "depth": self.depth, "through": self.through, "fraction": self.fraction,
                "start": self.start}
