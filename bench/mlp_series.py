#!/usr/bin/env python3
"""Three Trainer-style checkpoints (model.safetensors, optimizer.pt and the
names file ckptvc pairs moments by) of an fp32 MLP of 4 blocks of width
1024 (33.6M parameters, 384 MiB with AdamW's moments), 5 AdamW steps apart:
the series of the commit-time A/B in docs/benchmarks.md.

Usage: python3 bench/mlp_series.py OUT   (writes OUT/ckpt-20, -25, -30)
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file


def main():
    out = sys.argv[1]
    torch.manual_seed(0)
    width, blocks = 1024, 4
    layers = []
    for _ in range(blocks):
        layers += [torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width)]
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    names = [n for n, _ in model.named_parameters()]

    def steps(k):
        for _ in range(k):
            loss = model(torch.randn(64, width)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    def save(step):
        folder = os.path.join(out, f"ckpt-{step}")
        os.makedirs(folder, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(folder, "model.safetensors"))
        torch.save(opt.state_dict(), os.path.join(folder, "optimizer.pt"))
        with open(os.path.join(folder, "ckptvc-params.json"), "w") as f:
            json.dump({"version": 1, "params": names}, f)

    steps(20)
    save(20)
    for step in (25, 30):
        steps(5)
        save(step)


if __name__ == "__main__":
    main()
