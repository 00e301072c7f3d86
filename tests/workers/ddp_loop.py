"""A plain DDP training loop (not the reference trainer) for tests under torchrun with gloo.

    torchrun --standalone --nproc-per-node 2 tests/workers/ddp_loop.py OUT_DIR [--with-monitor] [--fault ...]

Each rank writes OUT_DIR/rank<N>.json: its final parameter hash and, when monitored, its alerts.
Faults (rank 1 only): desync:STEP adds 1e-3 to one weight after the optimizer step; straggler sleeps
before every forward; slowinput:SECONDS sleeps SECONDS before fetching every micro-batch (a slow input
pipeline); hang:STEP blocks before the backward of that step; nanlog:STEP reports a NaN loss through
mon.log at that step (so only rank 1's monitor sees it). A TrainingHalted ends the loop and is written
to rank<N>.json as "halted" (step and message). --buffer trains a TinyLM with a registered float buffer
used in its forward, so DDP (broadcast_buffers=True, the default) broadcasts it at every forward.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import VOCAB, TinyLM  # noqa: E402


class BufferedLM(TinyLM):
    """TinyLM with a registered float buffer in its forward (as a causal mask or rotary cache is)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("gain", torch.ones(16))

    def forward(self, idx, targets=None):
        logits = self.head(self.norm(self.emb(idx) * self.gain))
        loss = None
        if targets is not None:
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--with-monitor", action="store_true")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--fault", default="")
    ap.add_argument("--config", default="{}")
    ap.add_argument("--monitor-ranks", default="all", help="'all', or a comma-separated list of ranks that attach")
    ap.add_argument("--buffer", action="store_true", help="a model with a registered buffer (broadcast every forward)")
    a = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"pid{rank}").write_text(str(os.getpid()))  # so a test can stop a hung rank for sure
    torch.manual_seed(0)
    model = DDP(BufferedLM() if a.buffer else TinyLM())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    import monitor

    mon = None
    if a.with_monitor and (a.monitor_ranks == "all" or str(rank) in a.monitor_ranks.split(",")):
        cfg = {"metrics": {"port": 0}, "console": {"enabled": False}, **json.loads(a.config)}
        mon = monitor.attach(model, opt, scheduler=sched, run_dir=a.out / "run", config=cfg, max_steps=a.steps)
    fault, _, arg = a.fault.partition(":")
    g = torch.Generator().manual_seed(1000 + rank)
    halted = None
    for step in range(a.steps):
        for micro in range(a.accum):
            if fault == "slowinput" and rank == 1:
                time.sleep(float(arg))  # a slow input pipeline: the wait is before the batch is fetched
            x = torch.randint(0, VOCAB, (4, 8), generator=g)
            y = torch.roll(x, -1, dims=1)
            if fault == "straggler" and rank == 1:
                time.sleep(0.03)  # a slow input pipeline on one rank
            ctx = model.no_sync() if micro < a.accum - 1 else torch.enable_grad()
            with ctx:
                _, loss = model(x, y)  # the loss comes out of the model, as in nanoGPT
                if fault == "hang" and rank == 1 and step == int(arg) and micro == a.accum - 1:
                    threading.Event().wait()  # blocks forever before the backward: rank 0 waits in the all-reduce
                (loss / a.accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if fault == "nanlog" and rank == 1 and step == int(arg) and mon is not None:
            mon.log(loss=float("nan"))
        try:
            opt.step()
        except monitor.TrainingHalted as e:
            halted = {"step": step, "message": str(e)}
            break
        opt.zero_grad(set_to_none=True)
        sched.step()
        if fault == "desync" and rank == 1 and step >= int(arg):
            with torch.no_grad():
                model.module.head.weight[0, 0] += 1e-3  # a weight mutated on one rank only
    alerts = []
    if mon is not None:
        mon.close()  # rank 0's close judges the last exchange too
        alerts = [al.model_dump(mode="json") for al in mon.alerts]
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.module.parameters())).hexdigest()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"rank{rank}.json").write_text(json.dumps({"hash": digest, "alerts": alerts, "world": world,
                                                        "halted": halted}))
    dist.destroy_process_group()
    from monitor.trainer.launch import exit_rank

    exit_rank(0)  # not through interpreter finalization, where gloo can abort a finished rank


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
