"""The publisher's CPU per step beside a running training thread and on its own (issue 13's slope).

hostcost.py's publisher figure grows with the model although a step's record does not (between the
sampled steps it holds the same fields at any depth). This tells where the growth goes. The same
monitored proxy run (hostcost.py's GPT) is measured in two ways per round, each in a fresh process, in
turn. Beside training: the defaults, where the publisher takes a batch every 0.5 s while the training
thread goes on stepping (the training thread's torch ops release the GIL and take it back at every op,
and the two threads share the machine's caches). On its own: the batch window made longer than the run
and the queue larger than it, so the measured steps' records wait and are published in one go at the
flush, while the training thread waits: the same work, with nothing running beside it. The
difference is what the training thread's company costs the publisher; it grows with the ops per step,
so with depth. Medians over the rounds.

Usage: python benchmarks/publisher_interference.py [--layers 12,48] [--rounds 4]
Results: benchmarks/results/publisher-interference.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import run_child, write_results  # noqa: E402

MODES = {"beside": "beside training", "alone": "on its own"}


def child(layers: int, steps: int, warmup: int, mode: str) -> dict:
    import torch
    from _paired import one_step
    from hostcost import TINY, monitor_threads, thread_cpu

    import monitor
    from monitor.hooks import publisher
    from monitor.trainer import TrainConfig
    from monitor.trainer.loop import _Run

    torch.set_num_threads(1)
    cfg = TrainConfig.from_preset("tiny", n_layer=layers, max_steps=warmup + steps, **TINY)
    run = _Run(cfg, torch.device("cpu"))
    config = {"metrics": {"port": 0}, "console": {"enabled": False}}
    kept = publisher.GATHER_SECONDS, publisher.MAX_BATCH
    if mode == "alone":  # after the warm-up's flush, the next batch waits past the run: flush() publishes it
        config["collector"] = {"queue_size": 4 * (warmup + steps)}
        publisher.GATHER_SECONDS = 1e6
        publisher.MAX_BATCH = 1 << 30
    before = set(monitor_threads())
    with tempfile.TemporaryDirectory() as d:
        mon = monitor.attach(run.model, run.optimizer, scaler=run.scaler, scheduler=run.scheduler, run_dir=d,
                             max_steps=cfg.max_steps, config=config)
        pub = next(t for k, t in monitor_threads().items() if k not in before and k == "trainmon-publisher")
        try:
            for i in range(warmup):
                one_step(run, i, nullcontext)
            assert mon.flush(120)
            p0, published = thread_cpu(pub), mon._publisher.published
            for i in range(warmup, warmup + steps):
                one_step(run, i, nullcontext)
            p1 = thread_cpu(pub)
            if mode == "alone" and mon._publisher.published != published:
                raise SystemExit("the publisher published during the steps: not on its own")
            assert mon.flush(300)
            p2 = thread_cpu(pub)
        finally:
            mon.close()
            publisher.GATHER_SECONDS, publisher.MAX_BATCH = kept
    assert mon.dropped_records == 0 and mon.internal_errors == 0, (mon.dropped_records, mon.internal_errors)
    return {"during_us": (p1 - p0) / steps * 1e6, "publisher_us": (p2 - p0) / steps * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="12,48")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        layers, mode = a.child.split(":")
        print(json.dumps(child(int(layers), a.steps, a.warmup, mode)))
        return
    depths = [int(x) for x in a.layers.split(",")]
    runs: dict[str, dict[str, list[dict]]] = {str(n): {m: [] for m in MODES} for n in depths}
    for k in range(a.rounds):
        for n in depths:
            for m in (list(MODES) if k % 2 == 0 else list(MODES)[::-1]):
                runs[str(n)][m].append(run_child([__file__, "--child", f"{n}:{m}", "--steps", str(a.steps),
                                                  "--warmup", str(a.warmup)]))
                print(f"round {k + 1}/{a.rounds}, {n} layers, {MODES[m]}: "
                      f"{runs[str(n)][m][-1]['publisher_us']:.0f} us/step", flush=True)
    md = ["# The publisher's CPU beside the training thread and on its own", "",
          (__doc__ or "").split("\n\n")[1].replace("\n", " "), "",
          "| layers | beside training | on its own | what the company costs |", "|---|---|---|---|"]
    for n in depths:
        med = {m: statistics.median(r["publisher_us"] for r in runs[str(n)][m]) for m in MODES}
        md.append(f"| {n} | {med['beside']:.0f} us/step | {med['alone']:.0f} us/step | "
                  f"{med['beside'] - med['alone']:+.0f} us/step |")
    md += ["", f"Publisher thread CPU per measured step, median of {a.rounds} rounds of {a.steps} steps after "
           f"{a.warmup} warm-up steps, fresh processes, torch threads 1; {time.strftime('%Y-%m-%d %H:%M:%S')}."]
    out = write_results("publisher-interference", {"args": vars(a), "runs": runs}, "\n".join(md) + "\n")
    print("\n".join(md))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
