"""Hugging Face Transformers: LayerFreezingCallback with the real Trainer on a tiny BERT."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import layerfreeze as lf  # noqa: E402
from layerfreeze.integrations.transformers import STATE_FILE, LayerFreezingCallback  # noqa: E402

EXAMPLES, BATCH = 16, 4  # 4 optimizer steps an epoch


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, 30, (EXAMPLES, 8), generator=g)
        self.labels = torch.randint(0, 2, (EXAMPLES,), generator=g)

    def __len__(self):
        return EXAMPLES

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=8, num_labels=2)
    return BertForSequenceClassification(config)


LAYERS = len(lf.definition_order(tiny_bert()))  # 22 leaf layers; 21 freezable


class FrozenAtStepEnd(TrainerCallback):
    """Records the frozen parameter names after every step (added after ours, so it sees its result)."""

    def __init__(self):
        self.seen: list[tuple[int, int]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen.append((state.global_step, sum(not p.requires_grad for p in model.parameters())))


def _args(tmp_path, **kwargs) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, num_train_epochs=4, learning_rate=1e-2,
                weight_decay=0.01, save_strategy="no", report_to=[], use_cpu=True, seed=3, disable_tqdm=True,
                logging_strategy="no", dataloader_num_workers=0)
    base.update(kwargs)
    return TrainingArguments(**base)


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _logged(trainer: Trainer, key: str) -> list[float]:
    return [row[key] for row in trainer.state.log_history if key in row]


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _frozen(model) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if not p.requires_grad)


def test_freezes_at_epoch_ends_in_the_trainers_optimizer_and_logs(tmp_path):
    model, recorder = tiny_bert(), FrozenAtStepEnd()
    callback = LayerFreezingCallback(freeze_start=0.25)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=Tokens(), callbacks=[callback, recorder])
    trainer.train()
    depths = [0, int(1 / 3 * (LAYERS - 1)), int(2 / 3 * (LAYERS - 1)), LAYERS - 1]
    assert _logged(trainer, lf.LAYERS_FROZEN) == depths
    assert _logged(trainer, lf.PERCENTAGE_FROZEN) == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    # the frozen set changes right at the last step of each epoch (steps 4, 8, 12, 16)
    counts = dict(recorder.seen)
    assert counts[7] == 0 < counts[8] == counts[11] < counts[12] == counts[15] < counts[16]
    assert _frozen(model) == sorted(n for n, _ in model.named_parameters() if not n.startswith("classifier."))
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_groups == {id(model.classifier.weight), id(model.classifier.bias)}
    assert len(optimizer.param_groups) == 2  # the Trainer's decay / no-decay groups are kept


def test_interval_step_with_linear_schedule(tmp_path):
    model = tiny_bert()
    callback = LayerFreezingCallback(freeze_start=0.0, interval="step")
    trainer = Trainer(model=model, args=_args(tmp_path, num_train_epochs=1, lr_scheduler_type="linear"),
                      train_dataset=Tokens(), callbacks=[callback])
    trainer.train()
    assert _logged(trainer, lf.LAYERS_FROZEN) == [int(k / 4 * (LAYERS - 1)) for k in (1, 2, 3, 4)]
    assert trainer.lr_scheduler.get_last_lr() == [0.0, 0.0]


def _run(tmp_path, callbacks, resume=None, **kwargs):
    model = tiny_bert()
    args = _args(tmp_path, save_strategy="steps", save_steps=2, **kwargs)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks())
    trainer.train(resume_from_checkpoint=resume)
    return model


@pytest.mark.parametrize("checkpoint, interval", [("checkpoint-8", "epoch"), ("checkpoint-10", "epoch"),
                                                  ("checkpoint-10", "step")])
def test_resume_from_checkpoint_is_bit_identical(tmp_path, checkpoint, interval):
    # The yardstick first: the Trainer resumes this run exactly without freezing.
    base = _run(tmp_path / "base", lambda: [])
    base_resumed = _run(tmp_path / "base", lambda: [], resume=str(tmp_path / "base" / checkpoint))
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), base_resumed.parameters()))

    callbacks = lambda: [LayerFreezingCallback(freeze_start=0.25, interval=interval)]  # noqa: E731
    full = _run(tmp_path / "lf", callbacks)
    saved = torch.load(tmp_path / "lf" / checkpoint / STATE_FILE, weights_only=True)
    assert saved["frozen"]  # the checkpoint was taken with layers already frozen
    resumed = _run(tmp_path / "lf", callbacks, resume=str(tmp_path / "lf" / checkpoint))
    assert _frozen(resumed) == _frozen(full)
    expected, got = _weights(full), _weights(resumed)
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    assert any(not torch.equal(expected[n], b) for n, b in _weights(base).items())  # freezing did act


def test_resume_with_gradient_accumulation(tmp_path):
    callbacks = lambda: [LayerFreezingCallback(freeze_start=0.25, interval="step")]  # noqa: E731
    full = _run(tmp_path, callbacks, gradient_accumulation_steps=2)  # 2 optimizer steps an epoch
    assert sorted(os.listdir(tmp_path))[:2] == ["checkpoint-2", "checkpoint-4"]
    resumed = _run(tmp_path, callbacks, resume=str(tmp_path / "checkpoint-4"), gradient_accumulation_steps=2)
    assert all(torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters()))
    assert _frozen(full) == _frozen(resumed) != []


def test_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Hugging Face Transformers\n", 1)[1].split("\n## ", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(re.findall(r"```python\n(.*?)```", section, re.S)[0], "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "[0.0, 0.0, 3.0, 7.0, 10.0, 14.0, 17.0, 21.0]\n" in out and out.endswith("True\n")
