#!/usr/bin/env python3
"""Reference trajectories for the training pieces (tests/fixtures/train.json): torch.optim.Adam
with S3-Router's settings (betas 0.9/0.98, eps 1e-8) over a few steps with varying gradients
and learning rates.

    pip install torch && python3 tools/make_train_fixtures.py
"""
import json
import os

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "train.json")


def main():
    g = torch.Generator().manual_seed(5)
    p = torch.randn(7, generator=g).requires_grad_(True)
    start = p.detach().clone()
    opt = torch.optim.Adam([p], lr=1e-3, betas=(0.9, 0.98), eps=1e-8)
    grads, lrs = [], []
    for step in range(6):
        lr = 1e-3 * (0.5 + step)
        for group in opt.param_groups:
            group["lr"] = lr
        grad = torch.randn(7, generator=g) * (10.0 ** (step - 3))
        p.grad = grad.clone()
        opt.step()
        grads.append(grad.tolist())
        lrs.append(lr)
    with open(OUT, "w") as f:
        json.dump({"torch": torch.__version__, "adam": {"start": start.tolist(), "grads": grads, "lrs": lrs, "end": p.detach().tolist()}}, f, indent=1)


if __name__ == "__main__":
    main()
