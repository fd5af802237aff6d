"""EncoderCache: a Hugging Face encoder's frozen prefix cached inside its own forward, exactly."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

import layerfreeze as lf  # noqa: E402
from layerfreeze.encoder_cache import EncoderCache, encoder_stages  # noqa: E402
from layerfreeze.policies import FixedDepth  # noqa: E402

EXAMPLES, LENGTH, BATCH = 24, 8, 4


def tiny_bert(layers: int = 4, dropout: float = 0.1, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        num_labels=2,
    )
    return BertForSequenceClassification(config).train()


def dataset(seed: int = 1) -> dict[str, torch.Tensor]:
    # Fixed padding to LENGTH, with real padding (attention mask zeros) in most rows.
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, LENGTH + 1, (EXAMPLES,), generator=g)
    mask = (torch.arange(LENGTH) < lengths[:, None]).long()
    ids = torch.randint(1, 40, (EXAMPLES, LENGTH), generator=g) * mask
    types = torch.randint(0, 2, (EXAMPLES, LENGTH), generator=g) * mask
    labels = torch.randint(0, 2, (EXAMPLES,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}


def batches(data: dict[str, torch.Tensor], epoch: int):
    order = torch.randperm(EXAMPLES, generator=torch.Generator().manual_seed(100 + epoch))
    for index in order.split(BATCH):
        yield {name: value[index] for name, value in data.items()}


def train(model, freezing_factory, epochs: int = 3, cache: bool = False, **cache_args):
    data = dataset()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    steps_per_epoch = EXAMPLES // BATCH
    freezing = freezing_factory().attach(model, opt, total_steps=epochs * steps_per_epoch,
                                         steps_per_epoch=steps_per_epoch)
    encoder = EncoderCache(model, **cache_args) if cache else None
    torch.manual_seed(7)  # the suffix's dropout draws the same numbers in both runs
    losses = []
    for epoch in range(epochs):
        for batch in batches(data, epoch):
            model.train()  # as the Hugging Face Trainer does at every step
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            freezing.step()
            losses.append(loss.item())
    return losses, freezing, encoder


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_finds_the_stages_of_a_hugging_face_encoder():
    model = tiny_bert(layers=3)
    assert encoder_stages(model) == [model.bert.embeddings, *model.bert.encoder.layer]
    wrapped = nn.ModuleDict({"backbone": model.bert, "head": nn.Linear(16, 2)})  # a model of one's own
    assert encoder_stages(wrapped) == [model.bert.embeddings, *model.bert.encoder.layer]
    with pytest.raises(ValueError, match=r"found no embeddings module and block list in Sequential.*HINT: pass stages="):
        encoder_stages(nn.Sequential(nn.Linear(2, 2)))


def test_fixed_depth_with_cache_trains_bit_for_bit_as_without():
    # Embeddings and two of four blocks frozen after the first step; epoch 1 fills
    # the cache, epochs 2 and 3 read it. Both runs keep the frozen prefix in eval
    # mode (dropout="eval"), through a model.train() at every step.
    through = "bert.encoder.layer.1"
    runs = {}
    for cached in (False, True):
        model = tiny_bert()
        runs[cached] = (model, *train(model, lambda: lf.LayerFreezing(
            policy=FixedDepth(through=through), interval="step", unit="owner", dropout="eval"), cache=cached))
    (plain, plain_losses, _, _), (model, losses, freezing, cache) = runs[False], runs[True]
    assert cache.cut == 3 and freezing.frozen_depth == runs[False][2].frozen_depth
    # Step 1 ran unfrozen; the other 5 batches of epoch 1 are computed whole. In
    # epoch 2 the 4 examples of step 1 are computed alone, in prefix-only passes
    # of their mixed batches; every other lookup is served.
    assert (cache.misses, cache.hits, cache.advanced) == (24, 44, 0)
    assert len(cache) == 24 and cache.bytes_per_example == LENGTH * 16 * 4
    assert cache.nbytes == 24 * LENGTH * 16 * 4
    assert losses == plain_losses
    assert_same_parameters(model, plain)


def test_progressive_schedule_advances_stored_outputs_and_stays_exact():
    runs = {}
    for cached in (False, True):
        model = tiny_bert()
        runs[cached] = (model, *train(model, lambda: lf.LayerFreezing(
            freeze_start=0.0, freeze_level=0.9, interval="epoch", unit="owner", dropout="eval"), epochs=5,
            cache=cached))
    (plain, plain_losses, plain_freezing, _), (model, losses, freezing, cache) = runs[False], runs[True]
    assert freezing.frozen_depth == plain_freezing.frozen_depth
    assert cache.cut == 4  # embeddings and three blocks at the end
    assert cache.advanced > 0 and cache.hits > 0 and cache.invalidations == 0
    assert losses == plain_losses
    assert_same_parameters(model, plain)


def test_mixed_batch_computes_only_the_rows_it_lacks():
    model = tiny_bert(dropout=0.0)
    model.bert.embeddings.requires_grad_(False)
    cache = EncoderCache(model)
    data = dataset()
    first = {k: v[:4] for k, v in data.items()}
    mixed = {k: v[2:6] for k, v in data.items()}
    model(**first)
    assert (cache.misses, len(cache)) == (4, 4)
    out = model(**mixed).logits
    assert (cache.hits, cache.misses, len(cache)) == (2, 6, 6)
    model(**mixed)
    assert cache.hits == 6
    cache.remove()
    assert torch.equal(out, model(**mixed).logits)  # rows computed apart equal those of the whole batch


def test_eval_mode_and_per_layer_outputs_bypass_the_cache():
    model = tiny_bert(dropout=0.0)
    model.bert.embeddings.requires_grad_(False)
    cache = EncoderCache(model)
    batch = {k: v[:4] for k, v in dataset().items()}
    model.eval()
    model(**batch)
    assert (cache.hits, cache.misses, len(cache)) == (0, 0, 0)
    model.train()
    model(**batch, output_hidden_states=True)
    assert len(cache) == 0
    model(**batch)
    out = model(**batch, output_hidden_states=True)
    assert cache.hits == 0 and len(out.hidden_states) == 5


def test_cache_clears_when_the_cut_moves_back_or_a_frozen_weight_changes(caplog):
    model = tiny_bert(dropout=0.0)
    model.bert.embeddings.requires_grad_(False)
    model.bert.encoder.layer[0].requires_grad_(False)
    cache = EncoderCache(model)
    batch = {k: v[:4] for k, v in dataset().items()}
    model(**batch)
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight.mul_(2.0)
    with caplog.at_level(logging.INFO, logger="layerfreeze"):
        out = model(**batch).logits
    assert "EncoderCache cleared (4 entries): a frozen stage's weights changed" in caplog.text
    assert (cache.hits, cache.misses, cache.invalidations) == (0, 4, 1)
    cache.remove()
    assert torch.equal(out, model(**batch).logits)
    cache = EncoderCache(model)
    model(**batch)
    model.bert.encoder.layer[0].requires_grad_(True)
    model(**batch)
    assert cache.cut == 1 and cache.invalidations == 1 and cache.misses == 4


def test_refuses_a_prefix_with_dropout_in_training_mode_with_a_hint():
    model = tiny_bert(dropout=0.1)
    model.bert.embeddings.requires_grad_(False)
    cache = EncoderCache(model)
    batch = {k: v[:4] for k, v in dataset().items()}
    with pytest.raises(RuntimeError, match=r"not deterministic: stages\[0\]\.dropout .*HINT: .*dropout='eval'"):
        model(**batch)
    model.bert.embeddings.eval()
    model(**batch)
    assert cache.misses == 4


def test_memory_bound_spill_and_full_warning(tmp_path, caplog):
    model = tiny_bert(dropout=0.0)
    model.bert.embeddings.requires_grad_(False)
    per = LENGTH * 16 * 4
    batch = {k: v[:4] for k, v in dataset().items()}
    cache = EncoderCache(model, max_bytes=3 * per)
    with caplog.at_level(logging.INFO, logger="layerfreeze"):
        model(**batch)
    assert "EncoderCache stores 512 B per example (8 x 16 float32); max_bytes=1.5 KiB holds 3 examples" in caplog.text
    assert "EncoderCache is full (max_bytes=1.5 KiB, 512 B per example, 3 examples stored)" in caplog.text
    assert (len(cache), cache.nbytes) == (3, 3 * per)
    assert cache.summary()["capacity"] == 3
    cache.remove()
    spilled = EncoderCache(model, max_bytes=per, spill_dir=tmp_path)
    first = model(**batch).logits
    assert (len(spilled), spilled.nbytes, spilled.disk_bytes) == (4, per, 3 * per)
    assert torch.equal(model(**batch).logits, first) and spilled.hits == 4
    spilled.remove()
    assert list(tmp_path.iterdir()) == []


def test_warns_with_a_hint_when_inputs_change_shape(caplog):
    model = tiny_bert(dropout=0.0)
    model.bert.embeddings.requires_grad_(False)
    data = dataset()
    cache = EncoderCache(model)
    with caplog.at_level(logging.WARNING, logger="layerfreeze"):
        for length in (6, 7, 8):  # padding to each batch's longest example
            model(**{k: (v[:4, :length] if v.dim() == 2 else v[:4]) for k, v in data.items()})
    assert "EncoderCache sees inputs of 3 different shapes" in caplog.text
    assert "HINT: pad every example to one fixed length" in caplog.text
    assert cache.hits == 0


def test_warns_with_a_hint_when_lookups_mostly_miss(caplog):
    model = tiny_bert(dropout=0.0)
    model.bert.embeddings.requires_grad_(False)
    data = dataset()
    cache = EncoderCache(model, examples=8)
    g = torch.Generator().manual_seed(5)
    with caplog.at_level(logging.WARNING, logger="layerfreeze"):
        for step in range(4):  # randomly masked inputs: never the same bytes twice
            batch = {k: v[:4] for k, v in data.items()}
            batch["input_ids"] = torch.randint(1, 40, (4, LENGTH), generator=g)
            model(**batch)
            assert ("mostly" in caplog.text) is False
    assert "EncoderCache served 0 of 16 lookups since its cut last moved (0%), over two passes of 8 examples" \
        in caplog.text
    assert "HINT: pad to a fixed length" in caplog.text
    assert cache.misses == 16


class TupleBlock(nn.Module):
    """A block returning (hidden_states,), as transformers 4 blocks do."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, hidden_states, attention_mask=None):
        return (torch.tanh(self.linear(hidden_states)) * attention_mask[..., None],)


class TupleEncoder(nn.Module):
    def __init__(self, width: int = 6, depth: int = 3):
        super().__init__()
        self.embeddings = nn.Embedding(20, width)
        self.layers = nn.ModuleList(TupleBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, 2)

    def forward(self, input_ids, attention_mask):
        hidden = self.embeddings(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=attention_mask)[0]
        return self.head(hidden.mean(1))


def test_blocks_returning_tuples_are_served_in_their_own_form():
    torch.manual_seed(0)
    model = TupleEncoder()
    assert encoder_stages(model) == [model.embeddings, *model.layers]
    model.embeddings.requires_grad_(False)
    model.layers[:2].requires_grad_(False)
    cache = EncoderCache(model)
    ids = torch.randint(0, 20, (5, 4))
    mask = torch.ones(5, 4).tril()
    first = model(ids, mask)
    second = model(ids, attention_mask=mask)  # keyword or positional: the same key
    assert cache.cut == 3 and (cache.misses, cache.hits) == (5, 5)
    assert torch.equal(first, second)
    cache.remove()
    assert "forward" not in model.embeddings.__dict__ and torch.equal(model(ids, mask), first)


def test_explicit_stages_of_a_torch_encoder_train_exactly():
    # nn.TransformerEncoder: the stages are its layers; the embedding runs before them.
    from conftest import TinyEncoder

    runs = []
    for cached in (False, True):
        torch.manual_seed(0)
        model = TinyEncoder(depth=3)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.embed.requires_grad_(False)
        model.encoder.layers[:2].requires_grad_(False)
        cache = EncoderCache(model, stages=list(model.encoder.layers)) if cached else None
        tokens = torch.randint(0, 11, (8, 5), generator=torch.Generator().manual_seed(3))
        for epoch in range(3):
            for rows in torch.randperm(8, generator=torch.Generator().manual_seed(epoch)).split(4):
                model(tokens[rows]).pow(2).mean().backward()
                opt.step(), opt.zero_grad()
        runs.append((model, cache))
    (plain, _), (model, cache) = runs
    assert cache.cut == 2 and (cache.misses, cache.hits) == (8, 16)
    assert_same_parameters(model, plain)


def test_refuses_stages_the_model_changes_in_between():
    class Projected(TupleEncoder):
        def forward(self, input_ids, attention_mask):
            hidden = self.embeddings(input_ids) * 2.0  # something between embeddings and layers[0]
            for layer in self.layers:
                hidden = layer(hidden, attention_mask=attention_mask)[0]
            return self.head(hidden.mean(1))

    model = Projected()
    model.embeddings.requires_grad_(False)
    EncoderCache(model)
    with pytest.raises(RuntimeError, match=r"stages\[1\] \(TupleBlock\) did not receive the output of stages\[0\].*HINT"):
        model(torch.randint(0, 20, (2, 4)), torch.ones(2, 4))


def test_fill_stores_ahead_in_prefix_only_passes():
    model = tiny_bert(dropout=0.0)
    model.bert.embeddings.requires_grad_(False)
    model.bert.encoder.layer[0].requires_grad_(False)
    cache = EncoderCache(model)
    data = dataset()
    calls = []
    model.bert.encoder.layer[1].register_forward_hook(lambda *a: calls.append(1))
    cache.fill({k: v[i:i + 12] for k, v in data.items()} for i in (0, 12))
    assert (len(cache), cache.misses, calls) == (EXAMPLES, EXAMPLES, [])  # layer 1 never ran
    expected = model(**{k: v[:4] for k, v in data.items()}).logits
    assert (cache.hits, cache.misses) == (4, EXAMPLES)
    cache.remove()
    assert torch.equal(expected, model(**{k: v[:4] for k, v in data.items()}).logits)


def test_copies_of_the_model_carry_the_settings_not_the_stored_outputs():
    model = tiny_bert(dropout=0.0)
    model.bert.embeddings.requires_grad_(False)
    cache = EncoderCache(model, max_bytes=1 << 20)
    batch = {k: v[:4] for k, v in dataset().items()}
    model(**batch)
    twin = copy.deepcopy(model)
    twin_cache = twin.bert.embeddings.forward.args[0]()
    assert twin_cache is not cache and twin_cache.model is twin and len(twin_cache) == 0
    assert twin_cache.max_bytes == 1 << 20
    assert torch.equal(twin(**batch).logits, model(**batch).logits)
    assert (twin_cache.misses, cache.hits) == (4, 4)


def test_bad_arguments_name_the_argument_and_install_nothing():
    model = tiny_bert(dropout=0.0)
    with pytest.raises(TypeError, match="model must be an nn.Module, got int"):
        EncoderCache(3)
    with pytest.raises(ValueError, match=r"stages\[0\] \(Linear\) is not a submodule of the model"):
        EncoderCache(model, stages=[nn.Linear(2, 2)])
    with pytest.raises(TypeError, match=r"stages\[1\] must be an nn.Module, got str"):
        EncoderCache(model, stages=[model.bert.embeddings, "layer"])
    with pytest.raises(ValueError, match="stages must not hold the same module twice"):
        EncoderCache(model, stages=[model.bert.embeddings, model.bert.embeddings])
    with pytest.raises(ValueError, match="max_bytes must be a non-negative int, got -1"):
        EncoderCache(model, max_bytes=-1)
    with pytest.raises(ValueError, match="examples must be a positive int or None, got 0"):
        EncoderCache(model, examples=0)
    assert "forward" not in model.bert.embeddings.__dict__
    assert not model._forward_pre_hooks and not model._forward_hooks
    cache = EncoderCache(model)
    with pytest.raises(ValueError, match=r"stages\[0\] \(BertEmbeddings\) already has an instance-level forward.*HINT"):
        EncoderCache(model)
    cache.remove()
    EncoderCache(model).remove()


def _readme_blocks() -> list[str]:
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Caching a fine-tuned encoder\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_caching_example_runs(capsys):
    namespace: dict = {}
    exec(compile(_readme_blocks()[0], "README.md", "exec"), namespace)
    cache = namespace["cache"]
    # Frozen before the first step: epoch 1 computes all 64 examples, epochs 2 and 3 read them.
    assert (cache.cut, cache.misses, cache.hits, cache.advanced, len(cache)) == (4, 64, 128, 0, 64)
    assert cache.bytes_per_example == 16 * 32 * 4
    assert "'hits': 128" in capsys.readouterr().out


@pytest.mark.slow
def test_readme_trainer_caching_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    blocks = _readme_blocks()
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    exec(compile(blocks[1], "README.md", "exec"), namespace)
    callback, trainer = namespace["callback"], namespace["trainer"]
    cache = callback.cache
    # FixedDepth(start=0) freezes at the first decision, after step 1: steps 2-4 compute
    # 48 examples; in epoch 2 the 16 of step 1 are computed apart (prefix-only passes)
    # and the other 48 served; epoch 3 serves all 64.
    assert (cache.cut, cache.misses, cache.hits, len(cache)) == (4, 64, 112, 64)
    assert cache.examples == 64 and callback.freezing.dropout == "eval"
    assert not any(m.training for m in trainer.model.bert.encoder.layer[2].modules())
    assert "'hits': 112" in capsys.readouterr().out


def test_trainer_callback_cache_arguments_are_checked():
    from layerfreeze.integrations.transformers import LayerFreezingCallback

    with pytest.raises(ValueError, match=r"cache needs the frozen prefix in eval mode, got dropout='train'.*HINT"):
        LayerFreezingCallback(cache=True, dropout="train")
    with pytest.raises(ValueError, match="cache must be a bool or a dict of EncoderCache arguments, got str"):
        LayerFreezingCallback(cache="yes")
    assert LayerFreezingCallback(cache={"max_bytes": 1 << 20}).freezing.dropout == "eval"
    assert LayerFreezingCallback().freezing.dropout == "train"
