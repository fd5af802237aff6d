"""Lightning: ``LayerFreezingCallback``, progressive layer freezing as a Callback.

Example:
    >>> from layerfreeze.integrations.lightning import LayerFreezingCallback
    >>> trainer = L.Trainer(max_epochs=4, callbacks=[LayerFreezingCallback(freeze_start=0.5)])  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Optional

from .. import algorithm as _algorithm
from .. import hints

__all__ = ["LayerFreezingCallback"]

try:  # Lightning is optional: import it only when this module is used.
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError as error:  # pragma: no cover - exercised where lightning is absent
    raise ImportError("layerfreeze.integrations.lightning needs Lightning: pip install lightning") from error


class LayerFreezingCallback(Callback):
    """Freeze the leading layers of the LightningModule as training goes on.

    Progress is the trainer's own: ``trainer.global_step`` (optimizer steps, so
    gradient accumulation is counted right) out of ``estimated_stepping_batches``
    (``max_epochs`` or ``max_steps``), and ``current_epoch`` at epoch ends; freezing
    added to a run resumed from a checkpoint made without it follows the schedule
    from the run's true progress. Decisions happen at epoch ends
    (``interval="epoch"``) or after every optimizer step (``interval="step"``). The
    Composer metric keys are logged through ``pl_module.log_dict``. The state is
    saved in Lightning checkpoints and, on ``trainer.fit(model, ckpt_path=...)``,
    applied before Lightning loads the optimizer state, so the resumed run has the
    same param groups and frozen set. Each ``fit`` is a run of its own: used for
    another fit, the callback releases the previous one (unfrozen, as
    :meth:`layerfreeze.LayerFreezing.detach`) and attaches to the new model.

    Args:
        freeze_start: fraction of training before freezing begins. Default 0.5.
        freeze_level: fraction of layers frozen at the end. Default 1.0.
        **options: any other :class:`layerfreeze.LayerFreezing` argument
            (``interval``, ``batchnorm``, ``policy``, ...).
    """

    def __init__(self, freeze_start: float = 0.5, freeze_level: float = 1.0, **options: Any):
        self.freezing = _algorithm.LayerFreezing(freeze_start, freeze_level, log_fn=self._log, **options)
        self._module: Optional[LightningModule] = None
        self._attached = False

    @property
    def state_key(self) -> str:
        return "LayerFreezingCallback"

    def _attach(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Attach to the strategy's model: under DDP that is the wrapper, whose
        # gradient reducer must be rebuilt when the trainable set changes.
        if not self._attached:
            model = trainer.strategy.model if trainer.strategy.model is not None else pl_module
            self.freezing.attach(model, trainer.optimizers, total_steps=int(trainer.estimated_stepping_batches))
            self._attached = True

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Each fit is a run of its own (a new Trainer, or the same callback in a second
        # fit): release the previous run before Lightning restores this one's state, so
        # it attaches to this fit's model and optimizers (it kept acting on the first).
        if stage == "fit" and self._attached:
            self.freezing.detach()
            self._attached = False

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Optimizers exist now, and Lightning loads their state only after this hook.
        self._attach(trainer, pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._attach(trainer, pl_module)
        # The loop's counters are restored by now: a resumed run starts at its true step.
        self.freezing.sync(trainer.global_step, epochs_done=trainer.current_epoch)
        if trainer.max_epochs == 1:  # epoch ends come from the trainer: say what that means for one epoch
            total = self.freezing.total_steps
            hints.warn_one_epoch(self.freezing.interval, total, total)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._attach(trainer, pl_module)
        self._module = pl_module
        self.freezing.step(trainer.global_step)  # the same count again: an accumulating batch, nothing to do

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._attach(trainer, pl_module)
        self._module = pl_module
        # current_epoch counts the epoch that is ending until Lightning's loop advances it.
        self.freezing.epoch_end(trainer.current_epoch + 1, steps_done=trainer.global_step)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._module = None

    def _log(self, metrics: dict[str, float]) -> None:
        if self._module is not None:
            self._module.log_dict({k: float(v) for k, v in metrics.items()})

    def state_dict(self) -> dict[str, Any]:
        return self.freezing.state_dict() if self._attached else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before optimizers; before attach the core keeps
        # the state and applies it in on_fit_start, ahead of the optimizer state.
        if state_dict:
            self.freezing.load_state_dict(state_dict)
