"""Hugging Face `Trainer` with trainmon: one callback, `callbacks=[TrainmonCallback(...)]`.

A tiny GPT-2 built from a config (no weights downloaded) learns synthetic token sequences with
warmup, gradient accumulation and the Trainer's default clipping. The callback attaches when
training starts, to what the Trainer actually steps (optimizer, scheduler, wrapped model), and
records the loss the Trainer logs. The run directory goes under `output_dir`:
`<out>/trainmon/<utc-time>-<host>/`.

    python examples/hf_trainer.py                  # 100 steps, under runs/
    python examples/hf_trainer.py --steps 20 --out /tmp/runs
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from monitor.integrations.transformers import TrainmonCallback

VOCAB, SEQ = 64, 32


class Counting(torch.utils.data.Dataset):
    """Sequences that count up from a random start (mod VOCAB): easy to learn, so the loss falls."""

    def __init__(self, n: int = 512) -> None:
        g = torch.Generator().manual_seed(0)
        starts = torch.randint(0, VOCAB, (n, 1), generator=g)
        self.x = (starts + torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps")
    ap.add_argument("--out", default="runs", help="the Trainer's output_dir: parent of the run directories")
    args = ap.parse_args()

    torch.manual_seed(0)
    # attn_implementation="sdpa": attention the monitor's probe sees, so it samples attention statistics.
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4,
                                       bos_token_id=0, eos_token_id=0, attn_implementation="sdpa"))
    training_args = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        learning_rate=1e-3, warmup_steps=40, lr_scheduler_type="cosine", adam_beta2=0.95,
        weight_decay=0.1, max_grad_norm=1.0, logging_steps=10, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True,
    )
    # The one added line: the callback. `config=` takes the same keys as monitor.attach's
    # (see `monitor config --markdown`); here, stop the Trainer (after a checkpoint) on a critical alert.
    callback = TrainmonCallback(config={"halt_on": "critical"})
    trainer = Trainer(model=model, args=training_args, train_dataset=Counting(), callbacks=[callback])
    trainer.train()

    mon = callback.monitor  # the Monitor the callback ran; closed when training ended
    print(f"run directory: {mon.run_dir}")
    print(f"alerts: {len(mon.alerts)}")
    for alert in mon.alerts:
        print("  " + alert.line())


if __name__ == "__main__":
    main()
