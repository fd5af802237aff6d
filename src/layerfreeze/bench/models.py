"""Bundled models for ``layerfreeze plan`` / ``bench`` and the benchmarks.

All are built from code (no downloaded weights). Each factory returns a model and
an example input shape (without the batch dimension) via :data:`MODELS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["resnet20", "resnet56", "cifar_resnet", "transformer_encoder", "mlp", "ModelSpec", "MODELS", "get_model"]


class _BasicBlock(nn.Module):
    """CIFAR ResNet basic block (He et al. 2016, option B shortcut by 1x1 conv)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images: widths 16/32/64, n blocks per stage."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        blocks = []
        cin = 16
        for stage, width in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(_BasicBlock(cin, width, stride))
                cin = width
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(depth, num_classes, in_channels)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR-style ResNet-20 (0.27 M parameters)."""
    return CifarResNet(20, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR-style ResNet-56 (0.85 M parameters)."""
    return CifarResNet(56, num_classes, in_channels)


class TransformerClassifier(nn.Module):
    """Token embedding + learned positions + pre-norm encoder layers + mean-pool head."""

    def __init__(self, vocab_size: int = 1000, width: int = 384, depth: int = 6, heads: int = 6,
                 seq_len: int = 128, num_classes: int = 2, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(seq_len, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(positions)
        x = self.encoder(x)
        return self.head(self.norm(x).mean(dim=1))


def transformer_encoder(vocab_size: int = 1000, width: int = 384, depth: int = 6, heads: int = 6,
                        seq_len: int = 128, num_classes: int = 2) -> TransformerClassifier:
    """A transformer encoder classifier (default: 6 layers, width 384, sequence 128)."""
    return TransformerClassifier(vocab_size, width, depth, heads, seq_len, num_classes)


def mlp(in_features: int = 1024, hidden: int = 256, depth: int = 4, num_classes: int = 10) -> nn.Sequential:
    """A plain MLP on flattened inputs."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class ModelSpec:
    """A bundled model: factory, per-example input shape, input dtype, summary."""

    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype
    summary: str

    def example_input(self, batch_size: int = 2, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        shape = tuple(shape or self.input_shape)
        if self.input_dtype == torch.long:
            return torch.randint(0, 1000, (batch_size, *shape))
        return torch.randn(batch_size, *shape)


MODELS: dict[str, ModelSpec] = {
    "resnet20": ModelSpec(resnet20, (3, 32, 32), torch.float32, "CIFAR-style ResNet-20"),
    "resnet56": ModelSpec(resnet56, (3, 32, 32), torch.float32, "CIFAR-style ResNet-56"),
    "transformer": ModelSpec(transformer_encoder, (128,), torch.long,
                             "transformer encoder, 6 layers, width 384, sequence 128"),
    "mlp": ModelSpec(mlp, (1, 32, 32), torch.float32, "MLP, 4 hidden layers of 256"),
}


def get_model(name: str) -> ModelSpec:
    """The bundled model called ``name``; ValueError naming the choices otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; bundled models: {', '.join(MODELS)}") from None
