"""Composer: parity of ``freeze_layers`` with Composer's own, and the Algorithm adapter.

Needs the real ``composer`` (PyPI ``mosaicml``), which pins an older torch: these
tests run in the separate environment that ``scripts/composer_venv.sh`` builds
(``make test`` does it) and are skipped where composer is not importable.
"""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.slow  # the real Trainer (and its own environment)

composer = pytest.importorskip(
    "composer",
    reason="composer (PyPI mosaicml) is not installed here; `make test` runs this file in .venv-composer",
)

from composer.algorithms.layer_freezing import freeze_layers as composer_freeze_layers  # noqa: E402

import layerfreeze as lf  # noqa: E402
from conftest import ConvBN, OwnsParams, Tied, TinyEncoder, mlp  # noqa: E402

# -- parity -----------------------------------------------------------------

DURATIONS = sorted({i / 40 for i in range(41)} | {1 / 3, 2 / 3, 0.3, 0.7, 0.55, 0.9999, 1e-9})
SCHEDULES = [(0.5, 1.0), (0.0, 1.0), (0.3, 0.7), (0.25, 0.5), (0.1, 0.05), (0.0, 0.0), (0.999, 1.0)]


def _two_optimizers(model: nn.Module) -> list[torch.optim.Optimizer]:
    params = list(model.parameters())
    half = len(params) // 2
    first = torch.optim.SGD(
        [{"params": params[:1], "lr": 0.1}, {"params": params[1:half], "lr": 0.01}], lr=0.1, momentum=0.9,
    )
    second = torch.optim.AdamW(params[half:], lr=1e-3)
    return [first, second]


def _one_optimizer(model: nn.Module) -> list[torch.optim.Optimizer]:
    return [torch.optim.SGD(model.parameters(), lr=0.1)]


PARITY_MODELS = {
    "convbn": (ConvBN, _one_optimizer),
    "encoder": (TinyEncoder, _one_optimizer),
    "owns_params": (OwnsParams, _two_optimizers),
    "tied": (Tied, _one_optimizer),
    "mlp_groups": (lambda: mlp(6), _two_optimizers),
    "encoder_groups": (TinyEncoder, _two_optimizers),
}


def _snapshot(model: nn.Module, optimizers) -> tuple[frozenset, list]:
    names = {id(p): n for n, p in model.named_parameters()}
    frozen = frozenset(n for n, p in model.named_parameters() if not p.requires_grad)
    groups = [[[names[id(p)] for p in g["params"]] for g in opt.param_groups] for opt in optimizers]
    return frozen, groups


@pytest.mark.parametrize("model_name", sorted(PARITY_MODELS))
def test_freeze_layers_matches_composer(model_name):
    factory, make_optimizers = PARITY_MODELS[model_name]
    torch.manual_seed(0)
    template = factory()
    checked = 0
    for (start, level), duration in itertools.product(SCHEDULES, DURATIONS):
        ours, theirs = copy.deepcopy(template), copy.deepcopy(template)
        ours_opts, theirs_opts = make_optimizers(ours), make_optimizers(theirs)
        got = lf.freeze_layers(ours, ours_opts, duration, freeze_start=start, freeze_level=level)
        expected = composer_freeze_layers(theirs, theirs_opts, duration, freeze_start=start, freeze_level=level)
        assert got == expected, (model_name, start, level, duration)
        assert type(got[0]) is int and type(got[1]) is float
        frozen, groups = _snapshot(ours, ours_opts)
        assert (frozen, groups) == _snapshot(theirs, theirs_opts), (model_name, start, level, duration)
        # frozen means both: no gradient and in no param group
        in_groups = {n for opt in groups for g in opt for n in g}
        assert not frozen & in_groups
        checked += bool(frozen)
    assert checked > 0  # the grid reached depths that freeze something


def test_freeze_layers_repeated_calls_match_composer():
    """Composer never unfreezes: a later, smaller duration keeps earlier freezing; so do we."""
    torch.manual_seed(0)
    template = ConvBN()
    ours, theirs = copy.deepcopy(template), copy.deepcopy(template)
    ours_opts, theirs_opts = _two_optimizers(ours), _two_optimizers(theirs)
    for duration in (0.6, 0.9, 0.7, 1.0, 0.2):
        assert lf.freeze_layers(ours, ours_opts, duration) == composer_freeze_layers(theirs, theirs_opts, duration)
        assert _snapshot(ours, ours_opts) == _snapshot(theirs, theirs_opts)


# -- the Algorithm ----------------------------------------------------------

from composer import Trainer  # noqa: E402
from composer.algorithms import LayerFreezing as ComposerLayerFreezing  # noqa: E402
from composer.loggers import InMemoryLogger  # noqa: E402
from composer.models import ComposerClassifier  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from layerfreeze.integrations.composer import LayerFreezing  # noqa: E402

KEYS = (lf.LAYERS_FROZEN, lf.PERCENTAGE_FROZEN)
BATCHES_PER_EPOCH = 4


def _net() -> nn.Module:
    torch.manual_seed(0)
    return mlp(6)


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(4 * BATCHES_PER_EPOCH, 6, generator=generator),
                         torch.randint(0, 2, (4 * BATCHES_PER_EPOCH,), generator=generator))
    return DataLoader(data, batch_size=4, shuffle=False)


def _trainer(algorithms, *, net=None, max_duration="4ep", **kwargs) -> Trainer:
    net = _net() if net is None else net
    model = ComposerClassifier(net, num_classes=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    return Trainer(
        model=model, train_dataloader=_loader(), max_duration=max_duration, optimizers=optimizer,
        algorithms=algorithms, device="cpu", progress_bar=False, log_to_console=False, seed=7, **kwargs,
    )


def _history(logger: InMemoryLogger) -> dict[str, list]:
    return {key: [value for _, value in logger.data[key]] for key in KEYS}


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.state.model.named_parameters()}


def _frozen(trainer: Trainer) -> list[str]:
    return sorted(n for n, p in trainer.state.model.named_parameters() if not p.requires_grad)


def test_drop_in_for_composer_layer_freezing():
    """Same frozen layers at the same epoch ends and the same logged values as Composer's."""
    runs = {}
    for name, algorithm in (("composer", ComposerLayerFreezing(0.25, 1.0)), ("ours", LayerFreezing(0.25, 1.0))):
        logger = InMemoryLogger()
        seen = []

        class Record(composer.Callback):
            def epoch_end(self, state, logger):  # after the algorithms ran at EPOCH_END
                seen.append(sorted(n for n, p in state.model.named_parameters() if not p.requires_grad))

        trainer = _trainer([algorithm], loggers=[logger], callbacks=[Record()])
        trainer.fit()
        runs[name] = (seen, _history(logger), _frozen(trainer))
    assert runs["ours"] == runs["composer"]
    seen, history, frozen = runs["ours"]
    assert history[lf.LAYERS_FROZEN] == [0, 1, 3, 5]
    assert history[lf.PERCENTAGE_FROZEN] == [0.0, 1 / 3, 2 / 3, 1.0]
    assert frozen == [f"module.{i}.{k}" for i in (0, 2, 4, 6, 8) for k in ("bias", "weight")]
    assert [len(s) for s in seen] == [0, 2, 6, 10]


def test_interval_step_logs_every_batch_and_freezes_within_the_epoch():
    logger = InMemoryLogger()
    trainer = _trainer([LayerFreezing(0.0, 1.0, interval="step")], loggers=[logger], max_duration="1ep")
    trainer.fit()
    history = _history(logger)
    # 5 layers are freezable: depth int(k/4 * 5) after batch k of 4
    assert history[lf.LAYERS_FROZEN] == [1, 2, 3, 5]
    assert history[lf.PERCENTAGE_FROZEN] == [0.25, 0.5, 0.75, 1.0]


def _resume_case(tmp_path, algorithms_factory, save_interval, load_name):
    folder = str(tmp_path / "ckpt")
    full = _trainer(algorithms_factory(), save_folder=folder, save_interval=save_interval,
                    save_filename="{batch}.pt", save_overwrite=True)
    full.fit()
    expected = _weights(full), _frozen(full)
    resumed = _trainer(algorithms_factory(), net=_net(), load_path=f"{folder}/{load_name}")
    resumed.fit()
    return expected, (_weights(resumed), _frozen(resumed))


@pytest.mark.parametrize("load_name, interval", [("8.pt", "epoch"), ("8.pt", "step"), ("6.pt", "step"), ("6.pt", "epoch")],
                         ids=["epoch-boundary", "epoch-boundary-step-interval", "mid-epoch", "mid-epoch-epoch-interval"])
def test_resume_from_composer_checkpoint_is_bit_identical(tmp_path, load_name, interval):
    # First the trainer itself: without freezing, Composer resumes these checkpoints exactly.
    (base_weights, _), (base_resumed, _) = _resume_case(tmp_path / "base", lambda: [], "2ba", load_name)
    assert all(torch.equal(base_weights[n], base_resumed[n]) for n in base_weights)

    (weights, frozen), (resumed, resumed_frozen) = _resume_case(
        tmp_path / "lf", lambda: [LayerFreezing(0.25, 1.0, interval=interval)], "2ba", load_name,
    )
    assert frozen and resumed_frozen == frozen
    assert all(torch.equal(weights[n], resumed[n]) for n in weights)
    assert any(not torch.equal(weights[n], base_weights[n]) for n in weights)  # freezing did act


def test_composer_own_layer_freezing_cannot_checkpoint_this_run(tmp_path):
    """The motivation, reproduced: Composer's issue #1002 in the run ours resumes exactly."""
    trainer = _trainer([ComposerLayerFreezing(0.25, 1.0)], save_folder=str(tmp_path), save_interval="2ba",
                       save_filename="{batch}.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KeyError):  # optimizer state of a parameter no longer in any group
            trainer.fit()


def test_checkpoint_of_composer_layer_freezing_loads_with_a_warning(tmp_path, caplog):
    # freeze_start=1.0 never freezes, so Composer's own can save this checkpoint.
    _trainer([ComposerLayerFreezing(1.0)], save_folder=str(tmp_path), save_interval="1ep",
             save_filename="{epoch}.pt", max_duration="1ep").fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Composer's own warns that it cannot resume
        with caplog.at_level("WARNING", logger="layerfreeze"):
            logger = InMemoryLogger()
            trainer = _trainer([LayerFreezing(0.25)], load_path=str(tmp_path / "1.pt"), loggers=[logger])
    assert "holds no layer-freezing state" in caplog.text and "HINT:" in caplog.text
    trainer.fit()
    # epoch ends 2, 3, 4 of 4 by the run's timestamp: fractions 1/3, 2/3, 1 of 5 layers
    assert _history(logger)[lf.LAYERS_FROZEN] == [1, 3, 5]


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_freezing_added_on_resume_follows_the_runs_true_progress(tmp_path, interval):
    """A run saved without freezing after epoch 2 of 4, resumed with freezing added: the
    schedule continues from the timestamp (epochs 3 and 4), as Composer's own does."""
    _trainer([], save_folder=str(tmp_path), save_interval="1ep", save_filename="{epoch}.pt").fit()
    logged = {}
    for name, algorithm in (("composer", ComposerLayerFreezing(0.0)), ("ours", LayerFreezing(0.0, interval=interval))):
        logger = InMemoryLogger()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _trainer([algorithm], load_path=str(tmp_path / "2.pt"), loggers=[logger]).fit()
        logged[name] = _history(logger)[lf.LAYERS_FROZEN]
    assert logged["composer"] == [3, 5]  # int(0.75 * 5), int(1.0 * 5)
    # interval="step": after batches 9..16 of 16, int(k/16 * 5)
    assert logged["ours"] == ([3, 5] if interval == "epoch" else [2, 3, 3, 3, 4, 4, 4, 5])


# 4 epochs of 4 batches of 4 samples of 6 "tokens" each, in every unit Composer accepts
DURATIONS_ALIKE = ["4ep", "16ba", "64sp", "384tok"]


class _Tokens(TensorDataset):
    max_seq_len = 6  # Composer counts tokens per sample from this attribute


def _tokens_loader() -> DataLoader:
    loader = _loader()
    return DataLoader(_Tokens(*loader.dataset.tensors), batch_size=4, shuffle=False)


@pytest.mark.parametrize("max_duration", DURATIONS_ALIKE)
@pytest.mark.parametrize("interval, depths", [
    ("epoch", [0, 1, 3, 5]),
    # after batch k of 16: int((k/16 - 0.25) / 0.75 * 5), 0 up to k = 4
    ("step", [0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 5]),
])
def test_every_max_duration_unit(max_duration, interval, depths):
    logger = InMemoryLogger()
    model = ComposerClassifier(_net(), num_classes=2)
    Trainer(model=model, train_dataloader=_tokens_loader(), max_duration=max_duration,
            optimizers=torch.optim.SGD(model.parameters(), lr=0.05), algorithms=[LayerFreezing(0.25, interval=interval)],
            loggers=[logger], device="cpu", progress_bar=False, log_to_console=False).fit()
    assert _history(logger)[lf.LAYERS_FROZEN] == depths


def _state(epoch: int, max_epochs: int = 100):
    """A State fast-forwarded to an epoch, as Composer's own tests build one: no FIT_START, no batches."""
    from unittest.mock import Mock

    from composer.core import Precision, State, Timestamp
    from composer.devices import DeviceCPU

    model = ComposerClassifier(_net(), num_classes=2)
    state = State(model=model, rank_zero_seed=0, device=DeviceCPU(), run_name="direct",
                  optimizers=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), precision=Precision.FP32,
                  dataloader=Mock(__len__=lambda _: 100), dataloader_label="train", device_train_microbatch_size=1,
                  max_duration=f"{max_epochs}ep")
    state.timestamp = Timestamp(epoch=epoch)
    return state


@pytest.mark.parametrize("freeze_start, epoch, frozen_layers", [(0.5, 10, []), (0.05, 80, [0, 2, 4]), (0.0, 100, [0, 2, 4, 6, 8])])
def test_epoch_end_applied_directly_to_a_state(freeze_start, epoch, frozen_layers):
    """apply(EPOCH_END) on a State that never saw FIT_START attaches and freezes by its timestamp:
    epoch 80 of 100 with freeze_start 0.05 is fraction 0.75 / 0.95, int(0.789 * 5) = 3 layers."""
    from unittest.mock import Mock

    from composer.core import Event

    state, theirs = _state(epoch), _state(epoch)
    logged: list[dict] = []
    LayerFreezing(freeze_start).apply(Event.EPOCH_END, state, Mock(log_metrics=logged.append))
    ComposerLayerFreezing(freeze_start).apply(Event.EPOCH_END, theirs, Mock())
    expected = [f"module.{i}.{k}" for i in frozen_layers for k in ("bias", "weight")]
    frozen = lambda s: sorted(n for n, p in s.model.named_parameters() if not p.requires_grad)  # noqa: E731
    assert frozen(state) == frozen(theirs) == expected
    group = state.optimizers[0].param_groups[0]["params"]
    names = {id(p): n for n, p in state.model.named_parameters()}
    assert sorted(names[id(p)] for p in group) == sorted(n for n, _ in state.model.named_parameters() if n not in expected)
    assert [row[lf.LAYERS_FROZEN] for row in logged] == [len(frozen_layers)]


@pytest.mark.parametrize("interval, warned", [("epoch", True), ("step", False)])
def test_a_one_epoch_run_deciding_at_epoch_ends_is_warned(caplog, interval, warned):
    with caplog.at_level("WARNING", logger="layerfreeze"):
        _trainer([LayerFreezing(0.0, interval=interval)], max_duration="1ep").fit()
    assert ("a one-epoch run with interval='epoch' freezes only after its last step. HINT: pass interval='step'"
            in caplog.text) is warned


def test_ddp_find_unused_parameters_left_alone(monkeypatch):
    """The reducer rebuild handles DDP on this torch, so Composer need not walk the graph every step."""
    assert LayerFreezing().find_unused_parameters is False
    assert ComposerLayerFreezing().find_unused_parameters is True  # Composer's own asks for it
    monkeypatch.delattr(torch.nn.parallel.DistributedDataParallel, "_build_params_for_reducer")
    assert LayerFreezing().find_unused_parameters is True  # no rebuild: DDP must be told


def test_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Composer\n", 1)[1].split("\n## ", 1)[0]
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(re.findall(r"```python\n(.*?)```", section, re.S)[0], "README.md", "exec"), {})
    assert capsys.readouterr().out.endswith("True\n")


def test_one_algorithm_applied_to_several_states_freezes_each_by_its_own_timestamp():
    """Composer's algorithm keeps no state, so one object serves any State; ours attaches to each
    State it is applied to (it kept freezing the first State's model before)."""
    from unittest.mock import Mock

    from composer.core import Event

    algorithm = LayerFreezing(0.05)
    frozen = lambda s: sorted(n for n, p in s.model.named_parameters() if not p.requires_grad)  # noqa: E731
    layers = {80: [0, 2, 4], 100: [0, 2, 4, 6, 8], 10: []}  # int((e/100 - 0.05) / 0.95 * 5) layers
    for epoch, frozen_layers in layers.items():
        state = _state(epoch)
        algorithm.apply(Event.EPOCH_END, state, Mock())
        assert frozen(state) == [f"module.{i}.{k}" for i in frozen_layers for k in ("bias", "weight")], epoch


def test_one_algorithm_in_two_trainers_freezes_the_second_trainers_model():
    algorithm = LayerFreezing(0.25)
    first = _trainer([algorithm])
    first.fit()
    expected = [f"module.{i}.{k}" for i in (0, 2, 4, 6, 8) for k in ("bias", "weight")]
    assert _frozen(first) == expected
    logger = InMemoryLogger()
    second = _trainer([algorithm], loggers=[logger])
    second.fit()
    assert _history(logger)[lf.LAYERS_FROZEN] == [0, 1, 3, 5]  # the second run's own schedule
    assert _frozen(second) == expected
    assert _frozen(first) == []  # the first run is released
