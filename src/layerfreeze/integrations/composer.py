"""Composer: ``LayerFreezing`` as a Composer Algorithm, a drop-in that resumes.

Replaces ``composer.algorithms.LayerFreezing`` (same arguments, same metric keys,
same frozen layers at the same epoch ends, progress from ``state.timestamp`` in any
``max_duration`` unit) and, unlike it, checkpoints its state: Composer's returns
``{}`` and cannot resume (its issue #1002).

Example:
    >>> from layerfreeze.integrations.composer import LayerFreezing
    >>> trainer = Trainer(model=model, train_dataloader=loader, max_duration="4ep",
    ...                   algorithms=[LayerFreezing(freeze_start=0.5)])  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

from .. import algorithm as _algorithm
from .. import distributed, hints

__all__ = ["LayerFreezing"]

log = logging.getLogger("layerfreeze")

try:  # Composer is optional: import it only when this module is used.
    from composer.core import Algorithm, Event, State, TimeUnit
except ImportError as error:  # pragma: no cover - exercised where composer is absent
    raise ImportError(
        "layerfreeze.integrations.composer needs Composer: pip install mosaicml"
    ) from error


def _total_steps(state: State) -> int:
    # Optimizer steps (Composer batches) in the run: exact for 'ba', and for 'ep' with a
    # dataloader of known length; for samples, ceil(samples / batch size). Other units
    # (tokens, ...) fix no step count up front: then the steps per epoch stand in. Only
    # policies acting between decisions (FreezeOut's learning rates) read this count;
    # the schedule itself follows Composer's elapsed duration.
    duration = state.max_duration
    if duration is None:
        raise ValueError("LayerFreezing needs the Trainer's max_duration, got None")
    length = None if state.dataloader_len is None else int(state.dataloader_len.value)
    value = int(duration.value)
    if duration.unit == TimeUnit.BATCH:
        return max(value, 1)
    if duration.unit == TimeUnit.EPOCH and length:
        return max(value * length, 1)
    batch_size = getattr(state.dataloader, "batch_size", None)
    if duration.unit == TimeUnit.SAMPLE and isinstance(batch_size, int) and batch_size > 0:
        return max(math.ceil(value / batch_size), 1)
    return max(length or 1, 1)


def _clock(state: State, event: Event) -> dict[str, Any]:
    # The trainer's clock: batches (= optimizer steps) done and Composer's elapsed duration.
    # In epochs, that duration moves only at epoch ends; between them (interval="step")
    # batches / (epochs x batches per epoch) is finer and agrees with it at every epoch end.
    steps = int(state.timestamp.batch.value)
    elapsed = state.get_elapsed_duration()
    duration = None if elapsed is None else float(elapsed)
    length = None if state.dataloader_len is None else int(state.dataloader_len.value)
    if event != Event.EPOCH_END and state.max_duration.unit == TimeUnit.EPOCH and length:
        duration = steps / (int(state.max_duration.value) * length)
    return {"steps_done": steps, "duration": duration}


class LayerFreezing(Algorithm):
    """Progressive layer freezing for Composer's Trainer (see :class:`layerfreeze.LayerFreezing`).

    Runs at ``EPOCH_END`` as Composer's does (``interval="step"``: after every
    batch). Progress is Composer's own: ``state.timestamp`` and
    ``state.get_elapsed_duration()``, in whatever unit ``max_duration`` has (``ep``,
    ``ba``, ``sp``, ``tok``, ...), so freezing added to a resumed run, or an event
    applied directly to a ``State``, freezes what the run's progress asks for. It
    attaches at ``FIT_START``, or at the first event it sees. Its state travels in
    Composer checkpoints and is applied before the optimizer state loads, so
    ``Trainer(load_path=...)`` resumes with the same parameters frozen and the same
    param groups. One object serves one run at a time: at a new Trainer's ``INIT``,
    or applied to another ``State``, it releases the previous run (unfrozen, as
    :meth:`layerfreeze.LayerFreezing.detach`) and attaches to the new one.

    Args:
        freeze_start: fraction of training before freezing begins. Default 0.5.
        freeze_level: fraction of layers frozen at the end. Default 1.0.
        **options: any other :class:`layerfreeze.LayerFreezing` argument
            (``interval``, ``batchnorm``, ``policy``, ...).
    """

    def __init__(self, freeze_start: float = 0.5, freeze_level: float = 1.0, **options: Any):
        self.freeze_start, self.freeze_level = freeze_start, freeze_level
        self.freezing = _algorithm.LayerFreezing(freeze_start, freeze_level, log_fn=self._log, **options)
        self._state: Optional[State] = None
        self._logger: Any = None
        self._attached = False
        self._run: tuple[Any, list[Any]] = (None, [])  # the model and optimizers it is attached to

    @property
    def find_unused_parameters(self) -> bool:
        """Whether Composer must build DDP with ``find_unused_parameters=True``.

        False where this torch lets :mod:`layerfreeze.distributed` rebuild DDP's
        gradient reducer after each freeze (frozen parameters are then neither
        waited for nor all-reduced, and no graph walk runs at every step); True only
        where it cannot.
        """
        return distributed.torch_rebuild_unsupported_reason() is not None

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.FIT_START, Event.BATCH_END, Event.EPOCH_END)

    def apply(self, event: Event, state: State, logger: Any) -> None:
        if event == Event.INIT or (self._attached and not self._serves(state)):
            # A new run (a new Trainer's INIT, or an event applied to another State): the
            # previous one is released, so this run's model and optimizers are the ones frozen.
            self._release()
        self._state, self._logger = state, logger
        if event == Event.INIT:  # kept for load_state_dict; optimizers may not exist yet
            return
        if not self._attached:  # FIT_START, or the first event applied to this State
            self._attach(state)
        clock = _clock(state, event)
        if event == Event.FIT_START:
            self.freezing.sync(epochs_done=int(state.timestamp.epoch.value), **clock)
            if state.max_duration.unit == TimeUnit.EPOCH and int(state.max_duration.value) == 1:
                hints.warn_one_epoch(self.freezing.interval, self.freezing.total_steps, self.freezing.total_steps)
        elif event == Event.BATCH_END:
            self.freezing.step(**clock)
        elif event == Event.EPOCH_END:
            self.freezing.epoch_end(int(state.timestamp.epoch.value), **clock)

    def _attach(self, state: State) -> None:
        self.freezing.attach(state.model, list(state.optimizers), total_steps=_total_steps(state))
        self._attached = True
        self._run = (state.model, list(state.optimizers))

    def _serves(self, state: State) -> bool:
        model, optimizers = self._run
        current = list(state.optimizers)
        return model is state.model and len(optimizers) == len(current) and all(
            a is b for a, b in zip(optimizers, current))

    def _release(self) -> None:
        if self._attached:
            self.freezing.detach()
            self._attached = False

    def _log(self, metrics: dict[str, float]) -> None:
        if self._logger is not None:
            self._logger.log_metrics(dict(metrics))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._attached:
            state["layerfreeze"] = self.freezing.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Composer loads algorithm state before optimizer state (attributes load in
        # sorted order), so attaching here re-forms the param groups in time.
        if "layerfreeze" not in state:
            log.warning(
                "layerfreeze: this checkpoint holds no layer-freezing state (made without layerfreeze's "
                "LayerFreezing, or with Composer's own): nothing is frozen now, and freezing follows the "
                "run's progress from its timestamp at the next decision. HINT: resume from a checkpoint "
                "made with layerfreeze's LayerFreezing to restore the frozen set exactly"
            )
            return
        self.freezing.load_state_dict(state["layerfreeze"])
        if self._state is not None and not self._attached:
            self._attach(self._state)
