"""Shared tiny models for the tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

torch.set_num_threads(1)


class ConvBN(nn.Module):
    """Conv net with BatchNorm and parameterless leaves (ReLU, pooling, Flatten)."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


class OwnsParams(nn.Module):
    """A module owning a parameter directly beside its children (never a layer under unit='leaf')."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(6))
        self.first = nn.Linear(6, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.LayerNorm(6))
        self.last = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.block(self.first(x * self.scale)))


class TinyEncoder(nn.Module):
    """Transformer encoder: MultiheadAttention owns in_proj_weight beside out_proj."""

    def __init__(self, vocab: int = 11, width: int = 8, depth: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(width, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


class Tied(nn.Module):
    """Embedding and output head sharing one weight (as in language models)."""

    def __init__(self, vocab: int = 7, width: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mid = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(self.embed(tokens)))).mean(1)


class Swapped(nn.Module):
    """Defined a, b, c but run c, a, b: definition order differs from execution order."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)
        self.c = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(torch.relu(self.c(x)))))


def mlp(depth: int = 5, width: int = 6) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 2))
    return nn.Sequential(*layers)


def batch_for(model: nn.Module, n: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """A batch of the right kind for each test model."""
    if isinstance(model, ConvBN):
        return torch.randn(n, 1, 6, 6, generator=generator)
    if isinstance(model, (TinyEncoder, Tied)):
        vocab = model.embed.num_embeddings
        return torch.randint(0, vocab, (n, 5), generator=generator)
    if isinstance(model, Swapped):
        return torch.randn(n, 5, generator=generator)
    return torch.randn(n, 6, generator=generator)


MODEL_FACTORIES = {
    "mlp": mlp,
    "convbn": ConvBN,
    "owns_params": OwnsParams,
    "encoder": TinyEncoder,
    "tied": Tied,
    "swapped": Swapped,
}


def train_step(model: nn.Module, optimizers, x: torch.Tensor) -> None:
    loss = model(x).float().pow(2).mean()
    loss.backward()
    for opt in optimizers:
        opt.step()
        opt.zero_grad()


def train_depths(opt: torch.optim.Optimizer, freezing, run, xs) -> list[int]:
    """One optimizer step per batch through ``run``, then ``freezing.step()``; the frozen depth at each forward."""
    depths = []
    for x in xs:
        depths.append(freezing.frozen_depth)
        run(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        freezing.step()
    return depths


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def model_name(request) -> str:
    return request.param
