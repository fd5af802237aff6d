"""Hugging Face Transformers: ``LayerFreezingCallback`` for ``transformers.Trainer``.

Example:
    >>> from layerfreeze.integrations.transformers import LayerFreezingCallback
    >>> trainer = Trainer(model=model, args=args, train_dataset=data,
    ...                   callbacks=[LayerFreezingCallback(freeze_start=0.5)])  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Callable, Mapping, Optional, Union

import torch

from .. import algorithm as _algorithm
from .. import hints
from ..encoder_cache import EncoderCache

__all__ = ["LayerFreezingCallback", "STATE_FILE"]

log = logging.getLogger("layerfreeze")

try:  # Transformers is optional: import it only when this module is used.
    import transformers
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as error:  # pragma: no cover - exercised where transformers is absent
    raise ImportError("layerfreeze.integrations.transformers needs transformers: pip install transformers") from error

#: The file holding the freezing state inside each ``checkpoint-N`` folder.
STATE_FILE = "layerfreeze_state.pt"
#: The transformers releases whose Trainer loads optimizer state as
#: :func:`_before_optimizer_load` expects (checked by signature, not only by number).
TESTED_VERSIONS = "4.40 to 5.24"


def _firing_trainer(callback: TrainerCallback) -> Optional[Trainer]:
    # A TrainerCallback event receives no Trainer, but Trainer.log (the one way to reach
    # state.log_history and every report_to integration) and the resume hook below need
    # it. The Trainer method that fires the event is on the call stack, bound as `self`.
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer) and callback in owner.callback_handler.callbacks:
                return owner
            frame = frame.f_back
        return None
    finally:
        del frame


def _before_optimizer_load(trainer: Trainer, hook: Callable[[str], None]) -> None:
    """Run ``hook(checkpoint)`` right before ``trainer`` loads optimizer state from a checkpoint.

    No Trainer event or public hook comes between the optimizer's creation and the
    loading of its state, which must find the saved frozen set already out of the
    param groups. The Trainer loads it in ``_load_optimizer_and_scheduler(checkpoint)``
    (transformers 4.40 to 5.x); this wraps that method on ``trainer`` alone (no
    class-wide patch), once.

    Raises:
        RuntimeError: when this transformers has no such method, naming the version
            (the callback turns it into a warning: training from scratch needs no hook).
    """
    method = getattr(type(trainer), "_load_optimizer_and_scheduler", None)
    parameters = list(inspect.signature(method).parameters) if callable(method) else []
    if parameters != ["self", "checkpoint"]:
        raise RuntimeError(
            f"layerfreeze's LayerFreezingCallback cannot resume frozen layers with transformers "
            f"{transformers.__version__}: its Trainer has no _load_optimizer_and_scheduler(checkpoint) "
            f"(tested with {TESTED_VERSIONS}); training from scratch works. HINT: install a tested "
            "transformers release to resume runs with frozen layers"
        )
    load = trainer._load_optimizer_and_scheduler
    if getattr(load, "_layerfreeze_hooked", False):
        return

    def load_after_freezing(checkpoint: Optional[str]) -> None:
        if checkpoint is not None:
            hook(checkpoint)
        return load(checkpoint)

    load_after_freezing._layerfreeze_hooked = True  # type: ignore[attr-defined]
    trainer._load_optimizer_and_scheduler = load_after_freezing


def _optimizer(trainer: Trainer) -> Any:
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # inside accelerate's wrapper


class LayerFreezingCallback(TrainerCallback):
    """Freeze the leading layers of the Trainer's model as training goes on.

    Progress is the Trainer's own: ``state.global_step`` out of ``state.max_steps``,
    an epoch ending at the step that completes it (``state.epoch`` reaching a whole
    number), so freezing added to a run resumed from a checkpoint made without it
    follows the schedule from the run's true progress. Layers are frozen in the
    Trainer's own optimizer. The Composer metric keys go through ``Trainer.log`` (so
    to every ``report_to`` integration and ``state.log_history``) in a row of their
    own, at the Trainer's logging cadence (``logging_steps`` / ``should_log``) and at
    each change of the frozen set; every row the Trainer logs without this callback
    it still logs. The state is saved as ``layerfreeze_state.pt`` in each checkpoint
    folder; on ``trainer.train(resume_from_checkpoint=...)`` it is applied right
    before the Trainer loads the optimizer state (see :func:`_before_optimizer_load`),
    which needs the callback passed to ``Trainer(callbacks=[...])``. Given to
    another Trainer (or used by a ``train()`` that builds a new model through
    ``model_init``), the callback starts a new freezing run on that model and
    releases the previous one (unfrozen, as :meth:`layerfreeze.LayerFreezing.detach`).

    Args:
        freeze_start: fraction of training before freezing begins. Default 0.5.
        freeze_level: fraction of layers frozen at the end. Default 1.0.
        cache: also cache the frozen prefix's output per example
            (:class:`layerfreeze.EncoderCache` on the Trainer's model, built at the
            start of training, ``examples`` set to the training set's size): True,
            or a dict of ``EncoderCache`` arguments. It needs the frozen prefix in
            eval mode, so ``dropout`` defaults to ``"eval"`` then. Default False.
        **options: any other :class:`layerfreeze.LayerFreezing` argument
            (``interval``, ``batchnorm``, ``policy``, ...).

    Raises:
        ValueError: for ``cache`` with ``dropout="train"``, or a ``cache`` that is
            neither a bool nor a dict.
    """

    def __init__(self, freeze_start: float = 0.5, freeze_level: float = 1.0, *,
                 cache: Union[bool, Mapping[str, Any]] = False, **options: Any):
        if not isinstance(cache, (bool, Mapping)):
            raise ValueError(f"cache must be a bool or a dict of EncoderCache arguments, got {type(cache).__name__}")
        if cache is not False:
            if options.get("dropout", "eval") != "eval":
                raise ValueError(
                    f"cache needs the frozen prefix in eval mode, got dropout={options['dropout']!r}. "
                    "HINT: drop the dropout argument (cache sets dropout='eval') or pass dropout='eval'"
                )
            options["dropout"] = "eval"
        self.freezing = _algorithm.LayerFreezing(freeze_start, freeze_level, **options)
        self._cache_options: Optional[dict[str, Any]] = (
            None if cache is False else {} if cache is True else dict(cache))  # type: ignore[arg-type]
        #: the EncoderCache built at the start of training (None without ``cache``)
        self.cache: Optional[EncoderCache] = None
        self._trainer: Optional[Trainer] = None
        self._attached = False
        self._run: tuple[Any, Any] = (None, None)  # the model and optimizer it is attached to
        self._logged_depth = 0  # the depth in the last row this callback logged
        self._logged_step = -1  # and the step it was logged at
        self._log_pending = False  # log after the Trainer's row of this step
        self._logging = False

    # -- binding ------------------------------------------------------------
    def _bind(self, *, firing: bool = False) -> Optional[Trainer]:
        # firing=True at the events a Trainer fires once a run (init end, train begin): the
        # Trainer firing them is looked up again, so a callback given to a new Trainer
        # follows it instead of the one it served before.
        if self._trainer is None or firing:
            trainer = _firing_trainer(self)
            if trainer is not None and trainer is not self._trainer:
                self._trainer = trainer
                try:
                    _before_optimizer_load(trainer, self._load_checkpoint)
                except RuntimeError as error:  # training from scratch still works
                    log.warning("layerfreeze: %s", error)
        return self._trainer

    def _release_other_run(self, trainer: Trainer) -> None:
        # A callback reused for another run (another Trainer, or train() again with
        # model_init) starts a new freezing run on that run's model and optimizer; the
        # previous model is released (unfrozen, hooks removed), as detach() does.
        model, optimizer = self._run
        if self._attached and (model is not trainer.model or optimizer is not _optimizer(trainer)):
            self.freezing.detach()
            self._attached = False

    def _attach(self, trainer: Trainer) -> None:
        self._release_other_run(trainer)
        if not self._attached:
            optimizer = _optimizer(trainer)
            self.freezing.attach(trainer.model, optimizer, total_steps=trainer.state.max_steps)
            self._attached = True
            self._run = (trainer.model, optimizer)
            self._logged_depth, self._logged_step = self.freezing.frozen_depth, -1
            if self._cache_options is not None and (self.cache is None or self.cache.model is not trainer.model):
                if self.cache is not None:
                    self.cache.remove()  # a new run's model: the previous one's stored outputs are not its own
                options = dict(self._cache_options)
                dataset = trainer.train_dataset
                if "examples" not in options and hasattr(dataset, "__len__") and len(dataset) > 0:
                    options["examples"] = len(dataset)
                self.cache = EncoderCache(trainer.model, **options)

    def _load_checkpoint(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, STATE_FILE)
        if os.path.isfile(path):
            self._release_other_run(self._trainer)  # the state is this run's, not the previous one's
            self.freezing.load_state_dict(torch.load(path, weights_only=True))
            self._attach(self._trainer)

    # -- events -------------------------------------------------------------
    def on_init_end(self, args, state, control, **kwargs):
        self._bind(firing=True)

    def on_train_begin(self, args, state, control, **kwargs):
        bound_before = self._trainer
        trainer = self._bind(firing=True)
        if trainer is None:
            raise RuntimeError("LayerFreezingCallback must be used by a transformers.Trainer")
        if trainer is not bound_before and state.global_step > 0:
            log.warning(
                "layerfreeze: LayerFreezingCallback was added after the Trainer was built, so a "
                "checkpoint's frozen set could not be applied before the optimizer state loaded. "
                "HINT: pass it as Trainer(callbacks=[LayerFreezingCallback(...)])"
            )
        self._attach(trainer)
        self.freezing.sync(state.global_step, epochs_done=int(state.epoch or 0))
        if state.num_train_epochs == 1:  # epoch ends come from the clock: say what that means for one epoch
            hints.warn_one_epoch(self.freezing.interval, state.max_steps, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        self._attach(self._bind())
        self.freezing.step(state.global_step)
        if state.epoch is not None and float(state.epoch).is_integer():  # this step completed an epoch
            self.freezing.epoch_end(int(state.epoch))
        if control.should_log:
            # The Trainer logs this step after the hook; a row logged now would clear its
            # flag and the Trainer's own row (loss, learning rate) would be lost.
            self._log_pending = True
        elif self.freezing.frozen_depth != self._logged_depth:
            self._log(state.global_step)

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_log:  # logging_strategy="epoch"
            self._log_pending = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._log_pending and not self._logging:
            self._log_pending = False
            if (state.global_step, self.freezing.frozen_depth) != (self._logged_step, self._logged_depth):
                self._log(state.global_step)  # once a step: a change may have been logged already

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero and self._attached and os.path.isdir(folder):
            torch.save(self.freezing.state_dict(), os.path.join(folder, STATE_FILE))

    def _log(self, step: int) -> None:
        metrics = self.freezing.metrics
        self._logged_depth, self._logged_step = self.freezing.frozen_depth, step
        self._logging = True
        try:
            self._trainer.log({key: float(value) for key, value in metrics.items()})
        finally:
            self._logging = False
