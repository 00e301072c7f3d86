"""Where the monitor's per-step time goes in the training thread: a diagnostic, not a benchmark.

Runs the reference run unmonitored, then monitored with the defaults, in one process, and prints:
- the profiler's op counts per step that the monitor adds (on a GPU each is a kernel launch or a
  host-side op the training thread pays for);
- ms/step of both under cProfile (which profiles the training thread only), and the monitor's
  functions in the training thread by cumulative time.
Results: benchmarks/results/profile-step-<preset>-<device>.txt.

Usage: python benchmarks/profile_step.py [--preset small] [--device cpu] [--steps 100]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS  # noqa: E402
from _paired import one_step, setup  # noqa: E402

import monitor  # noqa: E402
from monitor.trainer.loop import _Run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=100, help="steps under cProfile (10 more under the op profiler)")
    a = ap.parse_args()
    warm, counted = 20, 10
    cfg, device, autocast, sync = setup(a.preset, warm + counted + a.steps, a.device)
    out: list[str] = [f"# profile-step: preset {a.preset} ({cfg.precision}) on {a.device}", ""]
    base_counts: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for monitored in (False, True):
            run = _Run(cfg, device)
            mon = monitor.attach(run.model, run.optimizer, scaler=run.scaler, scheduler=run.scheduler, run_dir=tmp,
                                 max_steps=cfg.max_steps,
                                 config={"metrics": {"port": 0}, "console": {"enabled": False}}) if monitored else None
            label = "monitored (defaults)" if monitored else "unmonitored"
            try:
                for s in range(warm):
                    one_step(run, s, autocast)
                sync()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    for s in range(warm, warm + counted):
                        one_step(run, s, autocast)
                    sync()
                counts = {e.key: e.count / counted for e in prof.key_averages()}
                out.append(f"{label}: {sum(counts.values()):.0f} profiler events per step")
                if monitored:
                    diff = sorted(((c - base_counts.get(k, 0.0), k) for k, c in counts.items()), reverse=True)
                    out += [f"  {d:+7.1f}/step  {k}" for d, k in diff if d > 0][:25]
                base_counts = counts
                prof_ = cProfile.Profile()
                sync()
                t0 = time.perf_counter()
                prof_.enable()
                for s in range(warm + counted, warm + counted + a.steps):
                    one_step(run, s, autocast)
                sync()
                prof_.disable()
                out.append(f"{label}: {(time.perf_counter() - t0) / a.steps * 1e3:.2f} ms/step under cProfile")
                if monitored:
                    buf = io.StringIO()
                    pstats.Stats(prof_, stream=buf).sort_stats("cumulative").print_stats(r"monitor/(hooks|exporters|rules)", 30)
                    out += ["", "The monitor's functions in the training thread (cumulative):", buf.getvalue()]
            finally:
                if mon is not None:
                    mon.close()
    text = "\n".join(out) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"profile-step-{a.preset}-{a.device}.txt"
    path.write_text(text)
    print(text)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
