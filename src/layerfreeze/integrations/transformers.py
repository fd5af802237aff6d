"""Hugging Face Transformers: ``LayerFreezingCallback`` for ``transformers.Trainer``.

Example:
    >>> from layerfreeze.integrations.transformers import LayerFreezingCallback
    >>> trainer = Trainer(model=model, args=args, train_dataset=data,
    ...                   callbacks=[LayerFreezingCallback(freeze_start=0.5)])  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Optional

import torch

from .. import algorithm as _algorithm

__all__ = ["LayerFreezingCallback", "STATE_FILE"]

try:  # Transformers is optional: import it only when this module is used.
    from transformers import Trainer, TrainerCallback
except ImportError as error:  # pragma: no cover - exercised where transformers is absent
    raise ImportError("layerfreeze.integrations.transformers needs transformers: pip install transformers") from error

#: The file holding the freezing state inside each ``checkpoint-N`` folder.
STATE_FILE = "layerfreeze_state.pt"


def _steps_per_epoch(loader: Any, accumulation: int) -> Optional[int]:
    # The Trainer's own count of optimizer steps per epoch (ceil, at least 1).
    return max(math.ceil(len(loader) / accumulation), 1) if hasattr(loader, "__len__") else None


class LayerFreezingCallback(TrainerCallback):
    """Freeze the leading layers of the Trainer's model as training goes on.

    Progress is ``state.global_step / state.max_steps``; layers are frozen in the
    Trainer's own optimizer, and the Composer metric keys go through ``Trainer.log``
    (so to every ``report_to`` integration and ``state.log_history``). The state is
    saved as ``layerfreeze_state.pt`` in each checkpoint folder. The Trainer loads
    optimizer state before any callback event, so on ``trainer.train(
    resume_from_checkpoint=...)`` this module applies the saved frozen set right
    before the Trainer's ``_load_optimizer_and_scheduler`` (a wrapper around
    ``Trainer._prepare_for_training``, a no-op for trainers without this callback).

    Args:
        freeze_start: fraction of training before freezing begins. Default 0.5.
        freeze_level: fraction of layers frozen at the end. Default 1.0.
        **options: any other :class:`layerfreeze.LayerFreezing` argument
            (``interval``, ``batchnorm``, ``policy``, ...).
    """

    def __init__(self, freeze_start: float = 0.5, freeze_level: float = 1.0, **options: Any):
        _install()
        self.freezing = _algorithm.LayerFreezing(freeze_start, freeze_level, log_fn=self._log, **options)
        self._trainer: Optional[Trainer] = None
        self._attached = False
        self._global_step = 0

    def _attach(self, trainer: Trainer, loader: Any) -> None:
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # inside accelerate's wrapper
        steps = _steps_per_epoch(loader, trainer.args.gradient_accumulation_steps)
        self.freezing.attach(trainer.model, optimizer, total_steps=trainer.state.max_steps, steps_per_epoch=steps)
        self._attached = True

    def _before_optimizer_load(self, trainer: Trainer, loader: Any, checkpoint: Optional[str]) -> None:
        path = os.path.join(checkpoint, STATE_FILE) if checkpoint else None
        if path is not None and os.path.isfile(path):
            self.freezing.load_state_dict(torch.load(path, weights_only=True))
            if not self._attached:
                self._attach(trainer, loader)

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if not self._attached:
            self._attach(self._trainer, train_dataloader)
        self._global_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        while self._global_step < state.global_step:
            self._global_step += 1
            self.freezing.step()

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.freezing.steps_per_epoch is None:  # else the step count marks epoch ends
            self.freezing.epoch_end()

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(self._trainer._get_output_dir(None), f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and self._attached and os.path.isdir(folder):
            torch.save(self.freezing.state_dict(), os.path.join(folder, STATE_FILE))

    def _log(self, metrics: dict[str, float]) -> None:
        self._trainer.log({key: float(value) for key, value in metrics.items()})


def _install() -> None:
    """Wrap ``Trainer._prepare_for_training`` once so that, for trainers holding a
    LayerFreezingCallback, the saved frozen set is applied between the optimizer's
    creation and the loading of its state (which needs the frozen param groups)."""
    if getattr(Trainer._prepare_for_training, "_layerfreeze", False):
        return
    original = Trainer._prepare_for_training

    @functools.wraps(original)
    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        ours = [cb for cb in self.callback_handler.callbacks if isinstance(cb, LayerFreezingCallback)]
        for callback in ours:
            callback._trainer = self
        if not ours or resume_from_checkpoint is None:
            return original(self, max_steps, train_dataloader, resume_from_checkpoint)
        load = self._load_optimizer_and_scheduler

        def load_after_freezing(checkpoint):
            for callback in ours:
                callback._before_optimizer_load(self, train_dataloader, checkpoint)
            return load(checkpoint)

        self._load_optimizer_and_scheduler = load_after_freezing
        try:
            return original(self, max_steps, train_dataloader, resume_from_checkpoint)
        finally:
            del self._load_optimizer_and_scheduler

    _prepare_for_training._layerfreeze = True
    Trainer._prepare_for_training = _prepare_for_training
