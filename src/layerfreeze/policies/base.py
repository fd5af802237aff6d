"""The interface every freezing policy implements.

A policy answers one question: given how far training has come (and whatever it
has observed), how many leading layers should be frozen now? ``LayerFreezing``
asks it at each decision point (every step or every epoch end) and applies the
answer; a policy never touches the optimizer itself except through the hooks
below, and keeps everything it needs to resume in ``state_dict()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..state import field_mapping

if TYPE_CHECKING:  # pragma: no cover
    from ..layers import Layer

__all__ = ["Progress", "Context", "Policy"]


@dataclass(frozen=True)
class Progress:
    """Where training stands when a policy is asked for a depth.

    Attributes:
        step: optimizer steps done so far in the whole run (the trainer's count when
            an integration passes it, so a resumed run starts where it is).
        total_steps: optimizer steps in the whole run.
        epoch: epochs done so far (the trainer's count, or counted from epoch ends).
        current_duration: the elapsed fraction of the run in [0, 1] (Composer's elapsed
            duration): the trainer's own when it gives one (``duration=``, e.g. Composer
            measuring in samples or tokens), else ``step / total_steps``; held at 1.0.
        depth: the depth frozen right now.
    """

    step: int
    total_steps: int
    epoch: int
    current_duration: float
    depth: int


@dataclass
class Context:
    """What a policy may look at: set once at attach.

    Attributes:
        model: the unwrapped model.
        optimizers: the optimizers training it.
        layers: layers in freeze order (the last one is never frozen).
        costs: per-layer forward FLOPs when known, else None.
        total_steps: optimizer steps in the whole run, as passed to attach (None
            when unknown); policies that act between decisions (FreezeOut's
            learning rates) need it before the first step.
        resolve_layers: with ``order="execution"`` traced from the first training
            forward, call it to make ``layers`` final as soon as that forward has
            run (a policy acting inside ``optimizer.step`` needs the order then);
            a no-op otherwise. None outside LayerFreezing.
    """

    model: nn.Module
    optimizers: Sequence[torch.optim.Optimizer]
    layers: Sequence["Layer"]
    costs: Optional[Sequence[float]] = None
    total_steps: Optional[int] = None
    resolve_layers: Optional[Callable[[], None]] = None


class Policy:
    """Base class of freezing policies.

    Subclasses implement :meth:`decide`; the others have sensible defaults. A
    policy with state to resume implements :meth:`state_dict`, :meth:`check_state`
    and :meth:`apply_state`; ``load_state_dict`` is the two in turn, so a state with
    any bad field is refused before any of it is applied (and ``LayerFreezing``
    checks the policy's part together with its own before applying either).
    ``monotone = True`` (the default) means ``LayerFreezing`` never lets the depth
    shrink because of this policy's answer.

    A policy serves one ``LayerFreezing`` at a time; the algorithm keeps that
    bookkeeping, the policy holds only its own settings and observations.
    """

    monotone: bool = True
    #: whether ``decide`` needs ``Context.costs`` (forward FLOPs per layer)
    needs_costs: bool = False

    def check(self, context: Context) -> None:
        """Called by ``LayerFreezing.attach`` with the other checks, before anything
        changes: raise ``ValueError`` if this policy cannot work on ``context``.
        Must leave the model, the optimizers and the policy as they were."""

    def hints(self, context: Context) -> list[str]:
        """Warnings for settings that will not do what the user likely meant on
        ``context`` (each with a HINT); ``LayerFreezing.attach`` logs them."""
        return []

    def bind(self, context: Context) -> None:
        """Called once by ``LayerFreezing.attach``, before any decision."""
        self.context = context

    def after_step(self, progress: Progress) -> None:
        """Called after every optimizer step, before any decision at that step."""

    def decide(self, progress: Progress) -> tuple[int, float]:
        """Return ``(depth, fraction)``: how many leading layers to freeze now, and
        the fraction reported to loggers as ``layer_freezing/percentage_frozen``."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Plain data needed to resume this policy exactly."""
        return {}

    def check_state(self, state: Any, path: str = "policy") -> Any:
        """Check every field of ``state`` (from :meth:`state_dict`) without changing anything.

        Returns what :meth:`apply_state` takes. Raises ``ValueError`` naming the bad
        field by its path from ``path`` (``policy.previous``, say). May be called
        before :meth:`bind` (a state loaded before ``attach`` is checked at once), so
        it must not need the context.
        """
        return dict(field_mapping(state, path, source=type(self).__name__))

    def apply_state(self, checked: Any) -> None:
        """Apply a state :meth:`check_state` returned; must not fail."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`: all of ``state`` or, if any field is bad, none of it."""
        self.apply_state(self.check_state(state))

    def describe(self) -> dict[str, Any]:
        """Settings, for logs and benchmark records."""
        return {"policy": type(self).__name__}

    def release(self) -> None:
        """Called by ``LayerFreezing.detach``: remove any hooks the policy installed."""

    def _frozen_set_changed(self) -> None:
        # Called by LayerFreezing right after the frozen set changed, when TorchDynamo
        # recompiles the model anyway: the moment to remove forward hooks that compiled
        # code has inlined (removing them at any other time costs one more graph).
        pass
