#!/usr/bin/env python3
"""Resume the fixture's Trainer run from a checkpoint folder and report the loss.

    python3 scripts/trainer_resume.py CHECKPOINT_DIR [--steps 30] [--width 48 --layers 2]

Rebuilds the run of fixtures/make_trainer_run.py (same model, data, seed and
arguments), calls trainer.train(resume_from_checkpoint=CHECKPOINT_DIR) up to
--steps, and prints the mean training loss of the resumed steps as JSON. Run
it on the fixture's own checkpoint-20 and on a `ckptvc checkout` of step 20:
the two losses say how well the checkout resumes training.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
import make_trainer_run as run  # noqa: E402

from transformers import TrainerCallback  # noqa: E402


class Losses(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append((state.global_step, float(logs["loss"])))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    out = tempfile.mkdtemp()
    losses = Losses()
    trainer = run.make_trainer(out, args.steps, 0, [losses], args.width, args.layers)
    trainer.train(resume_from_checkpoint=args.checkpoint)
    shutil.rmtree(out)
    resumed = [loss for _, loss in losses.losses]
    print(json.dumps({"checkpoint": args.checkpoint, "steps": [s for s, _ in losses.losses],
                      "mean_loss": sum(resumed) / len(resumed), "losses": resumed}))


if __name__ == "__main__":
    main()
