#!/usr/bin/env python3
"""Resume the fixture's Trainer run from a checkpoint folder and report the loss.

    python3 scripts/trainer_resume.py CHECKPOINT_DIR [--steps 30]

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

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402


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
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=48, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    out = tempfile.mkdtemp()
    training = TrainingArguments(
        output_dir=out, max_steps=args.steps, save_strategy="no", per_device_train_batch_size=16,
        learning_rate=3e-3, weight_decay=0.1, lr_scheduler_type="cosine", warmup_steps=5,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    losses = Losses()
    trainer = Trainer(model=model, args=training, train_dataset=run.ByteWindows(), callbacks=[losses])
    trainer.train(resume_from_checkpoint=args.checkpoint)
    shutil.rmtree(out)
    resumed = [loss for _, loss in losses.losses]
    print(json.dumps({"checkpoint": args.checkpoint, "steps": [s for s, _ in losses.losses],
                      "mean_loss": sum(resumed) / len(resumed), "losses": resumed}))


if __name__ == "__main__":
    main()
