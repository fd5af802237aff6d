"""Hugging Face Transformers: LayerFreezingCallback with the real Trainer on a tiny BERT."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch

pytestmark = pytest.mark.slow  # the real Trainer

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
    # logging_strategy="no": a row at each change of the frozen set (epoch ends 2, 3, 4 of 21 freezable layers)
    assert LAYERS == 22
    assert _logged(trainer, lf.LAYERS_FROZEN) == [7, 14, 21]
    assert _logged(trainer, lf.PERCENTAGE_FROZEN) == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert [row["step"] for row in trainer.state.log_history if lf.LAYERS_FROZEN in row] == [8, 12, 16]
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
    # 21 freezable layers: depth int(k/4 * 21) after step k
    assert _logged(trainer, lf.LAYERS_FROZEN) == [5, 10, 15, 21]
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
    assert "[3.0, 7.0, 10.0, 14.0, 17.0, 21.0]\n" in out and out.endswith("True\n")


# -- the Trainer's clock and logging cadence ------------------------------------

class Rows(torch.utils.data.Dataset):
    """24 examples for a 3-layer MLP (2 freezable layers): batch 1, 24 steps an epoch."""

    def __init__(self, n: int = 24):
        g = torch.Generator().manual_seed(2)
        self.x, self.y = torch.randn(n, 6, generator=g), torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 6),
                                       torch.nn.ReLU(), torch.nn.Linear(6, 2))

    def forward(self, x, labels):
        return {"loss": torch.nn.functional.cross_entropy(self.net(x), labels)}


def _rows(trainer: Trainer, with_key: str) -> list[tuple[int, float]]:
    return [(row["step"], row.get(lf.LAYERS_FROZEN)) for row in trainer.state.log_history if with_key in row]


def _mlp_trainer(tmp_path, callbacks, **kwargs) -> Trainer:
    args = _args(tmp_path, per_device_train_batch_size=1, num_train_epochs=1, learning_rate=0.05, **kwargs)
    return Trainer(model=Mlp(), args=args, train_dataset=Rows(), callbacks=callbacks)


def test_logs_at_the_trainers_cadence_and_keeps_its_loss_rows(tmp_path):
    """24 steps, logging_steps=5: the Trainer's own rows (loss) are the same with the callback as
    without; the callback adds a row after each of them and one at each change of the frozen set."""
    plain = _mlp_trainer(tmp_path / "plain", [], logging_strategy="steps", logging_steps=5)
    plain.train()
    ours = _mlp_trainer(tmp_path / "ours", [LayerFreezingCallback(freeze_start=0.5, interval="step")],
                        logging_strategy="steps", logging_steps=5)
    ours.train()
    assert [step for step, _ in _rows(plain, "loss")] == [5, 10, 15, 20]
    assert [step for step, _ in _rows(ours, "loss")] == [5, 10, 15, 20]
    # every row the Trainer writes without the callback, with the same keys, at the same steps
    trainer_rows = lambda t: [(r["step"], sorted(r)) for r in t.state.log_history if lf.LAYERS_FROZEN not in r]  # noqa: E731
    assert trainer_rows(ours) == trainer_rows(plain)
    # depth 1 from step 18 ((18/24 - 0.5) / 0.5 = 0.5 of 2 layers), 2 at step 24
    assert _rows(ours, lf.LAYERS_FROZEN) == [(5, 0), (10, 0), (15, 0), (18, 1), (20, 1), (24, 2)]
    # at a logging step the Trainer's row comes first, the callback's right after it
    assert [("loss" in r, lf.LAYERS_FROZEN in r) for r in ours.state.log_history if r["step"] == 5] == [
        (True, False), (False, True)]


def test_logs_at_epoch_ends_with_logging_strategy_epoch(tmp_path):
    args = _args(tmp_path, per_device_train_batch_size=1, num_train_epochs=2, learning_rate=0.05,
                 logging_strategy="epoch")
    trainer = Trainer(model=Mlp(), args=args, train_dataset=Rows(),
                      callbacks=[LayerFreezingCallback(freeze_start=0.5, interval="step")])
    trainer.train()
    # 48 steps: the Trainer logs at steps 24 and 48; depth 1 from step 36, 2 at 48
    assert [step for step, _ in _rows(trainer, "loss")] == [24, 48]
    assert _rows(trainer, lf.LAYERS_FROZEN) == [(24, 0), (36, 1), (48, 2)]


@pytest.mark.parametrize("interval, depths", [("epoch", [14, 21]), ("step", [8, 10, 12, 14, 15, 17, 19, 21])])
def test_freezing_added_on_resume_follows_the_runs_true_progress(tmp_path, interval, depths):
    """A run checkpointed without freezing, resumed at step 8 of 16 with the callback added."""
    _run(tmp_path, lambda: [])
    recorder = FrozenAtStepEnd()
    callback = LayerFreezingCallback(freeze_start=0.25, interval=interval)
    trainer = Trainer(model=tiny_bert(), args=_args(tmp_path, save_strategy="no"), train_dataset=Tokens(),
                      callbacks=[callback, recorder])
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))
    # the schedule at steps 9..16 of 16 (fraction (k/16 - 0.25) / 0.75 of 21 layers), not at 1..8
    assert _logged(trainer, lf.LAYERS_FROZEN) == depths
    assert [step for step, _ in recorder.seen] == list(range(9, 17))
    assert callback.freezing.state_dict()["step"] == 16


def test_the_optimizer_load_hook_names_an_unknown_transformers(monkeypatch, tmp_path):
    from layerfreeze.integrations import transformers as integration

    trainer = Trainer(model=tiny_bert(), args=_args(tmp_path), train_dataset=Tokens())
    monkeypatch.delattr(Trainer, "_load_optimizer_and_scheduler")
    monkeypatch.setattr(integration.transformers, "__version__", "9.0.0")
    with pytest.raises(RuntimeError, match=r"cannot resume frozen layers with transformers 9\.0\.0: its Trainer "
                                           r"has no _load_optimizer_and_scheduler\(checkpoint\) \(tested with 4\.40"):
        integration._before_optimizer_load(trainer, lambda checkpoint: None)


def test_without_the_hook_a_fresh_run_still_freezes_and_is_warned(monkeypatch, tmp_path, caplog):
    monkeypatch.delattr(Trainer, "_load_optimizer_and_scheduler")
    model = tiny_bert()
    with caplog.at_level("WARNING", logger="layerfreeze"):
        trainer = Trainer(model=model, args=_args(tmp_path, num_train_epochs=1), train_dataset=Tokens(),
                          callbacks=[LayerFreezingCallback(freeze_start=0.0, interval="step")])
    assert "cannot resume frozen layers with transformers" in caplog.text and "HINT:" in caplog.text
    trainer.train()
    assert _logged(trainer, lf.LAYERS_FROZEN) == [5, 10, 15, 21]


@pytest.mark.parametrize("interval, warned", [("epoch", True), ("step", False)])
def test_a_one_epoch_run_deciding_at_epoch_ends_is_warned(tmp_path, caplog, interval, warned):
    trainer = Trainer(model=tiny_bert(), args=_args(tmp_path, num_train_epochs=1), train_dataset=Tokens(),
                      callbacks=[LayerFreezingCallback(freeze_start=0.0, interval=interval)])
    with caplog.at_level("WARNING", logger="layerfreeze"):
        trainer.train()
    assert ("a one-epoch run with interval='epoch' freezes only after its last step. HINT: pass interval='step'"
            in caplog.text) is warned


def test_no_class_wide_patch(tmp_path):
    """Building a callback and a trainer with it leaves the Trainer class as it was."""
    before = {name: getattr(Trainer, name) for name in dir(Trainer) if callable(getattr(Trainer, name))}
    callback = LayerFreezingCallback()
    trainer = Trainer(model=tiny_bert(), args=_args(tmp_path), train_dataset=Tokens(), callbacks=[callback])
    after = {name: getattr(Trainer, name) for name in dir(Trainer) if callable(getattr(Trainer, name))}
    assert after == before
    assert callback._trainer is trainer
    other = Trainer(model=tiny_bert(), args=_args(tmp_path), train_dataset=Tokens())
    assert "_load_optimizer_and_scheduler" not in vars(other)  # only the callback's own trainer is hooked
    assert "_load_optimizer_and_scheduler" in vars(trainer)


# -- one callback, several runs --------------------------------------------------

MLP_FROZEN = ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]  # 2 of 3 layers at the end


def test_a_callback_given_to_a_second_trainer_freezes_that_trainers_model(tmp_path):
    """The same callback object in a second Trainer (a notebook re-run, a sweep) follows the new
    Trainer: its model freezes by the schedule, not the first Trainer's model again."""
    callback = LayerFreezingCallback(freeze_start=0.5, interval="step")
    first = _mlp_trainer(tmp_path / "first", [callback])
    first.train()
    assert _frozen(first.model) == MLP_FROZEN
    second = _mlp_trainer(tmp_path / "second", [callback])
    assert callback._trainer is second
    second.train()
    assert _frozen(second.model) == MLP_FROZEN
    # depth 1 at step 18 ((18/24 - 0.5) / 0.5 of 2 layers), 2 at 24, in the second run's own log
    assert _rows(second, lf.LAYERS_FROZEN) == [(18, 1), (24, 2)]
    assert [g["params"] for g in second.optimizer.param_groups] and all(
        p.requires_grad for g in second.optimizer.param_groups for p in g["params"])


def test_train_again_with_model_init_freezes_the_new_model(tmp_path):
    """Trainer(model_init=...) builds a new model and optimizer at each train(): the callback
    attaches to them (it kept freezing the first model before)."""
    callback = LayerFreezingCallback(freeze_start=0.5, interval="step")
    args = _args(tmp_path, per_device_train_batch_size=1, num_train_epochs=1, learning_rate=0.05)
    trainer = Trainer(model_init=Mlp, args=args, train_dataset=Rows(), callbacks=[callback])
    trainer.train()
    first = trainer.model
    trainer.train()
    assert trainer.model is not first
    assert _frozen(trainer.model) == MLP_FROZEN
    assert callback.freezing.frozen_parameters == MLP_FROZEN
    assert _frozen(first) == []  # the previous run's model is released


def test_callback_passed_as_a_class_and_by_add_callback(tmp_path):
    """Transformers builds a callback passed as a class with its defaults (freeze_start=0.5,
    interval='epoch': one decision at the end of this one-epoch run); add_callback binds at train()."""
    as_class = _mlp_trainer(tmp_path / "class", [LayerFreezingCallback])
    as_class.train()
    assert _frozen(as_class.model) == MLP_FROZEN
    added = _mlp_trainer(tmp_path / "added", [])
    added.add_callback(LayerFreezingCallback(freeze_start=0.5, interval="step"))
    added.train()
    assert _rows(added, lf.LAYERS_FROZEN) == [(18, 1), (24, 2)]


def test_a_trainer_subclass_and_seq2seq_trainer_resume_bit_identically(tmp_path):
    """The callback finds a subclass of Trainer (Seq2SeqTrainer, a user's own with a new __init__)
    and hooks its optimizer loading: resumed at step 12 of 24, the run ends as the full one."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    class Custom(Trainer):
        def __init__(self, *args, note: str, **kwargs):
            super().__init__(*args, **kwargs)
            self.note = note

    def build(cls, folder, callback, **kwargs):
        base = dict(output_dir=str(folder), per_device_train_batch_size=1, num_train_epochs=1, learning_rate=0.05,
                    report_to=[], use_cpu=True, seed=3, disable_tqdm=True, logging_strategy="no",
                    save_strategy="steps", save_steps=12)
        arguments = (Seq2SeqTrainingArguments if cls is Seq2SeqTrainer else TrainingArguments)(**base)
        extra = {"note": "mine"} if cls is Custom else {}
        return cls(model=Mlp(), args=arguments, train_dataset=Rows(), callbacks=[callback], **extra)

    for cls in (Custom, Seq2SeqTrainer):
        folder = tmp_path / cls.__name__
        full = build(cls, folder, LayerFreezingCallback(freeze_start=0.0, interval="step"))
        full.train()
        callback = LayerFreezingCallback(freeze_start=0.0, interval="step")
        resumed = build(cls, folder, callback)
        assert callback._trainer is resumed
        resumed.train(resume_from_checkpoint=str(folder / "checkpoint-12"))
        assert _frozen(resumed.model) == _frozen(full.model) == MLP_FROZEN
        assert all(torch.equal(a, b) for a, b in zip(full.model.parameters(), resumed.model.parameters()))
