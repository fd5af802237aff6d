"""Composer: ``LayerFreezing`` as a Composer Algorithm, a drop-in that resumes.

Replaces ``composer.algorithms.LayerFreezing`` (same arguments, same metric keys,
same frozen layers at the same epoch ends) and, unlike it, checkpoints its state:
Composer's returns ``{}`` and cannot resume (its issue #1002).

Example:
    >>> from layerfreeze.integrations.composer import LayerFreezing
    >>> trainer = Trainer(model=model, train_dataloader=loader, max_duration="4ep",
    ...                   algorithms=[LayerFreezing(freeze_start=0.5)])  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from .. import algorithm as _algorithm

__all__ = ["LayerFreezing"]

log = logging.getLogger("layerfreeze")

try:  # Composer is optional: import it only when this module is used.
    from composer.core import Algorithm, Event, State, TimeUnit
except ImportError as error:  # pragma: no cover - exercised where composer is absent
    raise ImportError(
        "layerfreeze.integrations.composer needs Composer: pip install mosaicml"
    ) from error


def _total_steps(state: State) -> Optional[int]:
    # Optimizer steps in the run; Composer's elapsed duration at an epoch end is
    # epochs/max_epochs, which equals steps/total_steps for equal-length epochs.
    duration = state.max_duration
    if duration is None:
        return None
    if duration.unit == TimeUnit.BATCH:
        return int(duration.value)
    if duration.unit == TimeUnit.EPOCH:
        length = state.dataloader_len
        return None if length is None else int(duration.value) * int(length)
    raise ValueError(
        f"max_duration must be in epochs ('ep') or batches ('ba') for LayerFreezing, got {duration}"
    )


class LayerFreezing(Algorithm):
    """Progressive layer freezing for Composer's Trainer (see :class:`layerfreeze.LayerFreezing`).

    Runs at ``EPOCH_END`` as Composer's does (``interval="step"``: after every
    batch). Its state travels in Composer checkpoints and is applied before the
    optimizer state loads, so ``Trainer(load_path=...)`` resumes with the same
    parameters frozen and the same param groups.

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

    @property
    def find_unused_parameters(self) -> bool:
        """Frozen parameters get no gradients: DDP must be told."""
        return True

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.FIT_START, Event.BATCH_END, Event.EPOCH_END)

    def apply(self, event: Event, state: State, logger: Any) -> None:
        self._state, self._logger = state, logger
        if event == Event.FIT_START:
            total = _total_steps(state)
            if total is None:
                raise ValueError("LayerFreezing needs max_duration and a train dataloader with a length")
            if not self._attached:
                self._attach(state, total)
            self.freezing.total_steps = total
        elif event == Event.BATCH_END:
            self.freezing.step()
        elif event == Event.EPOCH_END:
            self.freezing.epoch_end()

    def _attach(self, state: State, total_steps: int) -> None:
        self.freezing.attach(state.model, list(state.optimizers), total_steps=total_steps)
        self._attached = True

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
                "layerfreeze: this checkpoint holds no layer-freezing state (made with Composer's own "
                "LayerFreezing?): nothing is frozen and the schedule counts steps from this point, as if "
                "the run started here. HINT: resume from a checkpoint made with layerfreeze's LayerFreezing"
            )
            return
        saved = state["layerfreeze"]
        self.freezing.load_state_dict(saved)
        if self._state is not None and not self._attached:
            total = _total_steps(self._state) or saved.get("config", {}).get("total_steps")
            self._attach(self._state, total)
