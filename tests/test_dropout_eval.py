"""LayerFreezing(dropout="eval"): the frozen prefix runs in eval mode, through model.train()."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import layerfreeze as lf


def test_dropout_eval_pins_the_frozen_prefix_through_model_train_and_unpins_on_thaw():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=3, num_attention_heads=2, intermediate_size=16))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezing = lf.LayerFreezing(dropout="eval", unit="owner").attach(model, opt, total_steps=10)
    layers = [layer.name for layer in freezing.layers]
    freezing.set_depth(layers.index("bert.encoder.layer.1.output.LayerNorm") + 1)  # embeddings + 2 blocks
    model.train()
    bert = model.bert
    for frozen in (bert.embeddings, bert.encoder.layer[0], bert.encoder.layer[1]):
        assert not any(m.training for m in frozen.modules())
    # the next block, the pooler and the classifier's dropout still train
    assert all(m.training for m in bert.encoder.layer[2].modules())
    assert model.dropout.training and bert.pooler.training
    batch = torch.randint(1, 30, (2, 5))
    with torch.no_grad():
        prefix = [bert.encoder.layer[1](bert.encoder.layer[0](bert.embeddings(batch))) for _ in range(2)]
    assert torch.equal(prefix[0], prefix[1])  # no dropout in the frozen prefix
    freezing.set_depth(layers.index("bert.embeddings.LayerNorm") + 1)  # back to the embeddings alone
    model.train()
    assert not any(m.training for m in bert.embeddings.modules())
    assert all(m.training for m in bert.encoder.layer[0].modules())
    freezing.detach()
    model.train()
    assert all(m.training for m in model.modules())
    assert "train" not in bert.embeddings.__dict__


def test_dropout_eval_pins_parameterless_dropout_between_frozen_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezing = lf.LayerFreezing(dropout="eval").attach(model, opt, total_steps=10)
    freezing.set_depth(1)
    model.train()
    assert [m.training for m in model] == [False, False, True, True, True]
    freezing.set_depth(2)
    model.train()
    assert [m.training for m in model] == [False, False, False, False, True]
    with pytest.raises(ValueError, match="dropout must be one of 'train', 'eval', got 'off'"):
        lf.LayerFreezing(dropout="off")
