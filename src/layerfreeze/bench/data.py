"""Datasets for ``layerfreeze bench``: digits, Fashion-MNIST, Rotten Tomatoes, synthetic, or an image folder.

Everything is loaded into memory as tensors up front, so the timed training loop
measures the model and the freezing, not a data pipeline. Splits are fixed
(seeded and stratified), so every run and every variant sees the same data.
"""

from __future__ import annotations

import gzip
import math
import os
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["Dataset", "load_data", "digits", "fashion_mnist", "rotten_tomatoes", "synthetic", "image_folder",
           "subset", "DATA_CHOICES", "FASHION_MNIST_DIR"]

#: Built-in data names; anything else given to ``--data`` is taken as a folder path.
DATA_CHOICES = ("digits", "fashion-mnist", "rotten-tomatoes", "synthetic")
#: Where the Debian package ``dataset-fashion-mnist`` installs the IDX files; the
#: environment variable ``LAYERFREEZE_FASHION_MNIST`` names another folder.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
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

    def to(self, device: torch.device) -> "Dataset":
        """The same data on ``device`` (itself when already there)."""
        if self.x_train.device.type == torch.device(device).type:
            return self
        return replace(self, x_train=self.x_train.to(device), y_train=self.y_train.to(device),
                       x_test=self.x_test.to(device), y_test=self.y_test.to(device))

    def describe(self) -> dict:
        return {
            "name": self.name,
            "train_size": len(self.y_train),
            "test_size": len(self.y_test),
            "input_shape": list(self.input_shape),
            "input_dtype": str(self.x_train.dtype).replace("torch.", ""),
            "num_classes": self.num_classes,
        }


def _stratified(y: torch.Tensor, size: int) -> Optional[torch.Tensor]:
    # Stratify when every present class can be split; tiny synthetic sets may not allow it.
    counts = torch.bincount(y)
    present = counts[counts > 0]
    if int(present.min()) < 2 or size < len(present) or len(y) - size < len(present):
        return None
    return y


def _split(x: torch.Tensor, y: torch.Tensor, name: str, num_classes: int) -> Dataset:
    from sklearn.model_selection import train_test_split

    index = torch.arange(len(y)).numpy()
    stratify = _stratified(y, round(len(y) * _TEST_SHARE))
    train, test = train_test_split(index, test_size=_TEST_SHARE, random_state=_SPLIT_SEED,
                                   stratify=None if stratify is None else stratify.numpy())
    train, test = torch.as_tensor(train), torch.as_tensor(test)
    return Dataset(name, x[train].contiguous(), y[train], x[test].contiguous(), y[test], num_classes)


def _subset_index(y: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    from sklearn.model_selection import train_test_split

    if size >= len(y):
        return torch.arange(len(y))
    stratify = _stratified(y, size)
    kept, _ = train_test_split(torch.arange(len(y)).numpy(), train_size=size, random_state=seed,
                               stratify=None if stratify is None else stratify.numpy())
    return torch.as_tensor(sorted(kept.tolist()))


def subset(data: Dataset, train_size: Optional[int] = None, test_size: Optional[int] = None,
           seed: int = _SPLIT_SEED) -> Dataset:
    """A seeded, stratified subset of the training and/or test examples (the others unchanged).

    Examples keep their order in the full split. The same ``seed`` and size always
    give the same subset, so every run and variant of a bench sees the same data.

    Raises:
        ValueError: for a size larger than the split it is taken from, or below 1.
    """
    x_train, y_train, x_test, y_test = data.x_train, data.y_train, data.x_test, data.y_test
    for option, size, available in (("--train-size", train_size, len(y_train)), ("--test-size", test_size, len(y_test))):
        if size is not None and not 1 <= size <= available:
            split = option[2:].split("-")[0]
            raise ValueError(f"{option} must be in [1, {available}] (the {split} examples of {data.name}), got {size}")
    if train_size is not None:
        index = _subset_index(y_train, train_size, seed)
        x_train, y_train = x_train[index].contiguous(), y_train[index]
    if test_size is not None:
        index = _subset_index(y_test, test_size, seed)
        x_test, y_test = x_test[index].contiguous(), y_test[index]
    return replace(data, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


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


def _read_idx(path: str) -> torch.Tensor:
    """An IDX file (the MNIST format: big-endian header, then unsigned bytes), gzipped or not."""
    import numpy as np

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    dims = raw[3]
    shape = tuple(int(n) for n in np.frombuffer(raw, dtype=">u4", count=dims, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if data.size != math.prod(shape):
        raise ValueError(f"{path} holds {data.size} values, its header says {shape}")
    return torch.from_numpy(data.reshape(shape).copy())


_FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte",
}


def fashion_mnist(folder: Optional[str] = None) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017): 60,000 training and 10,000 test 28x28 grey images of
    10 kinds of clothing, the official split, read from the IDX files.

    Pixels are scaled to [0, 1] and standardized with the training set's mean and
    standard deviation. ``folder`` defaults to ``$LAYERFREEZE_FASHION_MNIST`` or
    :data:`FASHION_MNIST_DIR` (the Debian package ``dataset-fashion-mnist``).

    Raises:
        RuntimeError: naming what to install when the files are missing.
    """
    folder = folder or os.environ.get("LAYERFREEZE_FASHION_MNIST") or FASHION_MNIST_DIR
    paths = {}
    for key, stem in _FASHION_FILES.items():
        found = [os.path.join(folder, stem + ext) for ext in (".gz", "") if os.path.isfile(os.path.join(folder, stem + ext))]
        if not found:
            raise RuntimeError(
                f"--task fashion-mnist needs the Fashion-MNIST IDX files ({stem}.gz not in {folder}): "
                "apt-get install dataset-fashion-mnist (or set LAYERFREEZE_FASHION_MNIST to a folder holding them)")
        paths[key] = found[0]
    arrays = {key: _read_idx(path) for key, path in paths.items()}
    x_train = arrays["x_train"].float().div_(255.0).unsqueeze(1)
    x_test = arrays["x_test"].float().div_(255.0).unsqueeze(1)
    mean, std = x_train.mean(), x_train.std()
    return Dataset("fashion-mnist", ((x_train - mean) / std).contiguous(), arrays["y_train"].long(),
                   ((x_test - mean) / std).contiguous(), arrays["y_test"].long(), 10)


def rotten_tomatoes(train_size: Optional[int] = None, test_size: Optional[int] = None) -> Dataset:
    """Rotten Tomatoes review snippets, fresh (1) or rotten (0): 12,808 in the corpus, 12,752
    once duplicate texts are dropped, split 80/20 stratified with seed 0 (10,201 / 2,551),
    optionally subset (as :func:`subset`), then tokenized once for all-MiniLM-L6-v2 (see
    :mod:`layerfreeze.bench.text`), padded to the longest kept snippet.

    Raises:
        RuntimeError: naming what to install when the corpus or the tokenizer is missing.
    """
    from . import text

    texts, labels = text.rotten_tomatoes()
    text.model_dir()  # the tokenizer is needed too: say so before reading anything more
    # Split and subset the snippets' indices first: only the kept ones are tokenized.
    split = subset(_split(torch.arange(len(labels)).unsqueeze(1), labels, "rotten-tomatoes", 2),
                   train_size, test_size)
    kept = torch.cat([split.x_train[:, 0], split.x_test[:, 0]]).tolist()
    tokens = text.tokenize([texts[i] for i in kept])
    count = len(split.y_train)
    return replace(split, x_train=tokens[:count].contiguous(), x_test=tokens[count:].contiguous())


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


def load_data(name: str, input_shape: tuple[int, ...] = (3, 32, 32), dtype: torch.dtype = torch.float32,
              train_size: Optional[int] = None, test_size: Optional[int] = None) -> Dataset:
    """Load ``name``: one of :data:`DATA_CHOICES` ("synthetic" shaped like ``input_shape``)
    or a folder path; then take a seeded stratified subset when sizes are given.

    Raises:
        ValueError: if ``name`` is neither a built-in name nor an existing folder, or a size
            does not fit.
        RuntimeError: when the data (or what reads it) is not installed; the message says what to install.
    """
    if name == "digits":
        data = digits()
    elif name == "fashion-mnist":
        data = fashion_mnist()
    elif name == "rotten-tomatoes":
        return rotten_tomatoes(train_size, test_size)
    elif name == "synthetic":
        data = synthetic(tuple(input_shape), dtype)
    elif os.path.isdir(name):
        data = image_folder(name)
    else:
        raise ValueError(f"--data must be one of {', '.join(DATA_CHOICES)} or an image folder, got {name!r}")
    return subset(data, train_size, test_size)
