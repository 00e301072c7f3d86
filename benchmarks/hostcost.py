"""Host time the monitor adds per optimizer step, where the step itself is almost only host work (issue 13).

The host-bound proxy a CPU can measure: the reference trainer's GPT with tiny width, sequence and
batch (n_embd 8, one head, 8 tokens, batch 1), so the step is dominated by the Python and dispatch
cost of its ~150 parameter tensors (12 layers), as a small or medium model's step is on a fast GPU.
A deeper variant (48 layers, ~580 tensors) gives the cost per extra parameter tensor.

Two measures of the training thread, because a shared 2-core machine is noisy:
- paired: identical copies of the run (same model, optimizer, data) in one process, one unmonitored
  ("off"), one monitored at the defaults and a second unmonitored one ("control"), take steps in turn,
  one by one, the order rotating every step, so a burst of another tenant's load hits them alike;
  fresh sets of runs (`--instances`), made in a rotating order. The training thread's CPU time per
  step (`time.thread_time`: neither other tenants nor waits for the GIL count) minus the mean of the
  unmonitored steps beside it: the mean over blocks of `--block` steps (sampled steps included: the
  attention probe's and the per-parameter norms'), median over blocks; the median step's difference
  (sampled steps left out); wall time likewise. The control against "off" is the noise floor
  (identical runs differ by where their memory landed, more so with a bigger step);
- solo: the monitored run alone, stepping back to back as a real run does, with the monitor's
  training-thread entry points timed (CPU time inside them per step): precise, so it gives the slope,
  but it leaves out torch's dispatch around the hooks. The same run gives the publisher thread's CPU
  time per step (its `pthread_getcpuclockid` clock, read from the outside, its last work included):
  the upper bound of the GIL it takes from the training thread; other monitor threads likewise.
"host us/step" = the training thread's added CPU + the publisher's CPU per step: the target is
<= 150 us at 12 layers, growing <= ~0.1 us per extra parameter tensor, with the publisher <= 50 us.

`--label before|after` keeps each label's numbers in benchmarks/results/hostcost.{json,md} (the
"before" is run on the previous code with PYTHONPATH pointing at a checkout of it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results  # noqa: E402
from _paired import one_step  # noqa: E402
from _timed import Timed, hollow  # noqa: E402

import monitor  # noqa: E402
from monitor.trainer import TrainConfig  # noqa: E402
from monitor.trainer.loop import _Run  # noqa: E402

TINY = {"n_head": 1, "n_embd": 8, "block_size": 8, "batch_size": 1}
CONFIGS: dict[str, dict | None] = {"defaults": {}, "control": None}  # control: a second unmonitored run


def thread_cpu(t: threading.Thread) -> float:
    """CPU seconds a running thread has used, read from any thread."""
    return time.clock_gettime(time.pthread_getcpuclockid(t.ident))


def monitor_threads() -> dict[str, threading.Thread]:
    return {t.name: t for t in threading.enumerate() if t.name.startswith("trainmon-")}


def _attach(run: _Run, run_dir: Path, steps: int, config: dict):
    return monitor.attach(run.model, run.optimizer, scaler=run.scaler, scheduler=run.scheduler, run_dir=run_dir,
                          max_steps=steps, config={"metrics": {"port": 0}, "console": {"enabled": False}, **config})


def interleaved(cfg: TrainConfig, a: argparse.Namespace, run_dir: Path, k: int) -> dict[str, list[float]]:
    """Instance `k` of the rotation: per-step training-thread CPU (and wall) of each run, after warm-up. The
    runs are made in an order rotated by `k` (the first made tends to differ: where its memory landed)."""
    names = ["off", *CONFIGS]
    made = names[k % len(names):] + names[:k % len(names)]
    runs = {n: _Run(cfg, torch.device("cpu")) for n in made}
    mons = {n: _attach(runs[n], run_dir / n, cfg.max_steps, c) for n, c in CONFIGS.items() if c is not None}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    try:
        for i in range(a.warmup + a.steps):
            if i % a.block == 0:
                for m in mons.values():  # the publisher's work so far done, untimed (its cost: the solo run)
                    assert m.flush(60)
            # Steps alternate one by one, the order rotating every step: a burst from another tenant
            # hits the runs alike. Thread CPU clocks do not count time spent waiting for the GIL.
            for n in names[i % len(names):] + names[:i % len(names)]:
                w0, c0 = time.perf_counter(), time.thread_time()
                one_step(runs[n], i, nullcontext)
                c1, w1 = time.thread_time(), time.perf_counter()
                if i >= a.warmup:
                    cpu[n].append(c1 - c0)
                    wall[n].append(w1 - w0)
    finally:
        for m in mons.values():
            m.close()
    for n, m in mons.items():
        assert m.internal_errors == 0 and m.dropped_records == 0, (n, m.internal_errors, m.dropped_records)
    return {"cpu": cpu, "wall": wall}


def solo(cfg: TrainConfig, a: argparse.Namespace, run_dir: Path) -> dict[str, float]:
    """The monitored run alone, stepping back to back as a real run does (the publisher batches what a
    real run's cadence gives it): per step, its publisher's CPU, the other monitor threads' CPU and the
    CPU spent inside the monitor's training-thread entry points."""
    run = _Run(cfg, torch.device("cpu"))
    before = set(monitor_threads())
    with Timed() as timed:
        mon = _attach(run, run_dir / "solo", cfg.max_steps, CONFIGS["defaults"] or {})
    threads = {k: t for k, t in monitor_threads().items() if k not in before}
    pub = threads["trainmon-publisher"]

    def others() -> float:
        return sum(thread_cpu(t) for k, t in threads.items() if k != "trainmon-publisher" and t.is_alive())

    try:
        with timed:
            for i in range(a.warmup):
                one_step(run, i, nullcontext)
            assert mon.flush(60)
            sched = mon._collector.sampler.schedule if mon._collector.sampler is not None else None
            probes0 = sched.samples if sched is not None else 0
            p0, o0, w0 = thread_cpu(pub), others(), time.perf_counter()
            timed.total, timed.calls = 0.0, 0
            per_step = []  # CPU inside the entry points, step by step (its median: a step without sampling)
            for i in range(a.warmup, a.warmup + a.steps):
                t, c = timed.total, timed.calls
                one_step(run, i, nullcontext)
                per_step.append(timed.total - t - (timed.calls - c) * timed.clock_cost)
            wall = time.perf_counter() - w0
            direct = timed.direct()
            assert mon.flush(60)  # the publisher's tail is on its clock
            p1, o1 = thread_cpu(pub), others()
            # The attention probe's cost, amortised: what its schedule measured for the probes in the window
            # (its budget is a share of the step time, which this run's back-to-back steps give truly).
            probes = (sched.samples - probes0) if sched is not None else 0
            # (the schedule keeps its last 16 costs: past that many probes, their median stands for each)
            each = statistics.median(sched.costs[-probes:]) if probes else 0.0
            probe_s = sum(sched.costs[-probes:]) if 0 < probes <= len(sched.costs) else each * probes
    finally:
        mon.close()
    assert mon.internal_errors == 0 and mon.dropped_records == 0, (mon.internal_errors, mon.dropped_records)
    n = a.steps
    return {"publisher_cpu_us": (p1 - p0) / n * 1e6, "other_threads_cpu_us": (o1 - o0) / n * 1e6,
            "direct_us": direct / n * 1e6, "direct_typical_us": statistics.median(per_step) * 1e6,
            "solo_step_ms": wall / n * 1e3, "probe_us": probe_s / n * 1e6, "probes": probes,
            "probe_each_us": each * 1e6,
            "param_tensors": len(list(run.model.parameters()))}


def measure_depth(layers: int, a: argparse.Namespace) -> dict:
    cfg = TrainConfig.from_preset("tiny", n_layer=layers, max_steps=a.warmup + a.steps, **TINY)
    tensors = sum(1 for _ in _Run(cfg, torch.device("cpu")).model.parameters())
    blocks: dict[str, list[float]] = {n: [] for n in CONFIGS}  # per block: mean paired difference (us)
    steps: dict[str, list[float]] = {n: [] for n in CONFIGS}  # per step: paired difference (us)
    walls: dict[str, list[float]] = {n: [] for n in CONFIGS}
    off_ms: list[float] = []
    solos = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(a.instances):  # fresh runs each time: a run's own bias (where its memory landed) averages out
            got = interleaved(cfg, a, Path(tmp) / f"i{k}", k)
            off_ms.append(statistics.median(got["wall"]["off"]) * 1e3)
            for n in CONFIGS:
                # The monitored run against both unmonitored ones (their mean); the control against "off".
                base = ["off"] if n == "control" else ["off", "control"]
                for key, out in (("cpu", steps), ("wall", walls)):
                    ref = [statistics.fmean(v) for v in zip(*(got[key][b] for b in base))]
                    d = [(c - o) * 1e6 for c, o in zip(got[key][n], ref)]
                    out[n] += d
                    if key == "cpu":
                        blocks[n] += [statistics.fmean(d[j:j + a.block]) for j in range(0, len(d), a.block)]
            solos.append(solo(cfg, a, Path(tmp) / f"s{k}"))
    rows = []
    for n in CONFIGS:
        row = {"config": n, "layers": layers, "param_tensors": tensors, "off_step_ms": statistics.median(off_ms),
               "train_cpu_added_us": statistics.median(blocks[n]), "train_cpu_added_us_iqr": _iqr(blocks[n]),
               "train_cpu_added_median_step_us": statistics.median(steps[n]),
               "wall_added_median_step_us": statistics.median(walls[n])}
        if n == "defaults":
            for key in solos[0]:
                row[key] = statistics.median([s[key] for s in solos])
            row["host_us"] = row["train_cpu_added_us"] + row["publisher_cpu_us"]
            row["direct_host_us"] = row["direct_us"] + row["publisher_cpu_us"] + row.get("probe_us", 0.0)
        rows.append(row)
    return {"rows": rows}


def _iqr(xs: list[float]) -> list[float]:
    q = statistics.quantiles(xs, n=4)
    return [q[0], q[2]]


def table(label: str, rows: list[dict]) -> list[str]:
    out = [f"### {label}", "",
           "| layers | param tensors | unmonitored step | training thread CPU added, paired (IQR over blocks) | "
           "median step's added (CPU; wall) | noise floor (control) | inside the monitor's hooks | publisher CPU | "
           "other monitor threads | **host us/step** (paired; hooks + publisher + probe) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for layers in sorted({r["layers"] for r in rows}):
        r = next(x for x in rows if x["layers"] == layers and x["config"] == "defaults")
        c = next((x for x in rows if x["layers"] == layers and x["config"] == "control"), None)
        ti = r["train_cpu_added_us_iqr"]
        floor = f"{c['train_cpu_added_us']:+.0f} us" if c else "-"
        out.append(
            f"| {layers} | {r['param_tensors']} | {r['off_step_ms']:.2f} ms | {r['train_cpu_added_us']:.0f} us "
            f"({ti[0]:.0f} .. {ti[1]:.0f}) | {r['train_cpu_added_median_step_us']:.0f} us; "
            f"{r['wall_added_median_step_us']:.0f} us | {floor} | {r['direct_us']:.0f} us | "
            f"{r['publisher_cpu_us']:.0f} us | {r['other_threads_cpu_us']:.0f} us | "
            f"**{r['host_us']:.0f} us; {r['direct_host_us']:.0f} us** |")
    probed = [x for x in rows if x["config"] == "defaults" and "probe_us" in x]
    if probed:
        out += ["", "Attention probe in the solo run (inside the forward, so in neither hooks column): " + "; ".join(
            f"{x['layers']} layers {x['probe_us']:.0f} us/step amortised ({x['probes']:.0f} probes in "
            f"{x['solo_step_ms']:.2f} ms steps)" for x in probed) + "."]
    slope = per_tensor(rows)
    if slope is not None:
        out += ["", f"Per extra parameter tensor ({slope['from']} -> {slope['to']} tensors): {slope['direct_host']:+.3f} "
                f"us/step (inside the hooks {slope['direct']:+.3f}, publisher {slope['publisher']:+.3f}); paired "
                f"training thread {slope['train']:+.3f} (within its noise floor)."]
    return out


def per_tensor(rows: list[dict]) -> dict | None:
    mon = [r for r in rows if r["config"] == "defaults"]
    if len(mon) < 2:
        return None
    lo, hi = mon[0], mon[-1]
    d = hi["param_tensors"] - lo["param_tensors"]
    return {"from": lo["param_tensors"], "to": hi["param_tensors"],
            **{k: (hi[f] - lo[f]) / d for k, f in (("direct_host", "direct_host_us"), ("direct", "direct_us"),
                                                    ("publisher", "publisher_cpu_us"), ("train", "train_cpu_added_us"),
                                                    ("host", "host_us"))}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="after", help="the results' label (before: the previous code)")
    ap.add_argument("--layers", default="12,48", help="comma-separated depths; the first and last give the slope")
    ap.add_argument("--steps", type=int, default=300, help="measured steps per run and instance")
    ap.add_argument("--block", type=int, default=50, help="steps per block (block means give the amortised cost)")
    ap.add_argument("--instances", type=int, default=3, help="fresh sets of runs per depth")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: the publisher gets a core)")
    ap.add_argument("--note", default="", help="what code the label measured")
    ap.add_argument("--config", default="", help="monitor config (JSON) over the defaults, for a diagnosis")
    ap.add_argument("--render-only", action="store_true", help="rewrite the .md from the .json, measuring nothing")
    ap.add_argument("--hollow", action="store_true", help="the hooks' bodies emptied: their dispatch alone (a floor)")
    ap.add_argument("--gather", type=float, default=None,
                    help="the publisher's batch window in seconds instead of its own (a diagnosis)")
    a = ap.parse_args()
    if a.hollow:
        hollow()
    if a.gather is not None:
        from monitor.hooks import publisher

        publisher.GATHER_SECONDS = a.gather
    if a.config:
        CONFIGS["defaults"] = json.loads(a.config)
    torch.set_num_threads(a.threads)
    rows = []
    for layers in map(int, a.layers.split(",") if not a.render_only else ()):
        t0 = time.perf_counter()
        rows += measure_depth(layers, a)["rows"]
        r = next(r for r in rows if r["layers"] == layers and r["config"] == "defaults")
        print(f"{layers} layers: {r['host_us']:.0f} us/step paired, {r['direct_host_us']:.0f} us/step from the hooks "
              f"and the publisher ({time.perf_counter() - t0:.0f} s)", flush=True)
    path = RESULTS / "hostcost.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    labels = old.get("labels", {})
    if not a.render_only:
        labels[a.label] = {"args": vars(a), "rows": rows, "per_tensor": per_tensor(rows),
                           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "monitor": monitor.__file__,
                           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    order = [k for k in ("before", "after") if k in labels] + [k for k in labels if k not in ("before", "after")]
    md = [
        "# Host time the monitor adds per optimizer step (host-bound proxy, CPU)",
        "",
        "The reference trainer's GPT at n_embd 8, one head, 8 tokens, batch 1 (compute negligible: the step is "
        "the Python and dispatch of its parameter tensors), at the monitor's defaults. Two measures of the "
        "training thread:",
        "",
        "- **paired**: an unmonitored run, the monitored one and a second unmonitored run (the control) in one "
        "process take steps in turn, one by one, the order rotating every step (and the order they are made in "
        "rotating with each fresh set of runs); the training thread's CPU clock (`time.thread_time`: other "
        "tenants and waits for the GIL do not count) per step minus the mean of the unmonitored steps beside "
        "it, averaged over blocks (sampled steps included), median over the blocks of the fresh sets of runs. Everything the monitor adds is in it, torch's hook dispatch included; the control's figure "
        "(against the other unmonitored run) is its noise floor: identical runs differ by where their memory "
        "landed, more so with a bigger step;",
        "- **inside the monitor's hooks**: a monitored run alone, stepping back to back; the CPU time spent in "
        "the monitor's training-thread entry points per step (sampled steps included), less the clock's own "
        "cost per timed call (a back-to-back read, measured). Precise, so it gives the per-tensor slope; it "
        "leaves out torch's dispatch around the hooks (`--hollow` measures that dispatch alone: the hooks' "
        "bodies emptied).",
        "",
        "Publisher CPU: in that solo run (a real run's cadence, so its batches are a real run's), the publisher "
        "thread's CPU clock per step, its last work included: the upper bound of the GIL it takes from the "
        "training thread. Host us/step = training thread (paired; or inside the hooks plus the attention probe's "
        "amortised cost in the solo run) + publisher.",
        "",
        "Targets (issue 13): host <= 150 us/step at 12 layers, <= ~0.1 us per extra parameter tensor; "
        "publisher <= 50 us/step.",
        "",
        "The attention probe (sampled forwards, every `attention.every` steps stretched to keep within "
        "`attention.budget` of the step time) is in the paired figure, more often than in a real run: there the "
        "monitored run's step time, which the budget is set against, includes its neighbours' steps. Its cost "
        "in the solo run, amortised, is given under each table.",
        "",
        "Reading the slope: between sampled steps the monitor's work per step does not depend on the model "
        "(two aten ops on CPU whatever the number of tensors: tests/test_hostpath.py); per-parameter norms "
        "come every `collector.param_norms_every` steps. The depths here are measured minutes apart, and the "
        "VM drifts by more than they differ: hostcost-slope.md measures them alternately, splits the hooks' "
        "growth into the typical step's and the sampled steps', and times a canary of constant work beside "
        "them. The publisher's growth is its company: on its own it grows ~0.02 us per tensor "
        "(publisher-interference.md).",
        "",
        "Each label is measured on its own, and minutes apart this VM's speed drifts by as much as close versions "
        "differ (80ea2fb and after share their training-thread code): hostcost-versions.md measures versions "
        "alternately, process by process, for that comparison.",
        "",
    ]
    if not any(labels[k].get("gpu") for k in order):
        md += ["No GPU was lent to the sessions that measured these: the CUDA path (a persistent device "
               "staging vector, pinned host buffers and events reused) is checked on a device by "
               "scripts/sync_check.py and scripts/gpu-check.sh.", ""]
    for label in order:
        e = labels[label]
        args = e["args"]
        md += table(label, e["rows"])
        md += ["", f"{args['instances']} instances of {args['steps']} measured steps per run and depth (blocks of "
               f"{args['block']}) after {args['warmup']} warm-up steps, torch threads {args['threads']}; {e['date']}."
               + (f" {args['note']}" if args.get("note") else ""), ""]
    text = "\n".join(md)
    out = write_results("hostcost", {"labels": {k: labels[k] for k in order}}, text)
    print(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
