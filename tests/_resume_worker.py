"""Train a tiny model with LayerFreezing in its own process; used by test_resume.py.

    python _resume_worker.py CONFIG OUT_DIR full K1,K2,...   # uninterrupted; checkpoints at each K
    python _resume_worker.py CONFIG OUT_DIR resume K          # new process: resume from checkpoint K

Uses only the public API: attach, step, state_dict, load_state_dict.
"""

import json
import os
import sys

import torch

import layerfreeze as lf

sys.path.insert(0, os.path.dirname(__file__))
from conftest import ConvBN, TinyEncoder, batch_for  # noqa: E402

torch.set_num_threads(1)

CONFIGS = {
    "convbn_sgd_epoch": dict(
        model=ConvBN, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
        freezing=dict(freeze_start=0.25, batchnorm="eval"), steps=12, steps_per_epoch=3,
    ),
    "encoder_adamw_step": dict(
        model=TinyEncoder, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        freezing=dict(freeze_start=0.25, interval="step", unit="owner", order="execution"), steps=12,
        steps_per_epoch=None,
    ),
}


def build(name):
    config = CONFIGS[name]
    torch.manual_seed(0)
    model = config["model"]()
    opt = config["optimizer"](model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    freezing = lf.LayerFreezing(**config["freezing"]).attach(
        model, opt, total_steps=config["steps"], steps_per_epoch=config["steps_per_epoch"])
    return config, model, opt, sched, freezing


def train(config, model, opt, sched, freezing, start, stop, on_step=None):
    history = []
    for step in range(start, stop):
        data = torch.Generator().manual_seed(1000 + step)
        x = batch_for(model, n=4, generator=data)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        freezing.step()
        history.append(freezing.frozen_depth)
        if on_step is not None:
            on_step(step + 1)
    return history


def checkpoint(model, opt, sched, freezing):
    return {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
            "freezing": freezing.state_dict(), "rng": torch.get_rng_state()}


def main():
    name, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    config, model, opt, sched, freezing = build(name)
    if mode == "full":
        ks = {int(k) for k in sys.argv[4].split(",")}

        def save(step):
            if step in ks:
                torch.save(checkpoint(model, opt, sched, freezing), os.path.join(out, f"ckpt{step}.pt"))

        history = train(config, model, opt, sched, freezing, 0, config["steps"], save)
        with open(os.path.join(out, "history.json"), "w") as f:
            json.dump(history, f)
        torch.save(checkpoint(model, opt, sched, freezing), os.path.join(out, "final_full.pt"))
    else:
        k = int(sys.argv[4])
        ckpt = torch.load(os.path.join(out, f"ckpt{k}.pt"), weights_only=False)
        model.load_state_dict(ckpt["model"])
        freezing.load_state_dict(ckpt["freezing"])  # before the optimizer: groups must match
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        torch.set_rng_state(ckpt["rng"])
        train(config, model, opt, sched, freezing, k, config["steps"])
        torch.save(checkpoint(model, opt, sched, freezing), os.path.join(out, f"final_resume{k}.pt"))


if __name__ == "__main__":
    main()
