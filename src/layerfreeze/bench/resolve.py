"""Turn the command line's MODEL, ``--input-shape`` and ``--input-dtype`` into objects.

MODEL is a bundled name (see :data:`layerfreeze.bench.models.MODELS`) or
``package.module:factory`` naming a callable that returns an ``nn.Module`` when
called with no arguments; the current directory is importable, as with
``python -m``. Every failure is a ``ValueError`` whose one-line message the CLI
prints as is.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from .data import Dataset
from .models import MODELS, ModelSpec

__all__ = ["ModelRef", "resolve_model", "parse_shape", "parse_dtype", "build_model", "build_for_data", "check_forward", "example_input", "DTYPES"]

DTYPES = {
    "float32": torch.float32, "float": torch.float32, "float64": torch.float64, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "long": torch.long, "int64": torch.long, "int32": torch.int32,
}


@dataclass(frozen=True)
class ModelRef:
    """A model named on the command line.

    Attributes:
        name: the text given (a bundled name or ``module:factory``).
        factory: builds the model.
        spec: the bundled model's spec, or None for a user factory.
    """

    name: str
    factory: Callable[..., Any]
    spec: Optional[ModelSpec]

    @property
    def bundled(self) -> bool:
        return self.spec is not None


def resolve_model(text: str) -> ModelRef:
    """Find the model called ``text``.

    Raises:
        ValueError: for an unknown bundled name, a module that does not import or a
            missing or non-callable factory.
    """
    if text in MODELS:
        return ModelRef(text, MODELS[text].factory, MODELS[text])
    if ":" not in text:
        raise ValueError(
            f"unknown model {text!r}; bundled models: {', '.join(MODELS)}, "
            "or give your own as package.module:factory"
        )
    module_name, _, attr = text.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model {text!r} must look like package.module:factory")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # the user's module may raise anything on import
        raise ValueError(f"model {text!r}: cannot import {module_name!r}: {_first_line(error)}") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"model {text!r}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"model {text!r}: {attr!r} is not callable (expected a factory returning an nn.Module)")
    return ModelRef(text, target, None)


def call_factory(ref: ModelRef, **kwargs: Any) -> nn.Module:
    """Call the factory; ValueError when it fails or returns something other than a module."""
    try:
        model = ref.factory(**kwargs)
    except Exception as error:
        raise ValueError(f"model {ref.name!r}: its factory raised {type(error).__name__}: {_first_line(error)}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {ref.name!r}: its factory returned {type(model).__name__}, not an nn.Module")
    return model


def parse_shape(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """``"3,32,32"`` -> ``(3, 32, 32)``; None stays None.

    Raises:
        ValueError: unless ``text`` is a comma-separated list of positive integers.
    """
    if text is None:
        return None
    parts = [part.strip() for part in str(text).replace("x", ",").split(",")]
    try:
        shape = tuple(int(part) for part in parts)
    except ValueError:
        shape = ()
    if not shape or any(size <= 0 for size in shape):
        raise ValueError(
            f"--input-shape must be positive integers separated by commas, without the batch "
            f"dimension (e.g. 3,32,32), got {text!r}"
        )
    return shape


def parse_dtype(text: Optional[str]) -> Optional[torch.dtype]:
    """``"float32"`` -> ``torch.float32``; None stays None."""
    if text is None:
        return None
    if text not in DTYPES:
        raise ValueError(f"--input-dtype must be one of {', '.join(DTYPES)}, got {text!r}")
    return DTYPES[text]


def example_input(shape: tuple[int, ...], dtype: torch.dtype, spec: Optional[ModelSpec], batch: int = 2) -> torch.Tensor:
    """A sample batch: the bundled model's own example when it applies, else zeros
    for integer inputs (valid token ids for any vocabulary) and normal noise for floats."""
    if spec is not None and dtype == spec.input_dtype:
        return spec.example_input(batch, shape)
    if dtype.is_floating_point:
        return torch.randn(batch, *shape).to(dtype)
    return torch.zeros(batch, *shape, dtype=dtype)


def check_forward(model: nn.Module, x: torch.Tensor, name: str, num_classes: Optional[int] = None) -> torch.Tensor:
    """Run one forward pass in eval mode (so BatchNorm statistics stay untouched);
    ValueError naming the input shape when the model rejects it."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as error:
        raise ValueError(
            f"model {name!r} failed on an input of shape {tuple(x.shape[1:])} ({str(x.dtype).replace('torch.', '')}) "
            f"plus a batch dimension: {_first_line(error)}. HINT: pass the right --input-shape / --input-dtype"
        ) from None
    finally:
        model.train(was_training)
    if num_classes is not None:
        if not isinstance(out, torch.Tensor) or out.shape != (x.shape[0], num_classes):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"model {name!r} must return logits of shape (batch, {num_classes}) for this data, got {got}"
            )
    return out


def build_model(ref: ModelRef, shape: tuple[int, ...], dtype: torch.dtype, num_classes: Optional[int] = None,
                source: str = "--input-shape") -> nn.Module:
    """Build the model sized for inputs of ``shape`` and ``dtype`` (and ``num_classes``).

    Bundled models get arguments fitting the input (channels, features, sequence
    length, classes); a user factory is called with none and must already fit.

    Raises:
        ValueError: when a bundled model cannot take such inputs.
    """
    name = ref.name
    floating = dtype.is_floating_point
    classes = {} if num_classes is None else {"num_classes": num_classes}
    if not ref.bundled:
        return call_factory(ref)
    if name.startswith("resnet"):
        if len(shape) != 3 or not floating:
            raise ValueError(f"model {name!r} takes float images (C, H, W); {source} gives {shape}")
        return call_factory(ref, in_channels=shape[0], **classes)
    if name == "mlp":
        if not floating:
            raise ValueError(f"model 'mlp' takes float inputs; {source} gives integer ids")
        return call_factory(ref, in_features=math.prod(shape), **classes)
    if name == "minilm":
        if len(shape) != 2 or shape[0] != 2 or floating:
            raise ValueError(
                f"model 'minilm' takes token ids and attention masks stacked, integer shape (2, L); {source} gives "
                f"{shape} {str(dtype).replace('torch.', '')}. HINT: use --task rotten-tomatoes"
            )
        return call_factory(ref, **classes)
    if name == "transformer":
        if len(shape) != 1 or floating:
            raise ValueError(
                f"model 'transformer' takes token sequences (integer ids, shape (L,)); {source} gives "
                f"{shape} {str(dtype).replace('torch.', '')}. HINT: give it integer token ids (bench: --data synthetic; plan: --input-dtype long)"
            )
        return call_factory(ref, seq_len=shape[0], **classes)
    return call_factory(ref)  # a bundled model added later without a rule here: as is


def build_for_data(ref: ModelRef, data: Dataset) -> nn.Module:
    """Build the model sized for ``data`` and check it on a sample batch.

    Raises:
        ValueError: when the model cannot take this data or returns the wrong shape.
    """
    model = build_model(ref, data.input_shape, data.x_train.dtype, data.num_classes, f"data {data.name!r}")
    model = model.to(data.x_train.device)  # the data's device: the bench moves the data before the runs
    check_forward(model, data.x_train[:2], ref.name, data.num_classes)
    return model


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
