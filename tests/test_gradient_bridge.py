"""Frozen layers before reentrant activation checkpointing: trainable layers still learn."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import layerfreeze as lf


class Checkpointed(nn.Module):
    """stem -> two checkpointed blocks -> head, as HF encoders with gradient checkpointing."""

    def __init__(self, reentrant: bool = True, inplace: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.reentrant = reentrant
        self.stem = nn.Linear(6, 8)
        self.act = nn.ReLU(inplace=inplace)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)) for _ in range(2))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.act(self.stem(x))
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=self.reentrant) if self.training else block(x)
        return self.head(x)


X = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))


def _backward(model):
    model.zero_grad(set_to_none=True)
    model(X).pow(2).mean().backward()
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def test_the_problem_exists_without_the_bridge():
    """Composer-style freezing (no hooks) leaves reentrant-checkpointed layers without gradients."""
    model = Checkpointed()
    lf.freeze_layers(model, torch.optim.SGD(model.parameters(), lr=0.1), current_duration=1.0,
                     freeze_start=0.0, freeze_level=0.2)  # 6 layers: int(0.2 * 5) = 1, the stem
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
        grads = _backward(model)
    assert grads["blocks.0.0.weight"] is None and grads["blocks.1.2.weight"] is None
    assert grads["head.weight"] is not None


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_checkpointed_trainable_layers_get_the_same_gradients_as_without_checkpointing(depth):
    model, reference = Checkpointed(), Checkpointed(reentrant=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezing = lf.LayerFreezing(freeze_start=0.0, interval="step").attach(model, opt, total_steps=10)
    _backward(model)  # the first training forward detects reentrant checkpointing
    freezing.set_depth(depth)
    ref_freezing = lf.LayerFreezing(freeze_start=0.0, interval="step")
    ref_freezing.attach(reference, torch.optim.SGD(reference.parameters(), lr=0.1), total_steps=10)
    ref_freezing.set_depth(depth)
    grads, expected = _backward(model), _backward(reference)
    frozen = set(freezing.frozen_parameters)
    for name, grad in grads.items():
        if name in frozen:
            assert grad is None, name
        else:
            assert grad is not None and torch.allclose(grad, expected[name], rtol=0, atol=1e-7), name
    # and they learn: one optimizer step moves every trainable parameter, no frozen one
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == (name in frozen), name


def test_frozen_before_the_first_forward_as_after_a_resume():
    model = Checkpointed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezing = lf.LayerFreezing(freeze_start=0.0).attach(model, opt, total_steps=10)
    freezing.set_depth(1)
    first, second = _backward(model), _backward(model)
    for grads in (first, second):
        assert all(grads[n] is not None for n in grads if not n.startswith("stem."))
    assert all(torch.equal(first[n], second[n]) for n in first if first[n] is not None)


def test_inplace_op_after_the_bridged_layer_is_allowed():
    model = Checkpointed(inplace=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezing = lf.LayerFreezing(freeze_start=0.0).attach(model, opt, total_steps=10)
    _backward(model)
    freezing.set_depth(1)
    assert _backward(model)["blocks.0.0.weight"] is not None


def test_no_bridge_without_reentrant_checkpointing():
    """Without reentrant checkpointing nothing changes: the first trainable layer's input
    does not require grad, so backward stops at it as plain freezing intends."""
    model = Checkpointed(reentrant=False)
    seen = []
    model.blocks[0][0].register_forward_pre_hook(lambda m, args: seen.append(args[0].requires_grad))
    freezing = lf.LayerFreezing(freeze_start=0.0).attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                          total_steps=10)
    _backward(model)
    assert seen and all(seen)
    seen.clear()
    freezing.set_depth(1)
    _backward(model)
    assert seen and not any(seen)


def test_detach_removes_every_hook():
    model = Checkpointed()
    freezing = lf.LayerFreezing(freeze_start=0.0).attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                          total_steps=10)
    _backward(model)
    freezing.set_depth(2)
    freezing.detach()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_hugging_face_reentrant_gradient_checkpointing():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=8, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    model.train()
    # transformers < 5 default: reentrant, and no input hook; reproduce it explicitly
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.disable_input_require_grads()
    plain = copy.deepcopy(model)
    batch = {"input_ids": torch.randint(1, 30, (4, 8), generator=torch.Generator().manual_seed(2)),
             "labels": torch.tensor([0, 1, 0, 1])}

    def grads(m):
        m.zero_grad(set_to_none=True)
        m(**batch).loss.backward()
        return {n: p.grad for n, p in m.named_parameters() if "encoder.layer" in n}

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    freezing = lf.LayerFreezing(freeze_start=0.0).attach(model, opt, total_steps=10)
    grads(model)
    freezing.set_depth(4)  # the embeddings: word, position, token type, LayerNorm
    assert all(g is not None for g in grads(model).values())
    lf.freeze_layers(plain, torch.optim.AdamW(plain.parameters()), 1.0, freeze_start=0.0, freeze_level=4 / 21)
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
        plain_grads = grads(plain)
    assert all(g is None for g in plain_grads.values())  # the silent failure of transformers #21381


def test_models_without_checkpointing_get_no_hooks():
    """No probe hooks where no checkpointing is possible, so torch.compile traces a hook-free model."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    freezing = lf.LayerFreezing(freeze_start=0.0).attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                          total_steps=10)
    freezing.set_depth(1)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
