"""What each extra parameter tensor adds to the monitor's host cost, depths measured alternately (issue 13).

hostcost.py measures its depths one after the other, minutes apart, and this VM's speed drifts by more in
that time than the 48-layer model adds over the 12-layer one. Here every round runs one fresh process per
depth, in turn, the order rotating each round; each makes hostcost.py's monitored run alone
(`hostcost.solo`, after the warm-up steps). The slope is the median over the rounds of each round's
difference divided by the extra tensors: drift moves both depths of a round alike.

The hooks' CPU is split in two: a typical step (the median step: no sampling in it) and the rest, the
uncommon steps amortised (every `collector.param_norms_every` steps the per-parameter norms, a pass over
every gradient; the attention probe's steps' bookkeeping; the interpreter's garbage collections). Work
that is done per parameter tensor on every step would show in the typical step's slope. A control runs
beside the hooks: a canary, constant work of the monitor's kind (straight-line Python through a dozen
small functions, and the two tensor ops of a typical step on CPU; nothing that depends on the model)
called at each optimizer step, where the monitor's own pre-step hook runs, and timed with the same
clock. How much slower it runs beside the deeper model is what the same constant code costs more in a
bigger step's company.

Usage: python benchmarks/hostcost_slope.py [--layers 12,48] [--rounds 6] [--checkout PATH]
Results: benchmarks/results/hostcost-slope.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import write_results  # noqa: E402
from hostcost_versions import commit, run_version  # noqa: E402

FIELDS = {"direct_us": "inside the hooks", "direct_typical_us": "hooks, typical step",
          "uncommon_us": "hooks, uncommon steps amortised", "publisher_cpu_us": "publisher CPU",
          "probe_us": "attention probe", "probe_each_us": "one probe (median)", "host_us": "**host us/step**",
          "canary_us": "canary (constant work)"}
TARGET = 0.1  # us per extra parameter tensor (issue 13)


class Canary:
    """Constant work of the monitor's kind, timed per call (thread CPU, less the clock's own cost): straight-line
    Python through a dozen small functions, each run once per call (a loop would run hot after its first
    pass), on a fixed state of its own, and the two tensor ops of a typical monitored step on CPU (a 0-dim
    loss detached, the step's values stacked)."""

    __slots__ = ("state", "times", "clock_cost", "names", "lrs", "micro", "last", "extra", "loss", "norm")

    def __init__(self, clock_cost: float) -> None:
        self.times: list[float] = []
        self.clock_cost = clock_cost
        self.names = ("loss", "grad_norm", "loss_scale", "found_inf")
        self.lrs = [1e-3, 2e-3]
        self.micro, self.last, self.extra = 0, None, {"a": 1.0, "b": 2.0}
        self.state: dict = {}
        self.loss, self.norm = torch.tensor(2.5), torch.tensor(1.5)

    def _layout(self) -> list:
        return [n for n in self.names if n != "found_inf"]

    def _lr_tags(self) -> list:
        return [f"lr:{i}" for i in range(len(self.lrs))]

    def _values(self, layout: list) -> dict:
        return {name: float(i) for i, name in enumerate(layout)}

    def _merge(self, values: dict, tags: list) -> dict:
        values.update(zip(tags, self.lrs))
        return values

    def _scalars(self) -> dict:
        return {k: v for k, v in self.extra.items() if isinstance(v, float)}

    def _count(self, values: dict) -> int:
        return sum(1 for v in values.values() if v == v)

    def _times(self) -> tuple:
        t = time.perf_counter()
        start = self.last if self.last is not None else t
        self.last = t
        return start, t - start

    def _record(self, values: dict, scalars: dict, n: int, times: tuple) -> tuple:
        return (self.micro, n, len(scalars), times[1], tuple(values))

    def _reset(self) -> None:
        self.state = {"losses": {}, "tokens": 0, "lrs": None}

    def __call__(self, optimizer, args, kwargs) -> None:
        t0 = time.thread_time()
        staged = torch.stack([self.loss.detach(), self.norm])
        values = self._merge(self._values(self._layout()), self._lr_tags())
        record = self._record(values, self._scalars(), self._count(values), self._times())
        self.micro = (self.micro + record[1] + staged.dim()) % 1000
        self._reset()
        self.times.append(time.thread_time() - t0 - self.clock_cost)


def child(a: argparse.Namespace) -> None:
    """One depth's solo run, with the canary beside the monitor's hooks."""
    import json
    import os
    import tempfile

    import hostcost
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    import monitor
    from monitor.trainer import TrainConfig

    torch.set_num_threads(1)
    reads = []
    for _ in range(20001):
        t = time.thread_time()
        reads.append(time.thread_time() - t)
    canary = Canary(statistics.median(reads))
    handle = register_optimizer_step_pre_hook(canary)  # every optimizer's step, outside the timed entry points
    cfg = TrainConfig.from_preset("tiny", n_layer=a.layers, max_steps=a.warmup + a.steps, **hostcost.TINY)
    try:
        with tempfile.TemporaryDirectory() as d:
            r = hostcost.solo(cfg, argparse.Namespace(warmup=a.warmup, steps=a.steps), Path(d))
    finally:
        handle.remove()
    r["host_us"] = r["direct_us"] + r["publisher_cpu_us"] + r["probe_us"]
    r["uncommon_us"] = r["direct_us"] - r["direct_typical_us"]
    r["canary_us"] = statistics.median(canary.times[-a.steps:]) * 1e6
    r["monitor"] = os.path.dirname(monitor.__file__)
    print(json.dumps(r))


def slopes(res: dict) -> dict[str, list[float]]:
    """Per field, each round's difference between the deepest and the shallowest depth per extra tensor."""
    depths = res["layers"]
    lo, hi = res["runs"][str(depths[0])], res["runs"][str(depths[-1])]
    out: dict[str, list[float]] = {f: [] for f in FIELDS}
    for a, b in zip(lo, hi):
        extra = b["param_tensors"] - a["param_tensors"]
        for f in FIELDS:
            out[f].append((b[f] - a[f]) / extra)
    return out


def ratios(res: dict) -> dict[str, list[float]]:
    """Per round, the deepest depth's typical hooks step and canary over the shallowest's."""
    depths = res["layers"]
    lo, hi = res["runs"][str(depths[0])], res["runs"][str(depths[-1])]
    return {f: [b[f] / a[f] for a, b in zip(lo, hi)] for f in ("direct_typical_us", "canary_us")}


def _cell(xs: list[float], unit: str, digits: int) -> str:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return f"{statistics.median(xs):.{digits}f}{unit} ({q[0]:.{digits}f} .. {q[2]:.{digits}f})"


def render(res: dict) -> str:
    md = ["# Host cost per extra parameter tensor, depths measured alternately (host-bound proxy, CPU)", "",
          (__doc__ or "").split("\n\n")[1].replace("\n", " "), "",
          (__doc__ or "").split("\n\n")[2].replace("\n", " "), "",
          f"{res['rounds']} rounds, {res['steps']} measured steps after {res['warmup']} warm-up steps per run, "
          f"torch threads 1, the monitor of `{res['version']}`; {res['date']}.", "",
          "| layers | param tensors | " + " | ".join(FIELDS.values()) + " |", "|---|---|" + "---|" * len(FIELDS)]
    for layers in res["layers"]:
        runs = res["runs"][str(layers)]
        md.append(f"| {layers} | {runs[0]['param_tensors']} | "
                  + " | ".join(_cell([r[f] for r in runs], " us", 0) for f in FIELDS) + " |")
    per = slopes(res)
    md.append("| **per extra tensor** | | " + " | ".join(_cell(per[f], "", 3) for f in FIELDS) + " |")
    typical, total = statistics.median(per["direct_typical_us"]), statistics.median(per["host_us"])
    rat = ratios(res)
    own = statistics.median(t / c for t, c in zip(rat["direct_typical_us"], rat["canary_us"]))
    deep, shallow = res["layers"][-1], res["layers"][0]
    md += ["", "Medians with the interquartile range over the rounds in brackets; the last row in us per step "
           f"per extra parameter tensor. Target: <= {TARGET} us per extra tensor. The hooks' typical step grows "
           f"{typical:+.3f} us per tensor ({'within' if typical <= TARGET else 'over'} it); everything together "
           f"{total:+.3f} ({'within' if total <= TARGET else 'over'} it).", "",
           f"At {deep} layers against {shallow}, per round: the hooks' typical step takes "
           f"{_cell(rat['direct_typical_us'], 'x', 2)} as long, the canary {_cell(rat['canary_us'], 'x', 2)}; "
           f"the hooks' ratio over the canary's: {own:.2f}x. A typical step's work does not depend on the number "
           "of tensors (tests/test_hostpath.py counts its ops); where the canary slows down alike, what the "
           "hooks grow by is constant Python running colder beside a larger step, which fewer instructions "
           "reduce and nothing per tensor does. The publisher's growth is its company: on its own it grows "
           "~0.02 us per tensor (publisher-interference.md). The probe is a share of the step time "
           "(`attention.budget`), which grows with the depth."]
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="12,48", help="comma-separated depths; the first and last give the slope")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=200, help="steps before measuring (the rules' windows fill)")
    ap.add_argument("--checkout", default=str(HERE.parent), help="the checkout whose `monitor` is measured")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(argparse.Namespace(layers=int(a.layers), steps=a.steps, warmup=a.warmup))
        return
    depths = [int(x) for x in a.layers.split(",")]
    if len(depths) < 2:
        ap.error("give at least two depths")
    runs: dict[str, list[dict]] = {str(d): [] for d in depths}
    for k in range(a.rounds):
        for d in depths[k % len(depths):] + depths[:k % len(depths)]:
            r = run_version(a.checkout, argparse.Namespace(layers=d, steps=a.steps, warmup=a.warmup), __file__)
            runs[str(d)].append(r)
            print(f"round {k + 1}/{a.rounds}, {d} layers: hooks {r['direct_us']:.0f} us (typical step "
                  f"{r['direct_typical_us']:.0f}), canary {r['canary_us']:.1f} us, publisher "
                  f"{r['publisher_cpu_us']:.0f} us, probe {r['probe_us']:.0f} us", flush=True)
    res = {"rounds": a.rounds, "layers": depths, "steps": a.steps, "warmup": a.warmup,
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "version": commit(a.checkout), "runs": runs}
    text = render(res)
    out = write_results("hostcost-slope", res, text)
    print(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
