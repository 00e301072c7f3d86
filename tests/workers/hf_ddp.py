"""The Hugging Face Trainer under torchrun (DDP over gloo on CPU) with TrainmonCallback.

    torchrun --standalone --nproc-per-node 2 tests/workers/hf_ddp.py OUT_DIR

A tiny GPT-2 built from config; the model takes `num_items_in_batch`, so each micro-batch's loss is a
share of the whole window's tokens, multiplied by the number of processes. Rank 0 writes
OUT_DIR/result.json: the Trainer's logged losses and grad norms and the monitor's run directory.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_integration_transformers import Tokens, gpt2  # noqa: E402

from monitor.integrations.transformers import TrainmonCallback  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    cb = TrainmonCallback(config={"metrics": {"port": 0}, "console": {"enabled": False}})
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, learning_rate=1e-3,
        warmup_steps=2, disable_tqdm=True, average_tokens_across_devices=True)
    trainer = transformers.Trainer(model=gpt2(), args=args, train_dataset=Tokens(), callbacks=[cb])
    trainer.train()
    if trainer.args.process_index == 0:
        logged = [h for h in trainer.state.log_history if "loss" in h]
        (out / "result.json").write_text(json.dumps({
            "world": trainer.args.world_size, "run_dir": str(cb.monitor.run_dir),
            "loss": [h["loss"] for h in logged], "grad_norm": [h["grad_norm"] for h in logged]}))


if __name__ == "__main__":
    main()
