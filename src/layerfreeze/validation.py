"""Checks of the numbers, counts and choices users pass, in one place.

The algorithm, the policies, the functional form and the state loader all check
their arguments here, so one kind of value is accepted (or refused) alike
everywhere. Python numbers and numpy scalars are accepted alike
(``np.float32(0.5)``, ``np.int64(10)``, ``np.str_("step")``, ``np.bool_(True)``)
and come back as plain ``float``, ``int``, ``str`` or ``bool``: what is stored
from them (a checkpoint's state, say) holds plain Python types only and loads
under ``torch.load(weights_only=True)``. A 0-d numpy array or tensor counts as
the scalar it holds. Arrays and tensors with dimensions, even of one element,
are refused with a message naming the argument: a 2-element array is not a
fraction, and a silent ``float(array)`` would hide the mistake.

Example:
    >>> import numpy as np
    >>> check_int("every", np.int64(10)), check_number("t0", np.float32(0.5), 0.0, 1.0, low_open=True)
    (10, 0.5)
    >>> check_choice("interval", np.array(["epoch"]), ("epoch", "step"))
    Traceback (most recent call last):
    ...
    ValueError: interval must be one of 'epoch', 'step', got array(['epoch'], dtype='<U5')
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["is_int", "is_real", "check_int", "check_number", "check_choice", "check_bool", "interval_text"]


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer scalar (Python, numpy, 0-d array or tensor), not a bool."""
    if isinstance(value, numbers.Integral):
        return not _is_bool(value)
    return _zero_dim_kind(value) == "i"


def is_real(value: object) -> bool:
    """Whether ``value`` is a real scalar (Python, numpy, 0-d array or tensor; int or float), not a bool."""
    if isinstance(value, numbers.Real):
        return not _is_bool(value)
    return _zero_dim_kind(value) in ("i", "f")


def _zero_dim_kind(value: object) -> Optional[str]:
    # "i" or "f" for a 0-d numpy array or tensor of integers or floats, else None.
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return {"i": "i", "u": "i", "f": "f"}.get(value.dtype.kind)
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.dtype.is_complex:
        if value.dtype.is_floating_point:
            return "f"
        return None if value.dtype == torch.bool else "i"
    return None


def _is_bool(value: object) -> bool:
    # numpy's bool_ is neither a bool nor a numbers.Integral, but reads as one.
    return isinstance(value, (bool, np.bool_))


def interval_text(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> str:
    """``[0, 1]``, ``(0, 1]``, ... as messages write an interval."""
    def show(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else repr(x)

    return f"{'(' if low_open else '['}{show(low)}, {show(high)}{')' if high_open else ']'}"


def check_int(name: str, value: object, *, minimum: int = 1, optional: bool = False) -> Optional[int]:
    """Return ``value`` as an ``int`` after checking it is an integer ``>= minimum`` (None if ``optional``).

    Raises:
        ValueError: naming ``name``, for anything else (a bool, a float, an array).
    """
    if optional and value is None:
        return None
    if not is_int(value) or value < minimum:  # type: ignore[operator]
        kind = {1: "a positive int", 0: "a non-negative int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{name} must be {kind}{' or None' if optional else ''}, got {value!r}")
    return int(value)  # type: ignore[arg-type]


def check_number(
    name: str, value: object, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> float:
    """Return ``value`` as a ``float`` after checking it is a real number in the interval.

    Raises:
        TypeError: for anything but a real scalar (a bool, a string, an array, a tensor).
        ValueError: for NaN or a value outside the interval.
    """
    interval = interval_text(low, high, low_open=low_open, high_open=high_open)
    if not is_real(value):
        raise TypeError(f"{name} must be a number in {interval}, got {value!r}")
    as_float = float(value)  # type: ignore[arg-type]
    above = as_float > low if low_open else as_float >= low
    below = as_float < high if high_open else as_float <= high
    if math.isnan(as_float) or not (above and below):
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return as_float


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Return ``value`` as a plain ``str`` after checking it is one of ``choices``.

    Raises:
        ValueError: naming ``name``, the accepted values and ``value``.
    """
    if not isinstance(value, str) or value not in choices:
        accepted = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {accepted}, got {value!r}")
    return str(value)


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` as a plain ``bool`` (numpy's ``bool_`` included).

    Raises:
        TypeError: for anything else (``0``, ``"yes"``).
    """
    if not _is_bool(value):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)
