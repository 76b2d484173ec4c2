"""Writes checkpoint folders of a real AdamW run, as a training script would
save them without ckptvc (model.safetensors, optimizer.pt and the names file
python/ckptvc_torch.py writes): input for CLI benchmarks such as
`scripts/bench_ab_commit.sh`.

    python bench/adam_folders.py [--dir DIR] [--layers 24] [--width 2048] [--steps 3,5]

Folder `ck-K` holds the state after the K-th entry of `--steps` more AdamW
steps. The defaults give a 100M-parameter model, 1.2 GB per folder.
"""

import argparse
import json
import os

import torch
from safetensors.torch import save_file


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="~/.cache/ckptvc-bench/cli-ab")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--steps", default="3,5", help="AdamW steps before each folder")
    args = parser.parse_args()
    root = os.path.expanduser(args.dir)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        *[torch.nn.Linear(args.width, args.width) for _ in range(args.layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for k, steps in enumerate((int(s) for s in args.steps.split(",")), start=1):
        for _ in range(steps):
            loss = model(torch.randn(16, args.width)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        folder = os.path.join(root, f"ck-{k}")
        os.makedirs(folder, exist_ok=True)
        save_file(model.state_dict(), os.path.join(folder, "model.safetensors"))
        torch.save(opt.state_dict(), os.path.join(folder, "optimizer.pt"))
        with open(os.path.join(folder, "ckptvc-params.json"), "w") as f:
            json.dump({"version": 1, "params": [n for n, _ in model.named_parameters()]}, f)
        print(folder)


if __name__ == "__main__":
    main()
