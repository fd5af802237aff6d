"""``LayerFreezing``: decides when to freeze; the freezer does it.

Trainer-agnostic. A plain loop calls :meth:`LayerFreezing.step` after each
optimizer step (like an LR scheduler); trainer integrations translate their
events into :meth:`step` and :meth:`epoch_end` calls.

This module holds the events (attach, step, epoch end), the decision and its
application. Beside it: :mod:`layerfreeze.state` (the checkpoint state as plain
data), :mod:`layerfreeze.validation` (argument checks), :mod:`layerfreeze.hints`
(warnings to the user), :mod:`layerfreeze.policies` (when to freeze),
:mod:`layerfreeze.freezer` (which parameters a depth freezes, and freezing them)
and :mod:`layerfreeze.gradient_bridge` (reentrant activation checkpointing).
"""

from __future__ import annotations

import logging
import math
import weakref
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from . import distributed, hints, recompiles
from .freezer import BATCHNORM_MODES, DROPOUT_MODES, SHARED_RULES, Freezer, validate_model, validate_optimizers
from .gradient_bridge import GradientBridge
from .layers import UNITS, ExecutionTracer, Layer, definition_order, execution_order, layer_flops
from .policies import Context, Linear, Policy, Progress
from .state import FreezingState, check_against_model
from .validation import check_choice, check_int, is_int, is_real

__all__ = ["LayerFreezing", "LAYERS_FROZEN", "PERCENTAGE_FROZEN", "PARAMS_FROZEN"]

log = logging.getLogger("layerfreeze")

# Composer's metric names, so dashboards keep working when switching.
LAYERS_FROZEN = "layer_freezing/layers_frozen"
PERCENTAGE_FROZEN = "layer_freezing/percentage_frozen"
PARAMS_FROZEN = "layer_freezing/params_frozen"

INTERVALS = ("epoch", "step")
ORDERS = ("definition", "execution")

# Which LayerFreezing each attached policy serves, by id(policy): kept here rather
# than on the policy object. Weak values: an entry goes with its LayerFreezing, and
# that holds its policy, so an id cannot be reused while its entry exists.
_POLICY_OWNERS: "weakref.WeakValueDictionary[int, LayerFreezing]" = weakref.WeakValueDictionary()


def _fraction_done(value: object) -> Optional[float]:
    # The trainer's elapsed fraction of the run; above 1 is held at 1 by _progress.
    if value is None:
        return None
    if not is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"duration must be a finite number >= 0 (the elapsed fraction of the run), got {value!r}")
    return float(value)


def _as_runner(example_inputs: Any) -> Callable[[nn.Module], Any]:
    if isinstance(example_inputs, tuple):
        return lambda m: m(*example_inputs)
    if isinstance(example_inputs, Mapping):
        return lambda m: m(**example_inputs)
    return lambda m: m(example_inputs)


class LayerFreezing:
    """Progressively freeze the leading layers of a model during training.

    With the defaults this is Composer's ``LayerFreezing``: at each epoch end the
    first ``int(fraction * (layers - 1))`` layers are frozen, where ``fraction``
    grows linearly from 0 at ``freeze_start`` to ``freeze_level`` at the end.
    Freezing is complete (see :mod:`layerfreeze.freezer`) and the whole state
    checkpoints by parameter name, so runs resume exactly.

    Args:
        freeze_start: fraction of training before freezing begins, in [0, 1]. Default 0.5.
        freeze_level: fraction of layers frozen at the end, in [0, 1]. Default 1.0.
        interval: ``"epoch"`` decides at epoch ends (Composer); ``"step"`` after
            every optimizer step, so a one-epoch fine-tune freezes too.
        order: ``"definition"`` (Composer) or ``"execution"``: layers in the order
            the first forward pass runs them.
        batchnorm: ``"train"`` lets frozen BatchNorm layers keep updating their
            running statistics (Composer); ``"eval"`` pins them in eval mode, even
            through ``model.train()``.
        dropout: ``"train"`` (Composer) leaves frozen layers' dropout as the model's
            mode has it; ``"eval"`` runs the frozen prefix in eval mode, even
            through ``model.train()`` (every module whose parameters are all frozen,
            and dropout modules defined before the first trainable layer). Its
            output then depends on the input alone, which caching it needs
            (:class:`layerfreeze.EncoderCache`); it also stops dropout noise on the
            trainable layers' inputs. Keyword argument (last in the signature).
        shared: rule for a parameter held by several layers (tied weights):
            ``"freeze"`` (Composer) freezes it with the first frozen layer holding it;
            ``"trainable"`` keeps it trainable while any holder is trainable.
        policy: a :class:`layerfreeze.policies.Policy`; default ``Linear(freeze_start,
            freeze_level, measure)``. Pass either a policy or the schedule knobs.
        unit: what a layer is. ``"leaf"`` (Composer): leaf modules with parameters.
            ``"owner"``: every module owning parameters directly, so parameters of
            non-leaf modules (``nn.MultiheadAttention.in_proj_weight``) freeze too.
        measure: ``"layers"`` or ``"flops"`` (cost-aware: the fraction counts forward
            FLOPs; needs ``example_inputs`` at attach).
        max_changes: at most this many changes of the frozen set (bounds
            ``torch.compile`` recompilations: a graph per frozen set in training, one
            more per frozen set where the compiled model also evaluates); None for no bound.
        log_fn: called with a dict of metrics at every decision, for a trainer's logger.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> freezing = LayerFreezing(freeze_start=0.0, interval="step").attach(net, opt, total_steps=4)
        >>> for _ in range(4):
        ...     net(torch.randn(3, 4)).sum().backward(); opt.step(); opt.zero_grad(); freezing.step()
        >>> freezing.frozen_depth
        2
    """

    def __init__(
        self,
        freeze_start: float = 0.5,
        freeze_level: float = 1.0,
        interval: str = "epoch",
        order: str = "definition",
        batchnorm: str = "train",
        shared: str = "freeze",
        policy: Optional[Policy] = None,
        unit: str = "leaf",
        measure: str = "layers",
        max_changes: Optional[int] = None,
        log_fn: Optional[Callable[[dict[str, float]], None]] = None,
        dropout: str = "train",
    ):
        if policy is None:
            policy = Linear(freeze_start, freeze_level, measure)
        else:
            if not isinstance(policy, Policy):
                raise TypeError(f"policy must be a layerfreeze.policies.Policy, got {type(policy).__name__}")
            given = [name for name, value, default in (("freeze_start", freeze_start, 0.5),
                                                        ("freeze_level", freeze_level, 1.0),
                                                        ("measure", measure, "layers"))
                     if not (is_real(value) if is_real(default) else isinstance(value, str)) or value != default]
            if given:
                raise ValueError(
                    f"pass either policy=... or freeze_start/freeze_level/measure, not both (got {', '.join(given)} "
                    "beside policy); set the schedule on the policy itself"
                )
        self.interval = check_choice("interval", interval, INTERVALS)
        self.order = check_choice("order", order, ORDERS)
        self.batchnorm = check_choice("batchnorm", batchnorm, BATCHNORM_MODES)
        self.dropout = check_choice("dropout", dropout, DROPOUT_MODES)
        self.shared = check_choice("shared", shared, SHARED_RULES)
        self.unit = check_choice("unit", unit, UNITS)
        self.max_changes = check_int("max_changes", max_changes, optional=True)
        if log_fn is not None and not callable(log_fn):
            raise TypeError(f"log_fn must be callable, got {type(log_fn).__name__}")
        self.policy = policy
        self.log_fn = log_fn
        self._attached = False
        self._pending_state: Optional[FreezingState] = None
        self._tracer: Optional[ExecutionTracer] = None
        self._traced_hooks: Optional[ExecutionTracer] = None  # a resolved tracer whose hooks compiled code inlined
        self._freezer: Optional[Freezer] = None
        self._wrapper: Optional[nn.Module] = None
        self._bridge: Optional[GradientBridge] = None
        self._load_hooks: list[Any] = []
        self._reset_run()

    def _reset_run(self) -> None:
        # Counters and one-time warnings of one run: attach starts a fresh run; a
        # checkpoint continues one (load_state_dict).
        self._step = self._epoch = self._changes = 0
        self._fraction = 0.0
        self._duration: Optional[float] = None  # the trainer's elapsed fraction, when it gives one
        self._clipped_warned = self._epoch_warned = self._bn_hinted = False

    # -- lifecycle ---------------------------------------------------------
    def attach(
        self,
        model: nn.Module,
        optimizers: Union[torch.optim.Optimizer, Sequence[torch.optim.Optimizer]],
        total_steps: int,
        steps_per_epoch: Optional[int] = None,
        example_inputs: Any = None,
    ) -> "LayerFreezing":
        """Bind to a model and its optimizers; returns ``self``.

        Args:
            model: the model, possibly wrapped in DistributedDataParallel.
            optimizers: one optimizer or a list of them.
            total_steps: optimizer steps in the whole run (> 0).
            steps_per_epoch: with ``interval="epoch"``, epoch ends are counted from
                it; when None, from calls to :meth:`epoch_end`.
            example_inputs: a batch (tensor, tuple of args, or dict of kwargs) used to
                trace execution order and measure FLOPs up front; buffers are
                restored afterwards. Without it, ``order="execution"`` traces the
                first training forward pass.

        Raises:
            TypeError, ValueError: for bad arguments, checked in signature order
                before anything changes.
            RuntimeError: when already attached.
        """
        if self._attached:
            raise RuntimeError("this LayerFreezing is already attached; call detach() first")
        inner = validate_model(model)
        distributed.check_model(model)
        optimizer_list = validate_optimizers(model, optimizers)
        total_steps = check_int("total_steps", total_steps)
        steps_per_epoch = check_int("steps_per_epoch", steps_per_epoch, optional=True)
        if self.policy.needs_costs and example_inputs is None:
            raise ValueError("example_inputs is required with measure='flops' (the policy counts layer FLOPs)")
        if _POLICY_OWNERS.get(id(self.policy), self) is not self:
            raise ValueError(
                f"policy {type(self.policy).__name__} is attached through another LayerFreezing; "
                "give each LayerFreezing its own policy object"
            )

        layers = definition_order(inner, self.unit)
        hints.warn_orphans(inner, layers, self.unit)
        hints.warn_few_layers(inner, layers)
        run = _as_runner(example_inputs) if example_inputs is not None else None
        pending_traced = self._pending_state is not None and self._pending_state.traced
        costs = None
        try:
            if self.order == "execution" and not pending_traced and run is not None:
                layers = execution_order(inner, run, self.unit)
            if run is not None and self.policy.needs_costs:
                costs = layer_flops(inner, layers, run)
        except Exception as error:
            raise ValueError(
                f"example_inputs could not be run through the model ({type(error).__name__}: {error}); "
                "pass a batch the model accepts: a tensor, a tuple of positional args or a dict of kwargs"
            ) from error
        context = Context(inner, optimizer_list, layers, costs, total_steps, self._resolve_layers)
        self.policy.check(context)
        # Last of the checks, first of the changes: may rebuild a stale DDP reducer.
        distributed.on_attach(model)
        try:
            if self.order == "execution" and not pending_traced and run is None:
                self._tracer = ExecutionTracer(inner, layers)

            self._reset_run()
            self._wrapper = model
            self._freezer = Freezer(inner, optimizer_list, layers, batchnorm=self.batchnorm, shared=self.shared,
                                   dropout=self.dropout)
            self._context = context
            self.total_steps = total_steps
            self.steps_per_epoch = steps_per_epoch
            self.policy.bind(self._context)
            _POLICY_OWNERS[id(self.policy)] = self
            self._load_hooks = [
                opt.register_load_state_dict_pre_hook(hints.check_group_sizes)
                for opt in optimizer_list if hasattr(opt, "_optimizer_load_state_dict_pre_hooks")
            ]
            # Reentrant activation checkpointing after frozen layers (gradient_bridge.py, issue 6 item 7).
            self._bridge = GradientBridge(inner, layers)
            self._attached = True
        except BaseException:
            self.detach()  # undo what this attach changed before it failed
            raise
        hints.warn_one_epoch(self.interval, self.steps_per_epoch, self.total_steps)
        recompiles.warn_recompile_limit(
            model, len(layers), self.max_changes, self.interval, total_steps, steps_per_epoch)
        for message in self.policy.hints(self._context):
            log.warning("layerfreeze: %s", message)
        if self._pending_state is not None:
            try:
                self._load(self._pending_state)
            except Exception:
                self.detach()  # the state stays pending: an attach to the right model applies it
                raise
            self._pending_state = None
        return self

    def detach(self) -> None:
        """Unfreeze everything this object froze and remove its hooks."""
        for tracer in (self._tracer, self._traced_hooks):
            if tracer is not None:
                tracer.remove()
        self._tracer = self._traced_hooks = None
        if self._freezer is not None:
            self._freezer.release()
            distributed.on_trainable_change(self._wrapper)
        if self._bridge is not None:
            self._bridge.remove()
            self._bridge = None
        self.policy.release()
        if _POLICY_OWNERS.get(id(self.policy)) is self:
            del _POLICY_OWNERS[id(self.policy)]
        for handle in self._load_hooks:
            handle.remove()
        self._load_hooks = []
        self._freezer = None
        self._attached = False

    # -- events ------------------------------------------------------------
    def step(self, steps_done: Optional[int] = None, *, duration: Optional[float] = None) -> None:
        """Record an optimizer step; call it right after ``optimizer.step()``.

        A plain loop calls it without arguments (one more step, like an LR
        scheduler). A trainer integration passes the trainer's own clock instead,
        so that progress is the run's true progress, never a count of these calls
        (which would restart at 0 when freezing is added to a resumed run).

        Args:
            steps_done: optimizer steps done in the whole run by the trainer's count
                (the Hugging Face Trainer's ``state.global_step``, Lightning's
                ``trainer.global_step``); default one more than recorded. The count
                already recorded means no optimizer step was taken (a batch that only
                accumulated gradients): the call does nothing then.
            duration: elapsed fraction of the whole run in [0, 1], for trainers that
                measure the run in other units than optimizer steps (Composer's
                samples, tokens or epochs); default ``steps / total_steps``.

        Raises:
            ValueError: for a negative or non-int ``steps_done`` or a ``duration``
                that is not a finite number >= 0; nothing changes then.
            RuntimeError: before :meth:`attach`.

        Example:
            >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
            >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
            >>> freezing = LayerFreezing(freeze_start=0.0, interval="step").attach(net, opt, total_steps=100)
            >>> freezing.step(steps_done=50)        # the trainer's global step, e.g. after a resume
            >>> freezing.frozen_depth               # fraction 0.5 of 2 freezable layers
            1
            >>> freezing.step(steps_done=50)        # same count: no optimizer step, nothing happens
            >>> freezing.step(steps_done=51, duration=1.0)  # the run measured in samples is complete
            >>> freezing.frozen_depth
            2
        """
        self._require_attached("step")
        before = self._step
        if steps_done is not None and check_int("steps_done", steps_done, minimum=0) == before:
            _fraction_done(duration)  # still validated
            return
        self._set_clock(before + 1 if steps_done is None else steps_done, None, duration)
        self.policy.after_step(self._progress())
        if self.interval == "step":
            self._decide()
        elif self.steps_per_epoch is not None:
            # Epoch ends come from the step count: one decision when a boundary is reached or passed.
            self._epoch = self._step // self.steps_per_epoch
            if self._epoch > before // self.steps_per_epoch:
                self._decide()
        elif steps_done is None and self._epoch == 0 and 2 * self._step > self.total_steps:
            self._warn_no_epoch_end()  # a plain loop's reminder; integrations passing their clock report epoch ends

    def epoch_end(
        self,
        epochs_done: Optional[int] = None,
        *,
        steps_done: Optional[int] = None,
        duration: Optional[float] = None,
    ) -> None:
        """Record the end of an epoch (what trainer integrations call); with
        ``interval="epoch"`` the policy decides now.

        Args:
            epochs_done: epochs done in the whole run by the trainer's count
                (Composer's ``state.timestamp.epoch`` at ``EPOCH_END``); default one
                more than recorded (or, with ``steps_per_epoch``, the count from steps).
            steps_done: optimizer steps done in the whole run by the trainer's count;
                default unchanged. No step event runs for steps recorded this way.
            duration: elapsed fraction of the run in [0, 1] by the trainer's measure
                (Composer's ``state.get_elapsed_duration()``); default ``steps / total_steps``.

        Raises:
            ValueError: for a negative or non-int count or a ``duration`` that is not
                a finite number >= 0; nothing changes then.
            RuntimeError: before :meth:`attach`.
        """
        self._require_attached("epoch_end")
        if epochs_done is None and self.steps_per_epoch is None:
            epochs_done = self._epoch + 1
        self._set_clock(steps_done, epochs_done, duration)
        if self.interval == "epoch":
            self._decide()

    def sync(
        self,
        steps_done: Optional[int] = None,
        *,
        epochs_done: Optional[int] = None,
        duration: Optional[float] = None,
    ) -> None:
        """Set the progress to the trainer's clock without any event or decision.

        Trainer integrations call it when training (re)starts: a run resumed from a
        checkpoint made without freezing is at step N, not 0, and the next decision
        must follow from there (an epoch boundary is counted only once it is reached
        after this point). Arguments as in :meth:`step` and :meth:`epoch_end`; a
        count left out keeps its value.

        Raises:
            ValueError: for a negative or non-int count or a ``duration`` that is not
                a finite number >= 0; nothing changes then.
            RuntimeError: before :meth:`attach`.

        Example:
            >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
            >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
            >>> freezing = LayerFreezing(freeze_start=0.0).attach(net, opt, total_steps=8, steps_per_epoch=2)
            >>> freezing.sync(steps_done=5)     # resumed mid-epoch: the boundary at 4 is past
            >>> freezing.step(); freezing.frozen_depth   # step 6 ends epoch 3: fraction 6/8
            1
        """
        self._require_attached("sync")
        if steps_done is not None and self.steps_per_epoch is not None and epochs_done is None:
            epochs_done = check_int("steps_done", steps_done, minimum=0) // self.steps_per_epoch
        self._set_clock(steps_done, epochs_done, duration)

    def set_depth(self, depth: int) -> None:
        """Freeze exactly the first ``depth`` layers now (smaller depths unfreeze).

        Unfrozen parameters go back into their original param groups, with fresh
        optimizer state. The policy takes over again at its next decision, so to
        keep a smaller depth use a policy that asks for it.
        """
        self._require_attached("set_depth")
        self._resolve_layers()
        limit = max(len(self._freezer.layers) - 1, 0)
        if not is_int(depth) or not 0 <= depth <= limit:
            raise ValueError(f"depth must be an int in [0, {limit}], got {depth!r}")
        self._apply(int(depth))

    # -- state -------------------------------------------------------------
    @property
    def frozen_depth(self) -> int:
        """Number of leading layers frozen now."""
        return self._freezer.depth if self._freezer is not None else 0

    @property
    def frozen_fraction(self) -> float:
        """The policy's fraction at the last decision (Composer's ``percentage_frozen``)."""
        return self._fraction

    @property
    def layers(self) -> list[Layer]:
        """Layers in freeze order (after tracing, for ``order="execution"``)."""
        self._require_attached("layers")
        return list(self._freezer.layers)

    @property
    def frozen_parameters(self) -> list[str]:
        """Qualified names of the parameters frozen now."""
        return sorted(self._freezer.frozen_names) if self._freezer is not None else []

    @property
    def metrics(self) -> dict[str, float]:
        """Current values under Composer's keys, plus the count of frozen parameters."""
        return {
            LAYERS_FROZEN: self.frozen_depth,
            PERCENTAGE_FROZEN: self._fraction,
            PARAMS_FROZEN: len(self._freezer.frozen_names) if self._freezer is not None else 0,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, as plain data keyed by parameter names
        (see :class:`layerfreeze.state.FreezingState`)."""
        self._require_attached("state_dict")
        self._resolve_layers()
        return FreezingState(
            step=self._step,
            epoch=self._epoch,
            depth=self._freezer.depth,
            fraction=self._fraction,
            changes=self._changes,
            layers=tuple(layer.name for layer in self._freezer.layers),
            frozen=tuple(sorted(self._freezer.frozen_names)),
            traced=self._tracer is None,
            policy=self.policy.state_dict(),
            config={**self._settings(), "total_steps": self.total_steps, **self.policy.describe()},
        ).to_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`.

        Call it after :meth:`attach` and BEFORE ``optimizer.load_state_dict``: it
        takes the frozen parameters out of the param groups so that the groups
        have the sizes the saved optimizer state expects. Called before attach,
        the state is checked at once and kept until an attach to a model it
        matches applies it.

        Every field is checked (its type, then against the model and the policy)
        before anything is applied: a refused state changes nothing.

        Raises:
            ValueError: if ``state`` is malformed or comes from a different model,
                naming the field by its path (``state_dict.policy.previous``, say).
        """
        checked = FreezingState.from_dict(state)
        self.policy.check_state(checked.policy, "state_dict.policy")
        if not self._attached:
            self._pending_state = checked
            return
        self._load(checked)

    def _settings(self) -> dict[str, Any]:
        return {"interval": self.interval, "order": self.order, "batchnorm": self.batchnorm,
                "dropout": self.dropout, "shared": self.shared, "unit": self.unit}

    def _load(self, state: FreezingState) -> None:
        # Checks first, against this model and policy; then the changes, none of which can fail.
        layers = check_against_model(state, self._freezer.model, unit=self.unit, shared=self.shared,
                                     order=self.order, names_for_depth=self._freezer.names_for_depth)
        policy_state = self.policy.check_state(state.policy, "state_dict.policy")
        settings = self._settings()
        hints.warn_other_settings(
            dict(state.config),
            {key: settings[key] for key in ("interval", "order", "batchnorm", "dropout")} | self.policy.describe(),
            self.total_steps,
        )
        self.policy.apply_state(policy_state)
        if self._tracer is not None and state.traced:
            self._tracer.remove()
            self._tracer = None
        self._freezer.layers = layers
        self._context.layers = layers
        self._freezer.apply_names(set(state.frozen), state.depth)
        self._bridge.update(layers[: state.depth])
        self._step, self._epoch = state.step, state.epoch
        self._fraction, self._changes = state.fraction, state.changes
        distributed.on_trainable_change(self._wrapper)

    # -- internals ---------------------------------------------------------
    def _require_attached(self, what: str) -> None:
        if not self._attached:
            raise RuntimeError(
                f"{what}() called before attach(); call freezing.attach(model, optimizers, total_steps) first"
            )

    def _set_clock(self, steps_done: Optional[int], epochs_done: Optional[int], duration: Optional[float]) -> None:
        # Validate everything, then change: a refused call changes nothing. A duration
        # holds until the next clock update; without one, progress is steps / total_steps.
        steps = None if steps_done is None else check_int("steps_done", steps_done, minimum=0)
        epochs = None if epochs_done is None else check_int("epochs_done", epochs_done, minimum=0)
        self._duration = _fraction_done(duration)
        if steps is not None:
            self._step = steps
        if epochs is not None:
            self._epoch = epochs

    def _progress(self) -> Progress:
        # The trainer's elapsed fraction when it gave one, else optimizer steps done.
        duration = self._step / self.total_steps if self._duration is None else self._duration
        if duration > 1.0:
            if not self._clipped_warned:
                self._clipped_warned = True
                log.warning(
                    "layerfreeze: %d steps done but total_steps=%d (elapsed fraction %.4g); progress is held "
                    "at 1.0. HINT: pass the run's real number of optimizer steps to attach()",
                    self._step, self.total_steps, duration,
                )
            duration = 1.0
        return Progress(self._step, self.total_steps, self._epoch, duration, self.frozen_depth)

    def _resolve_layers(self) -> None:
        tracer = self._tracer
        layers = tracer.resolve(self._wrapper) if tracer is not None else None
        if layers is not None:
            self._tracer, self._traced_hooks = None, tracer
            self._freezer.layers = layers
            self._context.layers = layers

    def _decide(self) -> None:
        self._resolve_layers()
        depth, fraction = self.policy.decide(self._progress())
        distributed.check_agreement(self._wrapper, self._step, int(depth))
        limit = max(len(self._freezer.layers) - 1, 0)
        depth = min(max(int(depth), 0), limit)
        if self.policy.monotone:
            depth = max(depth, self._freezer.depth)
        self._fraction = float(fraction)  # plain data in state_dict, whatever number type a policy returns
        if depth != self._freezer.depth:
            if self.max_changes is not None and self._changes >= self.max_changes:
                log.debug("layerfreeze: max_changes=%d reached; keeping depth %d", self.max_changes, self.frozen_depth)
            else:
                self._apply(depth)
        if self.log_fn is not None:
            self.log_fn(self.metrics)

    def _apply(self, depth: int) -> None:
        if self._tracer is not None:
            if depth > 0:
                raise RuntimeError(
                    "order='execution' needs one forward pass before the first freeze; run the model "
                    "once or pass example_inputs to attach()"
                )
        before = self._freezer.depth
        if self._freezer.apply(depth):
            if self._traced_hooks is not None:
                self._traced_hooks.remove()  # dynamo recompiles for the new frozen set anyway
                self._traced_hooks = None
            self._bridge.update(self._freezer.layers[:depth])
            self.policy._frozen_set_changed()
            self._changes += 1
            distributed.on_trainable_change(self._wrapper)
            layers = self._freezer.layers
            log.info(
                "layerfreeze: step %d: frozen depth %d -> %d of %d layers (%s), %d parameters frozen",
                self._step, before, depth, len(layers),
                layers[depth - 1].name if depth else "none", len(self._freezer.frozen_names),
            )
            self._hint_batchnorm()

    def _warn_no_epoch_end(self) -> None:
        if not self._epoch_warned:
            self._epoch_warned = True
            hints.warn_no_epoch_end(self._step, self.total_steps)

    def _hint_batchnorm(self) -> None:
        if self.batchnorm == "train" and not self._bn_hinted:
            self._bn_hinted = hints.warn_frozen_batchnorm(self._freezer.layers[: self._freezer.depth])
