"""Convergence: linear CKA on a probe batch, and a probe pass that changes nothing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import layerfreeze as lf
from layerfreeze.policies import Convergence
from layerfreeze.policies.convergence import centered_gram, linear_cka

from conftest import ConvBN, TinyEncoder, batch_for, mlp


def reference_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    # Kornblith et al. 2019, eq. for linear CKA in feature space:
    # ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on column-centred X, Y.
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(3, 20), d1=st.integers(1, 12), d2=st.integers(1, 12))
def test_linear_cka_matches_the_feature_space_formula(seed, n, d1, d2):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d1, generator=gen), torch.randn(n, d2, generator=gen)
    value = linear_cka(centered_gram(x, 64), centered_gram(y, 64))
    assert value == pytest.approx(reference_cka(x, y), rel=1e-9, abs=1e-12)
    assert 0.0 <= value <= 1.0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.01, 100.0), shift=st.floats(-10, 10))
def test_linear_cka_ignores_rotation_isotropic_scale_and_shift(seed, scale, shift):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(10, 5, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    value = linear_cka(centered_gram(x, 64), centered_gram(scale * x @ q + shift, 64))
    assert value == pytest.approx(1.0, abs=1e-9)


def test_identical_outputs_are_exactly_similar():
    x = torch.randn(6, 4)
    assert linear_cka(centered_gram(x, 64), centered_gram(x.clone(), 64)) == 1.0
    assert linear_cka(centered_gram(torch.ones(6, 4), 64), centered_gram(torch.ones(6, 4), 64)) == 1.0


def test_gram_keeps_at_most_max_samples_rows():
    assert centered_gram(torch.randn(100, 3), 16).shape == (16, 16)
    assert centered_gram(torch.randn(5, 2, 3, 3), 16).shape == (5, 5)


def attach(model, policy, total=20):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    freezing = lf.LayerFreezing(policy=policy, interval="step").attach(model, opt, total_steps=total)
    return opt, freezing


def test_probe_pass_changes_no_buffer_rng_mode_or_gradient():
    torch.manual_seed(0)
    model = ConvBN()
    model.train()
    opt, freezing = attach(model, Convergence(every=1, threshold=0.9999))
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        model(batch_for(model, 4, gen)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        buffers = [b.clone() for b in model.buffers()]
        rng = torch.get_rng_state()
        modes = [m.training for m in model.modules()]
        freezing.step()  # runs the probe forward (every=1)
        assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
        assert torch.equal(rng, torch.get_rng_state())
        assert modes == [m.training for m in model.modules()]
        assert all(p.grad is None for p in model.parameters())
    assert len(freezing.policy.similarity) > 0  # the probe did run and compare


def test_probe_defaults_to_the_first_batch_seen_cut_to_max_samples():
    torch.manual_seed(0)
    model = mlp(3, 6)
    opt, freezing = attach(model, Convergence(every=2, max_samples=5))
    first = torch.randn(8, 6)
    model(first).sum().backward()
    opt.step()
    opt.zero_grad()
    freezing.step()
    model(torch.randn(8, 6)).sum().backward()
    args, kwargs = freezing.state_dict()["policy"]["probe"]
    assert torch.equal(args[0], first[:5]) and kwargs == {}


def test_given_probe_is_used_and_kwargs_work():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, *, x):
            return self.b(torch.tanh(self.a(x)))

    probe = {"x": torch.randn(10, 3)}
    opt, freezing = attach(Keyword(), Convergence(every=1, probe=probe, max_samples=4))
    args, kwargs = freezing.state_dict()["policy"]["probe"]
    assert args == () and torch.equal(kwargs["x"], probe["x"][:4])


def test_unchanged_model_freezes_all_it_can_after_two_probes():
    torch.manual_seed(0)
    model = TinyEncoder()  # MultiheadAttention never calls out_proj: unmeasured, not blocking
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    tokens = batch_for(model, 4)
    freezing = lf.LayerFreezing(policy=Convergence(every=2, probe=tokens), interval="step")
    freezing.attach(model, opt, total_steps=8)
    depths = []
    for _ in range(4):
        model(tokens).sum().backward()
        opt.step()
        opt.zero_grad()
        freezing.step()
        depths.append(freezing.frozen_depth)
    assert depths == [0, 0, 0, len(freezing.layers) - 1]


def test_patience_waits_for_consecutive_converged_checks():
    def depths(patience):
        torch.manual_seed(0)
        model = mlp(3, 6)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        policy = Convergence(every=1, probe=torch.randn(6, 6), patience=patience)
        freezing = lf.LayerFreezing(policy=policy, interval="step").attach(model, opt, total_steps=6)
        out = []
        for _ in range(5):
            model(torch.randn(6, 6)).sum().backward()
            opt.step()
            opt.zero_grad()
            freezing.step()
            out.append(freezing.frozen_depth)
        return out

    assert depths(1) == [0, 2, 2, 2, 2]
    assert depths(3) == [0, 0, 0, 2, 2]


def test_similarity_below_threshold_blocks_the_layers_after_it():
    torch.manual_seed(0)
    model = mlp(4, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    policy = Convergence(every=1, probe=torch.randn(8, 6))
    freezing = lf.LayerFreezing(policy=policy, interval="step").attach(model, opt, total_steps=6)
    model(torch.randn(8, 6)).sum().backward()
    opt.step()
    opt.zero_grad()
    freezing.step()  # reference probe
    with torch.no_grad():  # the second layer's output changes shape of its representation
        model[2].weight.copy_(torch.randn(6, 6))
    freezing.step()
    assert policy.similarity["0"] == 1.0 and policy.similarity["2"] < 0.99
    assert freezing.frozen_depth == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"metric": "svcca"}, r"metric must be one of 'cka', got 'svcca'"),
        ({"threshold": 0.0}, r"threshold must be in \(0, 1\], got 0.0"),
        ({"threshold": 1.2}, r"threshold must be in \(0, 1\], got 1.2"),
        ({"every": 0}, r"every must be a positive int, got 0"),
        ({"max_samples": -3}, r"max_samples must be a positive int, got -3"),
        ({"patience": 0}, r"patience must be a positive int, got 0"),
        ({"probe": "text"}, r"probe must be a tensor, a tuple or a dict holding tensors, or None; got str"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Convergence(**kwargs)


def test_a_probe_the_model_cannot_run_is_refused_at_attach_and_changes_nothing():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = [list(g["params"]) for g in opt.param_groups]
    freezing = lf.LayerFreezing(policy=Convergence(every=1, probe=torch.randn(4, 7)), order="execution")  # 6 in
    with pytest.raises(ValueError, match=r"cannot run on the given probe \(RuntimeError: .*HINT: pass probe="):
        freezing.attach(model, opt, total_steps=10)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert [list(g["params"]) for g in opt.param_groups] == groups
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    freezing.detach()  # harmless after a refused attach
    # The same model and optimizer then attach with a probe of the right shape.
    freezing = lf.LayerFreezing(policy=Convergence(every=1, probe=torch.randn(4, 6)))
    freezing.attach(model, opt, total_steps=10)
    assert freezing.state_dict()["policy"]["probe"] is not None


def test_checking_a_given_probe_does_not_fix_the_execution_order():
    # The order comes from the first *training* forward pass; the probe check at
    # attach runs in eval mode and must not be taken for it.
    class Aux(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.aux, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            x = self.a(x)
            if self.training:  # a branch that runs in training only
                x = x + self.aux(x)
            return self.head(self.b(x))

    orders = []
    for probe in (None, torch.randn(4, 4)):
        torch.manual_seed(0)
        model = Aux()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        freezing = lf.LayerFreezing(policy=Convergence(every=2, probe=probe), order="execution", interval="step")
        freezing.attach(model, opt, total_steps=4)
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        freezing.step()
        orders.append([layer.name for layer in freezing.layers])
    assert orders[0] == orders[1] == ["a", "aux", "b", "head"]
