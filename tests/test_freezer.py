import copy
import pickle

import pytest
import torch
from torch import nn

from layerfreeze.freezer import Freezer, freeze_parameters
from layerfreeze.layers import definition_order

from conftest import ConvBN, Tied, batch_for, mlp, train_step

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, foreach=True),
}


def make(model=None, optimizer="sgd", **kwargs):
    model = model or ConvBN()
    opt = OPTIMIZERS[optimizer](model.parameters())
    return model, opt, Freezer(model, [opt], definition_order(model), **kwargs)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_frozen_weights_stay_bit_identical(optimizer):
    torch.manual_seed(0)
    model, opt, freezer = make(optimizer=optimizer)
    for _ in range(3):  # build momentum / moments first
        train_step(model, [opt], batch_for(model))
    freezer.apply(3)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n in freezer.frozen_names}
    assert sorted(frozen) == ["features.0.bias", "features.0.weight", "features.1.bias",
                              "features.1.weight", "features.3.bias", "features.3.weight"]
    for _ in range(5):
        train_step(model, [opt], batch_for(model))
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
            assert p.grad is None and not p.requires_grad
    assert model.head.weight.grad is None  # zero_grad ran; head still trains
    opt.state_dict()


def test_freeze_is_complete():
    model, opt, freezer = make()
    train_step(model, [opt], batch_for(model))
    model(batch_for(model)).sum().backward()  # leave grads around
    freezer.apply(2)
    first = [model.features[0].weight, model.features[0].bias, model.features[1].weight, model.features[1].bias]
    ids = {id(p) for p in first}
    assert all(not p.requires_grad and p.grad is None for p in first)
    assert not any(id(p) in ids for g in opt.param_groups for p in g["params"])
    assert not any(id(p) in ids for p in opt.state)
    assert len(opt.state_dict()["state"]) == 6


def test_unfreeze_restores_original_group_order_and_fresh_state():
    model = mlp(depth=4)
    params = list(model.parameters())
    opt = torch.optim.SGD([{"params": params[0::2]}, {"params": params[1::2], "lr": 0.5}], lr=0.1, momentum=0.9)
    original = [list(g["params"]) for g in opt.param_groups]
    freezer = Freezer(model, [opt], definition_order(model))
    train_step(model, [opt], torch.randn(3, 6))
    freezer.apply(3)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]
    assert freezer.apply(1)
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [
        [id(p) for p in original[0] if p is not model[0].weight],
        [id(p) for p in original[1] if p is not model[0].bias],
    ]
    assert model[2].weight.requires_grad and model[2].weight not in opt.state
    freezer.apply(0)
    assert [list(g["params"]) for g in opt.param_groups] == original
    assert all(p.requires_grad for p in model.parameters())


def test_unfreeze_keeps_parameters_added_later():
    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = Freezer(model, [opt], definition_order(model))
    extra = nn.Parameter(torch.zeros(2))
    opt.param_groups[0]["params"].append(extra)
    freezer.apply(2)
    freezer.apply(0)
    assert opt.param_groups[0]["params"][-1] is extra
    assert len(opt.param_groups[0]["params"]) == 7


def test_parameters_frozen_by_the_user_stay_frozen_after_unfreeze():
    model = mlp(depth=3)
    model[0].bias.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = Freezer(model, [opt], definition_order(model))
    freezer.apply(1)
    assert not any(p is model[0].bias for p in opt.param_groups[0]["params"])
    freezer.apply(0)
    assert model[0].weight.requires_grad and not model[0].bias.requires_grad
    assert any(p is model[0].bias for p in opt.param_groups[0]["params"])  # back where the user had it


def test_parameters_in_no_optimizer_freeze_by_requires_grad_only():
    model = mlp(depth=3)
    opt = torch.optim.SGD(list(model.parameters())[2:], lr=0.1)  # first layer in no optimizer
    freezer = Freezer(model, [opt], definition_order(model))
    freezer.apply(2)
    assert not model[0].weight.requires_grad and not model[2].weight.requires_grad
    freezer.apply(0)
    assert model[0].weight.requires_grad
    assert len(opt.param_groups[0]["params"]) == 4


def test_tied_parameter_rules():
    model = Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = Freezer(model, [opt], definition_order(model))  # shared="freeze": Composer
    freezer.apply(1)
    assert not model.out.weight.requires_grad  # frozen with the embedding that holds it
    freezer.apply(0)

    model = Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = Freezer(model, [opt], definition_order(model), shared="trainable")
    freezer.apply(2)
    assert model.embed.weight.requires_grad  # still used by the trainable head
    assert freezer.frozen_names == {"mid.weight", "mid.bias"}


def test_batchnorm_eval_survives_model_train_and_is_undone():
    model, opt, freezer = make(batchnorm="eval")
    freezer.apply(4)
    model.train()
    bn = model.features[1]
    assert not bn.training and not model.features[4].training and model.head.training
    stats = bn.running_mean.clone()
    train_step(model, [opt], batch_for(model))
    assert torch.equal(bn.running_mean, stats)
    copy.deepcopy(model)  # still copyable
    pickle.loads(pickle.dumps(model))  # and picklable
    freezer.apply(0)
    model.train()
    assert bn.training


def test_batchnorm_train_mode_keeps_updating_statistics_like_composer():
    model, opt, freezer = make()
    freezer.apply(4)
    stats = model.features[1].running_mean.clone()
    train_step(model, [opt], batch_for(model))
    assert not torch.equal(model.features[1].running_mean, stats)


def test_optimizers_step_with_empty_groups():
    model = mlp(depth=3)
    opt = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2:].parameters()}])
    freezer = Freezer(model, [opt], definition_order(model))
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    freezer.apply(1)
    assert opt.param_groups[0]["params"] == []
    train_step(model, [opt], torch.randn(2, 6))
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.0001, 0.0001]


def test_bad_depth_is_refused():
    model, opt, freezer = make()
    with pytest.raises(ValueError, match=r"depth must be in \[0, 4\], got 5"):
        freezer.apply(5)


def test_freeze_parameters_is_idempotent():
    model = mlp(depth=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freeze_parameters(list(model[0].parameters()), [opt])
    freeze_parameters(list(model[0].parameters()), [opt])
    assert len(opt.param_groups[0]["params"]) == 4


def test_last_layer_tied_to_a_frozen_embedding_stays_trainable(caplog):
    class TiedHead(nn.Module):  # GPT-style: the head's only weight is the embedding's
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(7, 4)
            self.block = nn.Linear(4, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.wte.weight

    model = TiedHead()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = Freezer(model, [opt], definition_order(model))
    freezer.apply(1)
    assert not model.wte.weight.requires_grad  # Composer's rule while something else trains
    with caplog.at_level("WARNING", logger="layerfreeze"):
        freezer.apply(2)
    assert model.wte.weight.requires_grad and freezer.frozen_names == {"block.weight", "block.bias"}
    assert "shares all its parameters with frozen layers" in caplog.text


# -- frozen batch-first attention keeps the kernels it ran while trainable ---------------
def _op_counts(module: nn.Module, *args, **kwargs) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = module(*args, **kwargs)
    return out, {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}


def _spy_on_attention(monkeypatch) -> list:
    """Record the arguments nn.MultiheadAttention's own forward receives."""
    seen = []
    original = nn.MultiheadAttention.forward

    def spy(self, *args, **kwargs):
        seen.append((args, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.MultiheadAttention, "forward", spy)
    return seen


@pytest.mark.parametrize("batch, bias, seed", [(2, True, 1), (1, False, 0), (3, False, 2)])
def test_frozen_batch_first_attention_computes_what_it_computed_trainable(batch, bias, seed, monkeypatch):
    # Frozen, torch.matmul would no longer fold MHA's transposed input into one
    # matrix product (it does so only for weights that require grad): one small
    # product per sequence position instead (aten.bmm), up to 1.3x slower on a
    # CPU, and on these shapes not bit-equal to the trainable layer's output.
    # Batch 1 without bias is the case where is_contiguous() misleads.
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, bias=bias, batch_first=True)
    x = torch.randn(batch, 10 + 40 * (batch == 1), 64)
    trainable_out, trainable_ops = _op_counts(layer, x)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    freezer = Freezer(layer, [opt], definition_order(layer, "owner"))
    freezer.apply(len(freezer.layers) - 1)
    assert not layer.self_attn.in_proj_weight.requires_grad
    frozen_out, frozen_ops = _op_counts(layer, x)
    assert "aten.bmm" not in frozen_ops
    assert sum(frozen_ops.values()) == sum(trainable_ops.values())
    assert torch.equal(frozen_out, trainable_out)
    # The values the attention sees are the caller's, laid out differently in memory only.
    seen = _spy_on_attention(monkeypatch)
    layer(x)
    query = seen[0][0][0]
    assert torch.equal(query, layer.norm1(x) if layer.norm_first else x) and query.shape == x.shape

    freezer.apply(0)  # thawed: the module's own forward again
    assert "forward" not in layer.self_attn.__dict__


@pytest.mark.parametrize("call", ["positional", "keywords", "cross"])
def test_frozen_attention_layout_keeps_identity_and_keyword_calls(call, monkeypatch):
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 2, batch_first=True)
    opt = torch.optim.SGD(attn.parameters(), lr=0.1)
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    calls = {
        "positional": lambda: attn(q, q, q, need_weights=False),
        "keywords": lambda: attn(query=q, key=q, value=q, need_weights=False),
        "cross": lambda: attn(q, kv, kv, need_weights=False),
    }
    expected = calls[call]()[0]
    freezer = Freezer(attn, [opt], definition_order(attn, "owner"))
    freezer.apply_names({"in_proj_weight", "in_proj_bias"}, 1)
    seen = _spy_on_attention(monkeypatch)
    out = calls[call]()[0]
    assert torch.equal(out, expected)
    args, kwargs = seen[0]
    query, key, value = (args + tuple(kwargs[k] for k in ("query", "key", "value") if k in kwargs))[:3]
    assert key is value and (query is key) == (call != "cross")  # self-attention stays recognisable
    assert query is not q  # relaid, since batch 2 > 1
    attn.eval()  # eval passes the caller's tensors through: PyTorch's inference fast path decides
    seen.clear()
    attn(q, q, q)
    assert seen[0][0][0] is q
    freezer.release()
    assert "forward" not in attn.__dict__


def test_frozen_attention_keeps_the_fused_inference_path_and_pickles():
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2,
                                    enable_nested_tensor=False)
    freezer = Freezer(encoder, [], definition_order(encoder, "owner"))
    freezer.apply(len(freezer.layers) - 1)
    assert all("forward" in m.__dict__ for m in encoder.modules() if isinstance(m, nn.MultiheadAttention))
    encoder.eval()
    x = torch.randn(2, 7, 16)
    with torch.no_grad(), torch.profiler.profile() as prof:
        expected = encoder(x)
    assert any("_transformer_encoder_layer_fwd" in event.name for event in prof.events())
    for clone in (pickle.loads(pickle.dumps(encoder)), copy.deepcopy(encoder)):
        with torch.no_grad():
            assert torch.equal(clone(x), expected)


def test_a_copy_of_a_pinned_model_trains_normally_until_a_freezer_pins_it_again():
    model, opt, freezer = make(batchnorm="eval")
    freezer.apply(2)  # features.1 (BatchNorm) frozen and pinned
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        bn = clone.features[1]
        clone.train()
        assert bn.training  # the pin stayed with the model its freezer controls
        other = Freezer(clone, [torch.optim.SGD(clone.parameters(), lr=0.1)], definition_order(clone),
                        batchnorm="eval")
        other.apply(2)
        clone.train()
        assert not bn.training
        other.apply(0)
        clone.train()
        assert bn.training
    model.train()
    assert not model.features[1].training


def test_a_group_added_after_construction_gets_its_parameters_back_on_unfreeze():
    model = mlp(depth=3)
    opt = torch.optim.SGD(model[2:].parameters(), lr=0.1)
    freezer = Freezer(model, [opt], definition_order(model))
    opt.add_param_group({"params": list(model[0].parameters()), "lr": 0.01})  # after construction
    freezer.apply(1)
    assert [len(g["params"]) for g in opt.param_groups] == [4, 0]
    freezer.apply(0)
    assert opt.param_groups[1]["params"] == [model[0].weight, model[0].bias]
    assert opt.param_groups[1]["lr"] == 0.01
