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
