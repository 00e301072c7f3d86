"""The monitor's gradient-norm pass against one plain read of the gradients (issue 13, GPU lightness).

The pass: `GradNorms.compute(total=True, per_param=True)` (monitor/hooks/norms.py), as the collector
runs it on a sampled step: gather `p.grad`, group by device and dtype as clip_grad_norm_ does,
`torch._foreach_norm` per group, stack the norms and take their vector norm (the total). Target:
<= 1.2x of one read of the same gradient tensors.

Candidates, timed on the same fp32 gradients (random, the shapes of a preset's parameters: the
reference trainer's model built by `_Run`, its parameters given a `.grad` each):
- floor: one plain read, the faster (by median) of two that read every element once and write one
  scalar per tensor, so no reduction over the gradients can cost less:
  `torch._foreach_max(grads)`, a fused multi-tensor kernel on CUDA like `_foreach_norm` (the floor
  that matters there), and `g.sum()` per tensor: on CPU the foreach ops are per-tensor loops anyway
  and the sum kernel vectorises best (there `_foreach_max` reads slower than `_foreach_norm` itself,
  which would make it no floor);
- bare: `torch._foreach_norm(grads, 2.0)` alone, the kernel the pass is built on: monitor / bare
  shows what the monitor adds around it (the gather, the grouping, the stack and the total);
- monitor: the pass itself, on a GradNorms over the parameters (its result is the real one:
  tests/test_gradnorm_bench.py checks it bit-equal to torch.nn.utils.get_total_norm).
The floor and bare get the gradient list ready-made; the monitor's pass gathers it itself.

Each repetition runs the four in an order rotated every repetition, after warm-up repetitions; the
figures are medians over repetitions, the ratios medians of the per-repetition ratios (paired: a
burst of another tenant's load hits one repetition's candidates alike). On CPU each call is timed
with time.perf_counter (CPU ops are synchronous). On CUDA the device is synchronised before each
call and after it, never inside it; a `torch.cuda._sleep` queued ahead of the call keeps the device
busy while the host issues the call, so CUDA events around it time the device's work alone, as in
a training step where the host runs ahead; the host's issue time is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, write_results  # noqa: E402

from monitor.hooks.norms import GradNorms  # noqa: E402
from monitor.trainer import TrainConfig  # noqa: E402
from monitor.trainer.loop import _Run  # noqa: E402

TARGET = 1.2  # the monitor's pass / one read (issue 13)
CANDIDATES = ("max", "sum", "bare", "monitor")
READS = ("max", "sum")  # the floor: the faster of these


def preset_params(preset: str, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """The parameters of the reference trainer's model for `preset`, each with a random fp32 gradient."""
    params = list(_Run(TrainConfig.from_preset(preset), device).model.parameters())
    g = torch.Generator(device=device).manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32)
    return params


def candidates(params: list[torch.Tensor]) -> dict[str, Callable[[], object]]:
    """The calls timed, each returning its result (so nothing is optimised away)."""
    grads = [p.grad for p in params]
    norms = GradNorms(params, every=1)

    def monitor() -> GradNorms:
        norms.compute(total=True, per_param=True)
        return norms  # its .total and .per_param: what the collector records

    return {"max": lambda: torch._foreach_max(grads), "sum": lambda: [g.sum() for g in grads],
            "bare": lambda: torch._foreach_norm(grads, 2.0), "monitor": monitor}


class _Clock:
    """One call's time: (device seconds, host seconds); on CPU both are the call's wall time."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.lead_cycles = 0
        if self.cuda:  # cycles of torch.cuda._sleep per second, to size the lead queued before each call
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            torch.cuda._sleep(10**6)
            end.record()
            torch.cuda.synchronize()
            self.cycles_per_s = 10**6 / (start.elapsed_time(end) / 1e3)
            self.lead_cycles = int(self.cycles_per_s * 2e-3)  # 2 ms until the warm-up says otherwise

    def starved(self, host_s: float) -> bool:
        """Whether a call's issue outlasted the lead (the device may have waited for the host)."""
        return self.cuda and host_s > self.lead_cycles / self.cycles_per_s

    def set_lead(self, host_s: float) -> None:
        if self.cuda:  # three times the slowest issue of the last warm-up repetition, at least 2 ms
            self.lead_cycles = int(self.cycles_per_s * max(2e-3, 3 * host_s))

    def time(self, fn: Callable[[], object]) -> tuple[float, float]:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
            return t, t
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        torch.cuda._sleep(self.lead_cycles)
        start.record()
        h0 = time.perf_counter()
        fn()
        host = time.perf_counter() - h0
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3, host


def measure(params: list[torch.Tensor], reps: int, warmup: int) -> dict:
    """Interleaved repetitions of the candidates on `params`' gradients: medians and paired ratios."""
    clock = _Clock(params[0].device)
    calls = candidates(params)
    dev: dict[str, list[float]] = {n: [] for n in CANDIDATES}
    host: dict[str, list[float]] = {n: [] for n in CANDIDATES}
    warm_host, starved = 0.0, 0
    for i in range(warmup + reps):
        k = i % len(CANDIDATES)
        for n in CANDIDATES[k:] + CANDIDATES[:k]:  # the order rotates every repetition
            d, h = clock.time(calls[n])
            if i >= warmup:
                dev[n].append(d)
                host[n].append(h)
                starved += clock.starved(h)
            elif i == warmup - 1:  # the last warm-up repetition: warm, unlike the first calls
                warm_host = max(warm_host, h)
        if i == warmup - 1:
            clock.set_lead(warm_host)
    nbytes = sum(p.grad.numel() * p.grad.element_size() for p in params)
    med = {n: statistics.median(dev[n]) for n in CANDIDATES}
    floor = min(READS, key=med.get)
    dev["floor"], med["floor"] = dev[floor], med[floor]

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(dev[a], dev[b]))

    return {"param_tensors": len(params), "params": sum(p.numel() for p in params), "grad_mb": nbytes / 2**20,
            "floor_read": floor, **{f"{n}_ms": med[n] * 1e3 for n in ("floor", *CANDIDATES)},
            **{f"{n}_host_ms": statistics.median(host[n]) * 1e3 for n in CANDIDATES},
            "monitor_floor": ratio("monitor", "floor"), "monitor_bare": ratio("monitor", "bare"),
            "bare_floor": ratio("bare", "floor"), "floor_gb_s": nbytes / med["floor"] / 1e9,
            "reps": reps, "warmup": warmup, "starved_calls": starved,
            "samples_ms": {n: [t * 1e3 for t in dev[n]] for n in CANDIDATES}}


def table(device: str, e: dict) -> list[str]:
    cuda = device.startswith("cuda")
    cols = ["preset", "tensors", "grads", "`_foreach_max`", "`g.sum()` per tensor", "floor GB/s",
            "bare `_foreach_norm`", "monitor's pass", "**monitor / floor**", "monitor / bare", "bare / floor"]
    cols += ["monitor's host issue"] if cuda else []
    out = [f"### {device}" + (f" ({e['gpu']})" if e.get("gpu") else ""), "",
           "| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for r in e["rows"]:
        # The floor (the faster read) in bold.
        reads = [f"**{r[f'{n}_ms']:.3f} ms**" if n == r["floor_read"] else f"{r[f'{n}_ms']:.3f} ms" for n in READS]
        cells = [r["preset"], str(r["param_tensors"]), f"{r['grad_mb']:.1f} MiB", *reads, f"{r['floor_gb_s']:.1f}",
                 f"{r['bare_ms']:.3f} ms", f"{r['monitor_ms']:.3f} ms",
                 f"**{r['monitor_floor']:.2f}x** ({'ok' if r['monitor_floor'] <= TARGET else 'over'})",
                 f"{r['monitor_bare']:.2f}x", f"{r['bare_floor']:.2f}x"]
        cells += [f"{r['monitor_host_ms']:.3f} ms"] if cuda else []
        out.append("| " + " | ".join(cells) + " |")
    a = e["args"]
    out += ["", f"The floor (in bold): the faster read. {a['reps']} interleaved repetitions after {a['warmup']} "
            f"warm-up ones, medians; torch threads {e['threads']}; {e['machine'].get('cpus')} CPUs, torch "
            f"{e['machine'].get('torch')}; {e['date']}." + (f" {a['note']}" if a.get("note") else "")]
    if cuda:
        starved = sum(r["starved_calls"] for r in e["rows"])
        out += ["", "Device time from CUDA events with the host issuing ahead of the device (a queued sleep); "
                f"calls whose issue outlasted that lead: {starved}."]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    ap.add_argument("--presets", default="small,gpt2", help="comma-separated trainer presets (their parameter shapes)")
    ap.add_argument("--reps", type=int, default=15, help="measured repetitions (each runs every candidate once)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    ap.add_argument("--note", default="", help="a line for the results (e.g. why these threads)")
    a = ap.parse_args()
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.manual_seed(0)
    rows = []
    for preset in a.presets.split(","):
        t0 = time.perf_counter()
        params = preset_params(preset, device)
        r = {"preset": preset, **measure(params, a.reps, a.warmup)}
        del params
        rows.append(r)
        print(f"{preset}: floor {r['floor_ms']:.3f} ms ({r['floor_gb_s']:.1f} GB/s), bare {r['bare_ms']:.3f} ms, "
              f"monitor {r['monitor_ms']:.3f} ms: {r['monitor_floor']:.2f}x the floor, {r['monitor_bare']:.2f}x bare "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    # One entry per device type, kept across runs: a GPU run adds its figures beside the CPU ones.
    path = RESULTS / "gradnorm.json"
    entries = json.loads(path.read_text()).get("devices", {}) if path.exists() else {}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    entries[device.type] = {"args": vars(a), "rows": rows, "threads": torch.get_num_threads(), "gpu": gpu,
                            "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    md = ["# The gradient-norm pass against one read of the gradients", "",
          "The monitor's pass (`GradNorms.compute(total=True, per_param=True)`: gather the gradients, group them "
          "by device and dtype as clip_grad_norm_ does, `torch._foreach_norm` per group, stack, total norm) timed "
          "against one plain read of the same fp32 gradients (the floor: the faster of `torch._foreach_max` "
          "and `g.sum()` per tensor, each reading every element once and writing one scalar per tensor) and against the bare `torch._foreach_norm(grads, 2.0)`. Gradients: random, "
          "the shapes of the reference trainer's parameters for each preset (`gpt2`: 124M parameters in 148 "
          "tensors). Candidates interleaved, order rotated every repetition; times are medians, ratios medians of "
          "the per-repetition ratios. See benchmarks/gradnorm.py.", "",
          f"Target (issue 13): the monitor's pass <= {TARGET}x one read of the gradients (monitor / floor).", ""]
    if not any(e.get("gpu") for e in entries.values()):
        md += ["No GPU was lent to the session that measured these: the figures below are CPU ones (there the "
               "foreach ops loop over the tensors one by one); scripts/gpu-check.sh runs this benchmark with "
               "`--device cuda`, where `_foreach_max` and `_foreach_norm` are fused multi-tensor kernels.", ""]
    for name in sorted(entries):
        md += table(name, entries[name]) + [""]
    out = write_results("gradnorm", {"target": TARGET, "devices": entries}, "\n".join(md))
    print("\n".join(md))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
