"""Datasets for ``layerfreeze bench``: digits, synthetic, or an image folder.

Everything is loaded into memory as tensors up front, so the timed training loop
measures the model and the freezing, not a data pipeline. Splits are fixed
(seeded and stratified), so every run and every variant sees the same data.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Dataset", "load_data", "digits", "synthetic", "image_folder", "DATA_CHOICES"]

#: Built-in data names; anything else given to ``--data`` is taken as a folder path.
DATA_CHOICES = ("digits", "synthetic")
_SPLIT_SEED = 0
_TEST_SHARE = 0.2


@dataclass(frozen=True)
class Dataset:
    """A fixed train/test split held in memory.

    Attributes:
        name: what was loaded ("digits", "synthetic" or the folder path).
        x_train, y_train, x_test, y_test: inputs and integer class labels.
        num_classes: number of classes.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example (without the batch dimension)."""
        return tuple(self.x_train.shape[1:])

    def describe(self) -> dict:
        return {
            "name": self.name,
            "train_size": len(self.y_train),
            "test_size": len(self.y_test),
            "input_shape": list(self.input_shape),
            "input_dtype": str(self.x_train.dtype).replace("torch.", ""),
            "num_classes": self.num_classes,
        }


def _split(x: torch.Tensor, y: torch.Tensor, name: str, num_classes: int) -> Dataset:
    from sklearn.model_selection import train_test_split

    index = torch.arange(len(y)).numpy()
    counts = torch.bincount(y)
    # Stratify when every present class can be split; tiny synthetic sets may not allow it.
    stratify = y.numpy() if int(counts[counts > 0].min()) >= 2 else None
    train, test = train_test_split(index, test_size=_TEST_SHARE, random_state=_SPLIT_SEED, stratify=stratify)
    train, test = torch.as_tensor(train), torch.as_tensor(test)
    return Dataset(name, x[train].contiguous(), y[train], x[test].contiguous(), y[test], num_classes)


def digits(size: int = 32) -> Dataset:
    """scikit-learn's handwritten digits (1,797 8x8 images, 10 classes), resized.

    The images ship with scikit-learn, so nothing downloads. They are scaled to
    [0, 1], resized to ``size`` x ``size`` by bilinear interpolation (so CIFAR-style
    networks apply unchanged) and standardized; the split is 80/20, stratified, seed 0.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise RuntimeError(
            "--data digits needs scikit-learn; install it with pip install 'layerfreeze[cli]'"
        ) from None
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(bunch.target, dtype=torch.long)
    return _split(x, y, "digits", 10)


def synthetic(input_shape: tuple[int, ...], dtype: torch.dtype = torch.float32, num_classes: int = 10,
              size: int = 1280, vocab: int = 1000) -> Dataset:
    """Random inputs labelled by a fixed random teacher, so there is something to learn.

    Float inputs are standard normal, labelled by the argmax of a fixed linear map
    of the flattened input; integer inputs are token ids in ``[0, vocab)``,
    labelled by the argmax of a sum of fixed random per-token scores.
    """
    generator = torch.Generator().manual_seed(1234)
    if dtype in (torch.long, torch.int64, torch.int32):
        x = torch.randint(0, vocab, (size, *input_shape), generator=generator, dtype=dtype)
        scores = torch.randn(vocab, num_classes, generator=generator)
        logits = scores[x.long()].reshape(size, -1, num_classes).sum(1)
    else:
        x = torch.randn(size, *input_shape, generator=generator).to(dtype)
        features = math.prod(input_shape)
        teacher = torch.randn(features, num_classes, generator=generator) / math.sqrt(features)
        logits = x.float().reshape(size, -1) @ teacher
    y = logits.argmax(1)
    return _split(x, y, "synthetic", num_classes)


def image_folder(path: str, size: int = 32) -> Dataset:
    """Images under ``path/<class>/*`` via torchvision's ImageFolder, resized, in memory.

    Raises:
        RuntimeError: if torchvision is not installed.
        ValueError: if the folder holds fewer than two classes.
    """
    try:
        from torchvision import datasets, transforms
    except ImportError:
        raise RuntimeError(
            f"--data {path!r} is a folder, which needs torchvision (pip install torchvision, "
            "matching your torch); built-in data: digits, synthetic"
        ) from None
    transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
    folder = datasets.ImageFolder(path, transform=transform)
    if len(folder.classes) < 2:
        raise ValueError(f"--data {path!r} must hold one subfolder per class (at least 2), found {len(folder.classes)}")
    x = torch.stack([folder[i][0] for i in range(len(folder))])
    x = (x - x.mean()) / x.std()
    y = torch.tensor(folder.targets, dtype=torch.long)
    return _split(x, y, path, len(folder.classes))


def load_data(name: str, input_shape: tuple[int, ...] = (3, 32, 32), dtype: torch.dtype = torch.float32) -> Dataset:
    """Load ``name``: "digits", "synthetic" (shaped like ``input_shape``) or a folder path.

    Raises:
        ValueError: if ``name`` is neither a built-in name nor an existing folder.
    """
    if name == "digits":
        return digits()
    if name == "synthetic":
        return synthetic(tuple(input_shape), dtype)
    if os.path.isdir(name):
        return image_folder(name)
    raise ValueError(f"--data must be one of {', '.join(DATA_CHOICES)} or an image folder, got {name!r}")
