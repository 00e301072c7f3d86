"""A plain PyTorch training loop with trainmon: one `monitor.attach(...)` line before the loop.

The loop is the usual one: AdamW, a LambdaLR with linear warmup then cosine decay, clip_grad_norm_.
The model is a tiny next-token classifier on synthetic token data, so nothing is downloaded.

    python examples/raw_loop.py                # 200 steps, run directory under runs/
    python examples/raw_loop.py --steps 20 --out /tmp/runs
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import monitor

VOCAB, CONTEXT = 64, 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps")
    ap.add_argument("--out", default="runs", help="parent of the run directories")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, 32), nn.Flatten(), nn.Linear(32 * CONTEXT, 64), nn.GELU(),
                          nn.Linear(64, VOCAB))
    criterion = nn.CrossEntropyLoss()
    # Weight decay on matrices only, not on biases and norm weights (the monitor checks this at attach).
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=3e-3, betas=(0.9, 0.95))
    warmup = 40  # warmup.too_short asks for at least 2 / (1 - beta2) steps

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, args.steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    g = torch.Generator().manual_seed(0)

    def batch(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, VOCAB, (size, CONTEXT), generator=g)
        return x, (x[:, -1] + 1) % VOCAB

    # The one added line. `loss_fn=` lets the monitor read the loss where the criterion returns it
    # (a model that returns its own loss needs nothing). `max_steps` lets it judge the warmup
    # against the whole schedule. `runs_root=` is optional (default: runs/<utc-time>-<host>/).
    with monitor.attach(model, optimizer, scheduler=scheduler, loss_fn=criterion, max_steps=args.steps,
                        runs_root=args.out) as mon:
        for step in range(args.steps):
            x, y = batch()
            lr = optimizer.param_groups[0]["lr"]
            loss = criterion(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the monitor reuses its pre-clip norm
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 50 == 0 or step == args.steps - 1:
                print(f"step {step:4d}  loss {loss.item():.4f}  lr {lr:.2e}")
    # Leaving the `with` block closed the monitor: every record and alert is written.

    print(f"run directory: {mon.run_dir}")
    print(f"alerts: {len(mon.alerts)}")
    for alert in mon.alerts:
        print("  " + alert.line())


if __name__ == "__main__":
    main()
