"""Layer freezing in a plain PyTorch loop, with a checkpoint and an exact resume.

Run: python examples/plain_pytorch.py
"""

import torch
from torch import nn

import layerfreeze as lf


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )


torch.manual_seed(0)
data = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(5)]
epochs = 4

model = make_model()
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
freezing = lf.LayerFreezing(freeze_start=0.25, freeze_level=1.0, batchnorm="eval")
freezing.attach(model, opt, total_steps=epochs * len(data), steps_per_epoch=len(data))

for epoch in range(epochs):
    for x, y in data:
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        freezing.step()  # one optimizer step done; the schedule acts at epoch ends
    print(f"epoch {epoch}: {freezing.frozen_depth} of {len(freezing.layers)} layers frozen "
          f"(fraction {freezing.frozen_fraction:.2f})")

# Checkpoint: the freezing state names parameters, so it loads in a new process.
ckpt = {"model": model.state_dict(), "opt": opt.state_dict(), "freezing": freezing.state_dict()}

# Resume: attach, load the freezing state, THEN the optimizer state (the groups must match).
model2 = make_model()
model2.load_state_dict(ckpt["model"])
opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
freezing2 = lf.LayerFreezing(freeze_start=0.25, freeze_level=1.0, batchnorm="eval")
freezing2.attach(model2, opt2, total_steps=epochs * len(data), steps_per_epoch=len(data))
freezing2.load_state_dict(ckpt["freezing"])
opt2.load_state_dict(ckpt["opt"])
print("resumed with", freezing2.frozen_parameters[:2], "... frozen")
