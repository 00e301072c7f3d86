"""One "node" of a multi-node rehearsal on one machine: a monitored DDP loop (gloo, CPU) that keeps
stepping until a stop file appears, so a Prometheus can scrape every rank meanwhile.

    # node 0 and node 1 of one job (static rendezvous on loopback), each with 2 ranks:
    TRAINMON_METRICS__HOST=127.0.0.2 torchrun --nnodes 2 --node-rank 0 --nproc-per-node 2 \
        --master-addr 127.0.0.1 --master-port PORT tests/workers/multinode_loop.py RUN_DIR STOP_FILE
    TRAINMON_METRICS__HOST=127.0.0.3 TRAINMON_METRICS__ADVERTISE=127.0.0.3 torchrun --nnodes 2 --node-rank 1 ...

The monitor's metrics settings come from the TRAINMON_METRICS__* variables of each node (as a job
script sets them per host). Every step the ranks agree (one all-reduce of a flag) whether the stop
file exists or `--max-seconds` passed, so they all stop at the same step. Each rank writes
RUN_DIR/../rank<N>.json at the end: its steps, its metrics URL and the node's metrics settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import VOCAB, TinyLM  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("stop_file", type=Path)
    ap.add_argument("--max-seconds", type=float, default=300.0, help="stop anyway after this long")
    ap.add_argument("--step-sleep", type=float, default=0.05)
    a = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DDP(TinyLM())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    import monitor

    # metrics.host / metrics.advertise come from this node's TRAINMON_METRICS__* variables.
    mon = monitor.attach(model, opt, run_dir=a.run_dir, config={"console": {"enabled": False}})
    g = torch.Generator().manual_seed(1000 + rank)
    deadline = time.monotonic() + a.max_seconds
    step = 0
    while True:
        stop = torch.tensor([1 if a.stop_file.exists() or time.monotonic() > deadline else 0])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        if stop.item():
            break
        x = torch.randint(0, VOCAB, (4, 8), generator=g)
        _, loss = model(x, torch.roll(x, -1, dims=1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        time.sleep(a.step_sleep)
    mon.flush()
    out = {"rank": rank, "world": world, "steps": step, "metrics_url": mon.metrics_url,
           "host": mon.config.metrics.host, "advertise": mon.config.metrics.advertise}
    mon.close()
    (a.run_dir.parent / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()
    from monitor.trainer.launch import exit_rank

    exit_rank(0)  # not through interpreter finalization, where gloo can abort a finished rank


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
