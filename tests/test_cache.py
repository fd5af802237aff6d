"""PrefixCache: exact reuse of frozen-prefix outputs, invalidation, bounds, spilling, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import layerfreeze as lf
from layerfreeze.cache import PrefixCache, nondeterministic_modules


def stages_model(width: int = 6) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Linear(5, width), nn.Tanh()),
        nn.Sequential(nn.Linear(width, width), nn.Tanh()),
        nn.Sequential(nn.Linear(width, width), nn.Tanh()),
        nn.Linear(width, 2),
    )


def data(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g), torch.arange(n)


def freeze_stages(model: nn.Sequential, count: int) -> lf.LayerFreezing:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezing = lf.LayerFreezing().attach(model, opt, total_steps=100)
    freezing.set_depth(count)  # each stage holds one Linear layer
    return freezing


def test_cached_outputs_equal_recomputed_bit_for_bit():
    model = stages_model()
    freeze_stages(model, 2)
    cache = PrefixCache(model)
    x, keys = data()
    assert cache.cut == 2
    first = cache(x, keys)
    assert (cache.hits, cache.misses) == (0, 8)
    second = cache(x, keys)
    assert (cache.hits, cache.misses) == (8, 8)
    assert torch.equal(first, second)
    assert torch.equal(first, model(x))
    with torch.no_grad():
        assert torch.equal(cache.prefix(x, keys), model[1](model[0](x)))


def test_mixed_batch_returns_rows_as_first_computed():
    model = stages_model()
    freeze_stages(model, 1)
    cache = PrefixCache(model)
    x, keys = data()
    seen = cache.prefix(x[:4], keys[:4]).clone()
    mixed = cache.prefix(x[2:6], keys[2:6])
    assert torch.equal(mixed[:2], seen[2:4])
    with torch.no_grad():
        assert torch.equal(mixed[2:], model[0](x[4:6]))
    assert (cache.hits, cache.misses) == (2, 6)


def test_gradients_reach_only_the_suffix_and_train_as_without_cache():
    model = stages_model()
    twin = copy.deepcopy(model)
    freeze_stages(model, 2)
    twin_freezing = freeze_stages(twin, 2)
    cache = PrefixCache(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    twin_opt = twin_freezing._freezer.optimizers[0]
    x, keys = data()
    for _ in range(3):  # epoch 1 fills the cache, epochs 2 and 3 read it
        for batch in (slice(0, 4), slice(4, 8)):
            cache(x[batch], keys[batch]).pow(2).mean().backward()
            opt.step(), opt.zero_grad()
            twin(x[batch]).pow(2).mean().backward()
            twin_opt.step(), twin_opt.zero_grad()
    assert cache.hits == 16
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name


def test_cache_follows_the_frozen_depth_advances_when_deeper_clears_when_back():
    model = stages_model()
    freezing = freeze_stages(model, 1)
    cache = PrefixCache(model)
    x, keys = data()
    cache(x, keys)
    assert (cache.cut, len(cache)) == (1, 8)
    freezing.set_depth(3)  # the cut moves deeper: stages 1 and 2 are frozen now
    out = cache(x, keys)
    assert cache.cut == 3 and (cache.hits, cache.misses, cache.advanced) == (0, 8, 8)
    assert torch.equal(out, model(x))
    with torch.no_grad():
        assert torch.equal(cache.prefix(x, keys), model[:3](x))
    assert cache.hits == 8 and cache.advanced == 8
    freezing.set_depth(2)  # the cut moves back: stage-2 outputs are useless now
    cache(x, keys)
    assert cache.cut == 2 and (cache.hits, cache.misses, cache.advanced) == (0, 8, 0)
    freezing.set_depth(0)  # unfrozen: nothing is cached and the model runs whole
    assert cache.cut == 0
    out = cache(x, keys)
    assert torch.equal(out, model(x))
    freezing.set_depth(1)
    cache(x, keys)
    assert cache.hits == 0 and cache.misses == 8


def test_cache_clears_when_a_frozen_weight_is_changed_in_place():
    model = stages_model()
    freeze_stages(model, 1)
    cache = PrefixCache(model)
    x, keys = data()
    cache(x, keys)
    with torch.no_grad():
        model[0][0].weight.mul_(2.0)
    out = cache(x, keys)
    assert cache.hits == 0
    assert torch.equal(out, model(x))


def test_memory_bound_is_respected_and_overflow_is_recomputed():
    model = stages_model()
    freeze_stages(model, 1)
    row_bytes = 6 * 4
    cache = PrefixCache(model, max_bytes=3 * row_bytes)
    x, keys = data()
    first = cache(x, keys)
    assert cache.nbytes == 3 * row_bytes <= cache.max_bytes
    assert len(cache) == 3 and cache.disk_bytes == 0
    second = cache(x, keys)
    assert (cache.hits, cache.misses) == (3, 13)
    assert torch.allclose(first, second)


def test_spill_to_disk_round_trips_exactly_and_close_removes_the_file(tmp_path):
    model = stages_model()
    freeze_stages(model, 2)
    cache = PrefixCache(model, max_bytes=2 * 6 * 4, spill_dir=tmp_path)
    x, keys = data()
    with torch.no_grad():
        expected = model[1](model[0](x))
    cache(x, keys)
    assert cache.nbytes == 2 * 6 * 4 and cache.disk_bytes == 6 * 6 * 4
    assert len(list(tmp_path.iterdir())) == 1
    again = cache.prefix(x, keys)
    assert cache.hits == 8
    assert torch.equal(again, expected)
    cache.close()
    assert list(tmp_path.iterdir()) == []


def test_spill_keeps_dtype_and_shape(tmp_path):
    prefix = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (2, 3))).to(torch.bfloat16).requires_grad_(False)
    cache = PrefixCache([prefix, nn.Flatten()], max_bytes=0, spill_dir=tmp_path)
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    first = cache.prefix(x, ["a", "b", "c"])
    second = cache.prefix(x, ["a", "b", "c"])
    assert second.dtype == torch.bfloat16 and second.shape == (3, 2, 3)
    assert torch.equal(first, second) and cache.hits == 3
    cache.close()


@pytest.mark.parametrize("make", [lambda: nn.Dropout(0.1), lambda: nn.BatchNorm1d(6)], ids=["dropout", "batchnorm"])
def test_refuses_nondeterministic_prefix_unless_allowed(make):
    prefix = nn.Sequential(nn.Linear(5, 6), make()).requires_grad_(False)
    model = nn.Sequential(prefix, nn.Linear(6, 2))
    x, keys = data()
    with pytest.raises(RuntimeError, match=r"not deterministic: stages\[0\]\.1 .*HINT: .*LayerFreezing\(dropout='eval'"):
        PrefixCache(model)(x, keys)
    PrefixCache(model, allow_nondeterministic=True)(x, keys)
    prefix.eval()
    cache = PrefixCache(model)
    cache(x, keys)
    assert cache.cut == 1


def test_batchnorm_pinned_by_layer_freezing_is_accepted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)), nn.Linear(6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezing = lf.LayerFreezing(batchnorm="eval").attach(model, opt, total_steps=10)
    freezing.set_depth(2)
    model.train()
    cache = PrefixCache(model)
    x, keys = data()
    assert torch.equal(cache(x, keys), model(x))


def test_nondeterministic_modules_lists_by_mode():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Dropout(0.0), nn.BatchNorm1d(2), nn.InstanceNorm1d(2))
    assert nondeterministic_modules(net) == ["1", "3"]
    assert nondeterministic_modules(net.eval()) == []


def test_tuple_inputs_reach_the_first_stage():
    class Add(nn.Module):
        def forward(self, a, b):
            return a + b

    cache = PrefixCache([Add(), nn.Linear(3, 1)])
    a, b = torch.ones(2, 3), torch.ones(2, 3)
    assert cache.cut == 1
    assert torch.equal(cache.prefix((a, b), [0, 1]), a + b)


def test_bad_arguments_name_the_argument():
    with pytest.raises(TypeError, match="stages must be an nn.Sequential or a sequence of nn.Modules, got a Linear"):
        PrefixCache(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="stages must hold at least 2 modules"):
        PrefixCache([nn.Linear(2, 2)])
    with pytest.raises(TypeError, match=r"stages\[1\] must be an nn.Module, got function"):
        PrefixCache([nn.Linear(2, 2), lambda h: h])
    with pytest.raises(ValueError, match="max_bytes must be a non-negative int, got -1"):
        PrefixCache(stages_model(), max_bytes=-1)
    model = stages_model()
    freeze_stages(model, 1)
    x, _ = data()
    with pytest.raises(ValueError, match="keys must hold one key per example: got 3 keys for a batch of 8"):
        PrefixCache(model)(x, [0, 1, 2])
    with pytest.raises(ValueError, match=r"cut must be an int in \[0, 1\] \(the frozen stages\), got 2"):
        PrefixCache(model).prefix(x, range(8), cut=2)


def test_progressive_schedule_with_cache_trains_exactly_as_without():
    # Composer's linear schedule moves the cut deeper during training; cached outputs are
    # carried forward through newly frozen stages and the run stays bit-identical.
    model, twin = stages_model(), stages_model()
    runs = []
    for net in (model, twin):
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        freezing = lf.LayerFreezing(freeze_start=0.0, freeze_level=1.0, interval="epoch")
        runs.append((net, opt, freezing.attach(net, opt, total_steps=10, steps_per_epoch=2)))
    cache = PrefixCache(model)
    x, keys = data()
    for _ in range(5):
        for batch in (slice(0, 4), slice(4, 8)):
            for net, opt, freezing in runs:
                out = cache(x[batch], keys[batch]) if net is model else net(x[batch])
                out.pow(2).mean().backward()
                opt.step(), opt.zero_grad(), freezing.step()
    assert runs[0][2].frozen_depth == runs[1][2].frozen_depth == 3
    assert cache.advanced > 0 and cache.hits > 0
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name


def test_spilled_entries_advance_to_a_deeper_cut(tmp_path):
    model = stages_model()
    freezing = freeze_stages(model, 1)
    cache = PrefixCache(model, max_bytes=3 * 6 * 4, spill_dir=tmp_path)
    x, keys = data()
    cache(x, keys)
    assert len(cache) == 8 and cache.disk_bytes == 5 * 6 * 4
    freezing.set_depth(2)
    with torch.no_grad():
        assert torch.equal(cache.prefix(x, keys), model[:2](x))
    assert cache.advanced == 8 and len(cache) == 8
    assert torch.equal(cache.prefix(x, keys), cache.prefix(x, keys)) and cache.hits == 16
    cache.close()


def test_dropout_pinned_by_layer_freezing_is_accepted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.5)), nn.Linear(6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezing = lf.LayerFreezing(dropout="eval").attach(model, opt, total_steps=10)
    freezing.set_depth(1)
    model.train()
    cache = PrefixCache(model)
    x, keys = data()
    assert torch.equal(cache(x, keys), model(x)) and cache.cut == 1
