"""DistributedDataParallel under torchrun with trainmon: `monitor.attach` on every rank, with the DDP model.

gloo on CPU, nccl when there is a GPU for every local rank. Every rank writes its own records
into the shared run directory (rank 0's files at the top, `rank<N>/` beside them); rank 0 judges the
global quantities (gradient norm, LR), every rank its own loss and speed, and the ranks compare
parameter fingerprints (`ddp.desync`) and step phase times (`ddp.straggler`: input, compute)
through torchrun's store.

    torchrun --standalone --nproc-per-node 2 examples/ddp_torchrun.py
    torchrun --standalone --nproc-per-node 2 examples/ddp_torchrun.py --steps 20 --out /tmp/runs
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import monitor
from monitor.trainer.model import GPT, GPTConfig  # trainmon's small nanoGPT-shaped GPT: use your own model

VOCAB, SEQ, GRAD_ACCUM = 64, 32, 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps")
    ap.add_argument("--out", default="runs", help="parent of the run directories")
    args = ap.parse_args()

    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.device_count() >= int(os.environ["LOCAL_WORLD_SIZE"])
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=4, n_embd=64), seed=0).to(device)
    model = DDP(model, device_ids=[device.index] if cuda else None)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.95))
    warmup = 40  # warmup.too_short asks for at least 2 / (1 - beta2) steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    g = torch.Generator().manual_seed(1000 + rank)

    # The one added line, on every rank, with the DDP-wrapped model. The ranks agree on the run
    # directory's name (<out>/<utc-time>-<host>/) through torchrun's store.
    mon = monitor.attach(model, optimizer, scheduler=scheduler, max_steps=args.steps,
                         runs_root=args.out)

    for step in range(args.steps):
        lr = optimizer.param_groups[0]["lr"]
        for micro in range(GRAD_ACCUM):
            seqs = (torch.randint(0, VOCAB, (8, 1), generator=g) + torch.arange(SEQ + 1)) % VOCAB
            x, y = seqs[:, :-1].to(device), seqs[:, 1:].contiguous().to(device)
            with model.no_sync() if micro < GRAD_ACCUM - 1 else contextlib.nullcontext():
                _, loss = model(x, y)
                (loss / GRAD_ACCUM).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0 and (step % 25 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}  lr {lr:.2e}")

    mon.close()  # every rank: flushes its records and alerts
    if rank == 0:
        print(f"run directory: {mon.run_dir}")
        print(f"alerts: {len(mon.alerts)}")
        for alert in mon.alerts:
            print("  " + alert.line())
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
