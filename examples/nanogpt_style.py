"""nanoGPT's training loop with trainmon: one `monitor.attach(...)` line, nothing else changes.

The loop has nanoGPT's shape: `get_lr` written into `param_groups` every iteration (no scheduler
object), gradient accumulation with `loss / grad_accum`, autocast with a GradScaler,
`scaler.unscale_` + `clip_grad_norm_`. The model is a small GPT whose attention is
`F.scaled_dot_product_attention(is_causal=True)`, so the monitor also samples attention statistics.
It learns bytes of a file from Python's own standard library: nothing is downloaded.

    python examples/nanogpt_style.py                      # 100 iterations in float32
    python examples/nanogpt_style.py --dtype float16      # fp16 autocast on CPU, GradScaler enabled
    python examples/nanogpt_style.py --steps 20 --out /tmp/runs --dtype bfloat16
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import monitor
from monitor.trainer.model import GPT, GPTConfig  # trainmon's small nanoGPT-shaped GPT: use your own model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps (nanoGPT's max_iters)")
    ap.add_argument("--out", default="runs", help="parent of the run directories")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = ap.parse_args()

    max_iters, grad_accum, batch_size, block_size = args.steps, 2, 8, 32
    learning_rate, min_lr, warmup_iters, lr_decay_iters = 1e-3, 1e-4, 40, args.steps
    grad_clip, dtype = 1.0, getattr(torch, args.dtype)

    torch.manual_seed(1337)
    text = Path(argparse.__file__).read_bytes()
    data = torch.tensor(list(text), dtype=torch.long)

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(data) - block_size - 1, (batch_size,))
        x = torch.stack([data[i:i + block_size] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + block_size] for i in ix])
        return x, y

    model = GPT(GPTConfig(vocab_size=256, block_size=block_size, n_layer=2, n_head=4, n_embd=64))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=learning_rate, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler("cpu", enabled=(dtype == torch.float16))
    ctx = torch.autocast(device_type="cpu", dtype=dtype, enabled=(dtype != torch.float32))

    def get_lr(it: int) -> float:
        if it < warmup_iters:
            return learning_rate * (it + 1) / (warmup_iters + 1)
        if it > lr_decay_iters:
            return min_lr
        decay_ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * decay_ratio)) * (learning_rate - min_lr)

    # The one added line. The loss is read where the model returns it (and where scaler.scale sees it),
    # the LR from param_groups at each optimizer step, the loss scale from `scaler`.
    mon = monitor.attach(model, optimizer, scaler=scaler, max_steps=max_iters, runs_root=args.out)

    X, Y = get_batch()
    for iter_num in range(max_iters):
        lr = get_lr(iter_num)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        for _micro_step in range(grad_accum):
            with ctx:
                logits, loss = model(X, Y)
                loss = loss / grad_accum
            X, Y = get_batch()
            scaler.scale(loss).backward()
        if grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if iter_num % 25 == 0 or iter_num == max_iters - 1:
            print(f"iter {iter_num:4d}: loss {loss.item() * grad_accum:.4f}, lr {lr:.2e}")

    mon.close()  # flushes every record and alert; also runs at interpreter exit
    print(f"run directory: {mon.run_dir}")
    print(f"alerts: {len(mon.alerts)}")
    for alert in mon.alerts:
        print("  " + alert.line())


if __name__ == "__main__":
    main()
