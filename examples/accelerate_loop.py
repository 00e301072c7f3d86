"""Hugging Face Accelerate's documented training loop with trainmon: `monitor.attach` on the PREPARED objects.

Accelerate needs no callback: attach to what `accelerator.prepare(...)` returned (the wrapped model,
the AcceleratedOptimizer and AcceleratedScheduler); the monitor finds the torch objects inside and
counts one step per real optimizer step, whatever `gradient_accumulation_steps` is. The model is a
tiny next-token classifier on synthetic token data.

    python examples/accelerate_loop.py                  # 100 optimizer steps, run directory under runs/
    python examples/accelerate_loop.py --steps 20 --out /tmp/runs
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from torch import nn

import monitor

VOCAB, CONTEXT, GRAD_ACCUM, BATCH = 64, 8, 2, 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps")
    ap.add_argument("--out", default="runs", help="parent of the run directories")
    args = ap.parse_args()

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=GRAD_ACCUM)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (args.steps * GRAD_ACCUM * BATCH, CONTEXT), generator=g)
    dataset = torch.utils.data.TensorDataset(x, (x[:, -1] + 1) % VOCAB)
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=BATCH)

    model = nn.Sequential(nn.Embedding(VOCAB, 32), nn.Flatten(), nn.Linear(32 * CONTEXT, 64), nn.GELU(),
                          nn.Linear(64, VOCAB))
    loss_function = nn.CrossEntropyLoss()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=3e-3, betas=(0.9, 0.95))
    warmup = 40  # warmup.too_short asks for at least 2 / (1 - beta2) steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))

    model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, dataloader, scheduler)

    # The one added line, after prepare(). `loss_fn=` lets the monitor read the loss where the criterion
    # returns it (a model that returns its own loss needs nothing). `runs_root=` is optional
    # (default: runs/<utc-time>-<host>/).
    mon = monitor.attach(model, optimizer, scheduler=scheduler, loss_fn=loss_function, max_steps=args.steps,
                         runs_root=args.out)

    model.train()
    for i, (inputs, targets) in enumerate(dataloader):
        with accelerator.accumulate(model):
            outputs = model(inputs)
            loss = loss_function(outputs, targets)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()  # a no-op between accumulation boundaries: the monitor counts real steps only
            scheduler.step()
            optimizer.zero_grad()
        if i % 50 == 0:
            accelerator.print(f"micro-batch {i:4d}  loss {loss.item():.4f}")

    mon.close()  # flushes every record and alert; also runs at interpreter exit
    accelerator.print(f"run directory: {mon.run_dir}")
    accelerator.print(f"alerts: {len(mon.alerts)}")
    for alert in mon.alerts:
        accelerator.print("  " + alert.line())


if __name__ == "__main__":
    main()
