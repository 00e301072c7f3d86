"""Publisher throughput: step records per second through the full publisher path.

Packets as the collector makes them (CPU tensors with loss, grad norm, clip
coefficient and per-parameter norms of a 50-parameter model) go through the
real Publisher with every output attached: TensorBoard event writer, Prometheus
metrics and the rules engine with all built-in rules. Target (issue 2): >= 1000
steps/s. Median of several rounds; results in benchmarks/results/publisher.*.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from monitor.exporters.prometheus import TrainMetrics  # noqa: E402
from monitor.hooks.guard import ErrorGuard  # noqa: E402
from monitor.hooks.packet import Packet, StepState  # noqa: E402
from monitor.hooks.publisher import Publisher  # noqa: E402
from monitor.rules.engine import RulesEngine  # noqa: E402
from monitor.runlog.events import EventWriter  # noqa: E402
from monitor.schema import OptimizerInfo, RunInfo  # noqa: E402


def packets(n: int, n_params: int) -> list[Packet]:
    g = torch.Generator().manual_seed(0)
    out = []
    for s in range(n):
        vals = torch.rand(3 + n_params, generator=g) + 0.5
        state = StepState()
        state.lrs, state.tokens, state.micro = [1e-3 * min(1, (s + 1) / 100)], 4096, 4
        end = time.perf_counter()
        out.append(Packet(step=s, layout=("loss", "grad_norm", "clip_coef"), values=vals, event=None, state=state,
                          time=time.time(), end=end, start=end - 0.1, scheduler_steps=1, max_norm=1.0))
    return out


def one_round(n: int, n_params: int, tmp: Path) -> float:
    names = [f"blocks.{i // 6}.p{i}" for i in range(n_params)]
    run = RunInfo(run_id="bench", optimizer=OptimizerInfo(name="AdamW"))
    reg = CollectorRegistry()
    metrics = TrainMetrics(reg, "bench", 0)
    engine = RulesEngine(run, {}, sinks=[metrics])
    events = EventWriter(tmp, 0, param_norms_every=50)
    guard = ErrorGuard()
    pub = Publisher(rank=0, param_names=names, outputs=[("tb", events.write), ("prom", metrics.observe),
                                                        ("rules", engine.observe)],
                    guard=guard, queue_size=n + 1, on_drop=lambda: None)
    ps = packets(n, n_params)
    t0 = time.perf_counter()
    for p in ps:
        pub.submit(p)
    assert pub.flush(300)
    dt = time.perf_counter() - t0
    pub.close()
    events.close()
    assert guard.count == 0 and pub.published == n
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--params", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    rates = []
    for i in range(a.rounds):
        with tempfile.TemporaryDirectory() as d:
            rates.append(one_round(a.steps, a.params, Path(d)))
        print(f"round {i + 1}/{a.rounds}: {rates[-1]:,.0f} steps/s", flush=True)
    med = statistics.median(rates)
    md = (
        "# Publisher throughput\n\n"
        f"Step records per second through Publisher -> TensorBoard writer + Prometheus metrics + all rules, "
        f"{a.steps} records of a {a.params}-parameter model per round, {a.rounds} rounds.\n\n"
        f"| median | min | max | target |\n|---|---|---|---|\n"
        f"| {med:,.0f}/s | {min(rates):,.0f}/s | {max(rates):,.0f}/s | >= 1,000/s |\n"
    )
    path = write_results("publisher", {"steps": a.steps, "params": a.params, "rates": rates, "median": med}, md)
    print(md)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
