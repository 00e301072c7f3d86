"""`monitor watch` performance: ingest throughput, event-to-alert latency, memory per run.

1. Ingest: a trainmon run directory with N step records (written with the real EventWriter, as
   a training process writes them: loss, LR, grad norms, clip coefficient, tokens, step time and a
   27-parameter norm vector) is read by the daemon (discovery, tail, parse, rules, metrics) on
   one thread. Target (issue 4): >= 50k records/s. A second stream adds what a run with the
   default configuration writes besides: attention statistics of 4 layers every 10 steps and the
   per-parameter chart scalars every 50.
2. Latency: a writer appends steps at ~50 steps/s with a NaN loss planted now and then; the
   daemon's loop (poll every 0.1 s) raises loss.nonfinite; the time from the writer's flush to the
   alert reaching a sink, median over the plants. Target: <= 1 s median.
3. Memory: RSS of the daemon after ingesting more and more records of one run and of many runs:
   bounded and flat over time (state per run is windows, not history).
Results: benchmarks/results/watch.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import math
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from monitor.config import MonitorConfig  # noqa: E402
from monitor.runlog.events import EventWriter  # noqa: E402
from monitor.runlog.rundir import RunDir  # noqa: E402
from monitor.schema import ModelInfo, OptimizerInfo, ParamGroupInfo, RunInfo, StepRecord  # noqa: E402
from monitor.watch.daemon import Watcher  # noqa: E402
from monitor.watch.health import tune_gc  # noqa: E402

PARAMS = [f"blocks.{i // 6}.p{i % 6}" for i in range(27)]


def make_run(root: Path, name: str, chart_every: int = 0) -> tuple[RunDir, EventWriter]:
    rd = RunDir(root / name)
    rd.write_run_info(RunInfo(run_id=name, max_steps=10**7, model=ModelInfo(param_names=PARAMS),
                              optimizer=OptimizerInfo(name="AdamW", groups=[ParamGroupInfo(lr=1e-3, betas=[0.9, 0.95])])))
    return rd, EventWriter(rd.events_dir, 0, flush_secs=3600, param_norms_every=chart_every, param_names=PARAMS)


def record(step: int, t: float, nan: bool = False, attention: bool = False) -> StepRecord:
    noise = 1 + 0.02 * math.sin(step * 2.399)
    lr = 1e-3 * min(1.0, (step + 1) / 100)
    attn = {f"blocks.{i}.attn": {"entropy_ratio": 0.8 * noise, "entropy_min": 0.5, "max_logit": 9.0 * noise,
                                 "max_prob": 0.3} for i in range(4)} if attention else None
    return StepRecord(step=step, time=t, loss=math.nan if nan else 2.0 * noise, lr=[lr], grad_norm=0.5 * noise,
                      grad_norm_clipped=0.5 * noise, clip_coef=1.0, max_norm=1.0, step_time=0.1, tokens=4096,
                      micro_batches=1, scheduler_steps=1, param_norms={p: 0.05 * noise for p in PARAMS},
                      attention=attn)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ingest(n: int, rounds: int, defaults_mix: bool = False) -> dict:
    """Records/s of the daemon over one run's n records; `defaults_mix`: with the attention samples
    (every 10 steps) and per-parameter chart scalars (every 50) a run with the defaults writes."""
    rates = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        rd, w = make_run(root, "run", chart_every=50 if defaults_mix else 0)
        t = time.time() - n * 0.1
        for s in range(n):
            w.write(record(s, t + 0.1 * s, attention=defaults_mix and s % 10 == 0))
        w.close()
        for _ in range(rounds):
            watcher = Watcher([root], MonitorConfig(), state_dir=None)
            t0 = time.perf_counter()
            watcher.scan()
            got = 0
            while True:
                k = watcher.poll()
                got += k
                if k == 0:
                    break
            dt = time.perf_counter() - t0
            assert got == n, (got, n)
            rates.append(n / dt)
            print(f"ingest{' (defaults mix)' if defaults_mix else ''}: {n} records in {dt:.2f} s = {n / dt:,.0f}/s",
                  flush=True)
    return {"records": n, "rates": rates, "median": statistics.median(rates)}


def latency(plants: int) -> dict:
    lat: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        rd, w = make_run(root, "live")
        flushed: dict[int, float] = {}
        seen: dict[int, float] = {}

        class Sink:
            def emit(self, alert):
                if alert.rule == "loss.nonfinite" and alert.status == "firing":
                    seen[alert.step] = time.time()

        # cooldown 0 and resolve after 1 step, so every planted NaN is its own alert
        cfg = MonitorConfig(rules={"loss.nonfinite": {"resolve_after": 1, "cooldown_steps": 0}})
        watcher = Watcher([root], cfg, state_dir=None, sinks=[Sink()])
        stop = threading.Event()
        loop = threading.Thread(target=watcher.run, args=(stop,), kwargs={"poll_every": 0.1, "discover_every": 0.5})
        loop.start()
        step = 0
        try:
            for _ in range(plants):
                for _step in range(20):  # ~0.4 s of healthy steps at 50 steps/s
                    w.write(record(step, time.time()))
                    w.flush()
                    step += 1
                    time.sleep(0.02)
                w.write(record(step, time.time(), nan=True))
                w.flush()
                flushed[step] = time.time()
                step += 1
            deadline = time.time() + 10
            while len(seen) < plants and time.time() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            loop.join()
            w.close()
        for s, t in flushed.items():
            if s in seen:
                lat.append(seen[s] - t)
    print(f"latency: {len(lat)}/{plants} alerts, median {statistics.median(lat):.3f} s", flush=True)
    return {"plants": plants, "detected": len(lat), "latencies": lat, "median": statistics.median(lat),
            "max": max(lat)}


def memory(runs: int, chunk: int, chunks: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        writers = [make_run(root, f"run{i:03d}")[1] for i in range(runs)]
        watcher = Watcher([root], MonitorConfig(), state_dir=None)
        watcher.scan()
        t = time.time() - runs * chunk * chunks
        step = 0
        points = []
        for _ in range(chunks):
            for _ in range(chunk):
                for w in writers:
                    w.write(record(step, t))
                step += 1
                t += 0.001
            for w in writers:
                w.flush()
            while watcher.poll():
                pass
            gc.collect()
            points.append({"records_per_run": step, "rss_mb": round(rss_mb(), 1)})
            print(f"memory: {runs} runs x {step} records: RSS {points[-1]['rss_mb']} MB", flush=True)
        for w in writers:
            w.close()
    first_half = points[len(points) // 2]["rss_mb"]
    return {"runs": runs, "points": points, "growth_second_half_mb": round(points[-1]["rss_mb"] - first_half, 1)}


def main() -> None:
    tune_gc()  # as `monitor watch` does
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--plants", type=int, default=10)
    ap.add_argument("--runs", type=int, default=50)
    a = ap.parse_args()
    ing = ingest(a.records, a.rounds)
    mix = ingest(a.records, a.rounds, defaults_mix=True)
    lat = latency(a.plants)
    mem = memory(a.runs, 2000, 6)
    md = "\n".join([
        "# `monitor watch` performance", "",
        "| measure | result | target |", "|---|---|---|",
        f"| ingest (discover + tail + parse + all rules + metrics), one thread | {ing['median']:,.0f} records/s "
        f"(median of {a.rounds}, {a.records:,} records) | >= 50,000/s |",
        f"| the same with the defaults' extras (attention statistics every 10 steps, chart scalars every 50) | "
        f"{mix['median']:,.0f} records/s | |",
        f"| event-to-alert latency (poll every 0.1 s) | median {lat['median'] * 1e3:.0f} ms, max {lat['max'] * 1e3:.0f} ms "
        f"({lat['detected']}/{lat['plants']} alerts) | <= 1 s median |",
        f"| memory, {a.runs} runs growing to {mem['points'][-1]['records_per_run']:,} records each | RSS "
        f"{mem['points'][0]['rss_mb']} MB -> {mem['points'][-1]['rss_mb']} MB (second half: "
        f"{mem['growth_second_half_mb']:+} MB) | bounded, flat |",
        "",
    ])
    path = write_results("watch", {"ingest": ing, "ingest_defaults_mix": mix, "latency": lat, "memory": mem}, md)
    print(md)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
