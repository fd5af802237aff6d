"""The checkpoint state of ``LayerFreezing`` as plain data, and the field checks behind it.

:class:`FreezingState` is what :meth:`layerfreeze.LayerFreezing.state_dict` saves:
counters, the layer order and the frozen parameters by qualified name, the
policy's own state and the settings it was made with. :meth:`FreezingState.from_dict`
checks every field (types and ranges) before anything is applied, so a refused
state changes nothing; :func:`check_against_model` then checks it fits the model.

The ``field_*`` helpers are shared with the policies' ``check_state``: each error
names the field by its path from the checkpoint's root, ``state_dict.policy.previous``
say, the value, and what is accepted.

Example:
    >>> state = FreezingState(step=4, epoch=1, depth=1, fraction=0.5, changes=1,
    ...                       layers=("0", "2"), frozen=("0.bias", "0.weight"))
    >>> FreezingState.from_dict(state.to_dict()) == state
    True
    >>> FreezingState.from_dict({**state.to_dict(), "step": "4"})
    Traceback (most recent call last):
    ...
    ValueError: state_dict.step must be a non-negative int, got '4'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

from torch import nn

from .hints import summarize
from .layers import Layer, definition_order
from .validation import is_int, is_real

__all__ = [
    "FORMAT",
    "FreezingState",
    "check_against_model",
    "field_mapping",
    "field_count",
    "field_real",
    "field_names",
    "field_name_map",
]

#: Version of the state layout; a state of another version is refused.
FORMAT = 1

T = TypeVar("T")

_CONFIG_CHOICES = ("interval", "order", "batchnorm", "dropout", "shared", "unit")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def field_mapping(value: Any, path: str, keys: Sequence[str] = (), source: str = "") -> Mapping[str, Any]:
    """Check ``value`` is a dict holding ``keys``; ``source`` names the ``state_dict()`` that makes it."""
    origin = f" from {source}.state_dict()" if source else ""
    if not isinstance(value, Mapping):
        raise ValueError(f"{path} must be a dict{origin}, got {type(value).__name__}")
    missing = [key for key in keys if key not in value]
    if missing:
        raise ValueError(f"{path} is not{origin or ' a complete state'}: missing key {missing[0]!r}")
    return value


def field_count(value: Any, path: str) -> int:
    """A non-negative int (numpy integers included), as a plain ``int``."""
    if not is_int(value) or value < 0:
        raise ValueError(f"{path} must be a non-negative int, got {_shown(value)}")
    return int(value)


def field_real(value: Any, path: str, *, finite: bool = False) -> float:
    """A real number (numpy scalars included), as a plain ``float``; ``finite`` refuses inf and NaN."""
    if not is_real(value) or (finite and not math.isfinite(float(value))):
        raise ValueError(f"{path} must be a {'finite ' if finite else ''}number, got {_shown(value)}")
    return float(value)


def field_names(value: Any, path: str) -> tuple[str, ...]:
    """A list of names (str)."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(name, str) for name in value):
        raise ValueError(f"{path} must be a list of names, got {_shown(value)}")
    return tuple(str(name) for name in value)


def field_name_map(
    value: Any, path: str, check: Callable[[Any, str], T], *, optional: bool = False
) -> Optional[dict[str, T]]:
    """A dict from names (str) to values each passing ``check(value, "path[name]")``; None if ``optional``."""
    if optional and value is None:
        return None
    if not isinstance(value, Mapping):
        accepted = "a dict of names" + (" or None" if optional else "")
        raise ValueError(f"{path} must be {accepted}, got {_shown(value)}")
    out = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise ValueError(f"{path} must have names (str) as keys, got {_shown(key)}")
        out[str(key)] = check(item, f"{path}[{key!r}]")
    return out


@dataclass(frozen=True)
class FreezingState:
    """Everything ``LayerFreezing`` needs to resume a run exactly, as plain data.

    Attributes:
        step: optimizer steps done.
        epoch: epochs done.
        depth: leading layers frozen.
        fraction: the policy's fraction at the last decision.
        changes: changes of the frozen set so far (bounded by ``max_changes``).
        layers: layer names in freeze order.
        frozen: qualified names of the frozen parameters.
        traced: whether ``layers`` is final (False while ``order="execution"``
            still waits for the first forward pass).
        policy: the policy's own ``state_dict()``.
        config: the settings the state was made with (compared, and warned
            about, on load).
    """

    step: int
    epoch: int
    depth: int
    fraction: float
    changes: int
    layers: tuple[str, ...]
    frozen: tuple[str, ...]
    traced: bool = True
    policy: Mapping[str, Any] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The state as a dict of plain Python values (and the policy's tensors, if any)."""
        return {
            "format": FORMAT,
            "step": self.step,
            "epoch": self.epoch,
            "depth": self.depth,
            "fraction": self.fraction,
            "changes": self.changes,
            "layers": list(self.layers),
            "traced": self.traced,
            "frozen": list(self.frozen),
            "policy": dict(self.policy),
            "config": dict(self.config),
        }

    @classmethod
    def from_dict(cls, state: Any, path: str = "state_dict") -> "FreezingState":
        """Check every field of ``state`` (a :meth:`to_dict` result) and return it as a ``FreezingState``.

        Raises:
            ValueError: naming the first bad field by its path; nothing is applied.
        """
        keys = ("format", "step", "epoch", "depth", "fraction", "changes", "layers", "frozen", "policy")
        state = field_mapping(state, path, keys, source="LayerFreezing")
        if not is_int(state["format"]) or state["format"] != FORMAT:
            raise ValueError(f"{path} format {state['format']!r} is not supported (expected {FORMAT})")
        traced = state.get("traced", True)
        if not isinstance(traced, bool):
            raise ValueError(f"{path}.traced must be a bool, got {_shown(traced)}")
        config = state.get("config")  # not `or {}`: the truth of an array or tensor is an error of its own
        config = field_mapping({} if config is None else config, f"{path}.config")
        for key in _CONFIG_CHOICES:
            if key in config and not isinstance(config[key], str):
                raise ValueError(f"{path}.config.{key} must be a str, got {_shown(config[key])}")
        if config.get("total_steps") is not None:
            field_count(config["total_steps"], f"{path}.config.total_steps")
        return cls(
            step=field_count(state["step"], f"{path}.step"),
            epoch=field_count(state["epoch"], f"{path}.epoch"),
            depth=field_count(state["depth"], f"{path}.depth"),
            fraction=field_real(state["fraction"], f"{path}.fraction", finite=True),
            changes=field_count(state["changes"], f"{path}.changes"),
            layers=field_names(state["layers"], f"{path}.layers"),
            frozen=field_names(state["frozen"], f"{path}.frozen"),
            traced=traced,
            policy=field_mapping(state["policy"], f"{path}.policy"),
            config=dict(config),
        )


def check_against_model(
    state: FreezingState,
    model: nn.Module,
    *,
    unit: str,
    shared: str,
    order: str,
    names_for_depth: Callable[[int, Sequence[Layer]], set[str]],
) -> list[Layer]:
    """Check that ``state`` fits ``model`` and these settings; return its layers in the saved order.

    ``names_for_depth(depth, layers)`` is the freezer's rule: the saved frozen set
    must be exactly what the saved depth freezes on this model.

    Raises:
        ValueError: for a state of another model (a layer or parameter it lacks, a
            layer it does not name, another layer order) or other ``unit``/``shared``
            settings, or a frozen set that the depth does not give.
    """
    settings = {"unit": unit, "shared": shared}
    for key, value in settings.items():
        saved = state.config.get(key)
        if saved is not None and saved != value:
            raise ValueError(
                f"state_dict was saved with {key}={saved!r} but this LayerFreezing has "
                f"{key}={value!r}; construct it with the checkpoint's settings"
            )
    definition = definition_order(model, unit)
    by_name = {layer.name: layer for layer in definition}
    missing = [name for name in state.layers if name not in by_name]
    extra = sorted(set(by_name) - set(state.layers))
    if missing or extra or len(state.layers) != len(by_name):
        detail = f"it names layer {missing[0]!r}, which this model lacks" if missing else (
            f"this model has layer(s) it does not name: {summarize(extra)}")
        raise ValueError(f"state_dict does not match this model: {detail}")
    if order == "definition" and list(state.layers) != [layer.name for layer in definition]:
        raise ValueError(
            "state_dict lists the layers in another order than this model's definition order "
            f"(saved with order={state.config.get('order', '?')!r}?); construct LayerFreezing with the "
            "checkpoint's order"
        )
    unknown = sorted(set(state.frozen) - set(dict(model.named_parameters())))
    if unknown:
        raise ValueError(
            f"state_dict does not match this model: it freezes parameter {unknown[0]!r}, "
            "which this model lacks"
        )
    depth = state.depth
    if not 0 <= depth <= max(len(by_name) - 1, 0):
        raise ValueError(f"state_dict does not match this model: depth {depth} with {len(by_name)} layers")
    layers = [by_name[name] for name in state.layers]
    expected = names_for_depth(depth, layers)
    frozen = set(state.frozen)
    if frozen != expected:
        raise ValueError(
            f"state_dict is inconsistent: depth {depth} freezes {len(expected)} parameter(s) of "
            f"these layers, but it lists {len(frozen)} ({summarize(sorted(frozen ^ expected))} differ)"
        )
    return layers
