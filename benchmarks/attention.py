"""Cost of the attention probe: on a sampled step, and amortised over the run (issue 6).

Design (as benchmarks/overhead.py): identical copies of the reference run live in one process and
take optimizer steps in turn, the order rotating every round; each step is paired with the
unmonitored step of its round. Configurations:

- `probe off`: the monitor with `attention.enabled: false` (everything else at defaults);
- `probe every step`: `attention.every: 1` with an unlimited budget, so every step is a sampled step;
- `defaults`: the probe at its defaults (every 10 steps, `attention.budget`, the interval the budget keeps).

Reported: the sampled-step cost (median paired difference `probe every step` - `probe off`, in ms
and as a share of the unmonitored step), the amortised cost (that difference divided by the
probe interval), and the probe's own measurement of itself (run.json) beside it.

The interval: the runs here take steps in turn, so each monitor's clock sees a step last as long as
a whole round (every configuration's step), and its budget stretches the interval too little. The
amortised cost is therefore given at the interval a run alone would keep: the probe's schedule fed
the unmonitored step time and the measured sampled-step cost. The interval `defaults` kept here is
shown beside it.
Results: benchmarks/results/attention-<preset>-<device>.{json,md}.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402
from _paired import arguments, run_paired  # noqa: E402

from monitor.config import AttentionConfig  # noqa: E402
from monitor.hooks.attention import ProbeSchedule  # noqa: E402

CONFIGS = {
    "probe off": {"attention": {"enabled": False}},
    "probe every step": {"attention": {"every": 1, "budget": 1.0}},
    "defaults": {},
}


def standalone_interval(step_seconds: float, cost: float) -> int:
    """The interval the default schedule settles on for a run whose steps take `step_seconds` and
    whose sampled steps cost `cost` more."""
    d = AttentionConfig()
    schedule = ProbeSchedule(d.every, d.max_every, d.budget)
    schedule.plain_step(step_seconds)
    for step in range(0, 100 * d.max_every, d.every):
        if schedule.due(step):
            before = schedule.every
            schedule.probed(step, cost)
            if schedule.every == before and schedule.samples > 1:
                break
    return schedule.every


def main() -> None:
    a = arguments(__doc__.splitlines()[0])
    cfg, times, infos = run_paired(a, CONFIGS)
    names = list(times)
    probe = {name: info.get("attention_probe") or {} for name, info in infos.items()}
    off = times["off"]
    base = statistics.median(off)
    diff = {n: [t - o for t, o in zip(times[n], off)] for n in CONFIGS}
    sampled = statistics.median([p - q for p, q in zip(times["probe every step"], times["probe off"])])
    every = standalone_interval(base, sampled)
    kept = probe["defaults"].get("every")
    own = probe["probe every step"].get("median_cost_seconds")
    rows = [{"config": n, "median_step_ms": statistics.median(times[n]) * 1e3,
             "median_paired_diff_ms": statistics.median(diff[n]) * 1e3 if n in diff else 0.0,
             "mean_paired_diff_ms": statistics.fmean(diff[n]) * 1e3 if n in diff else 0.0,
             "mean_paired_diff_se_ms": statistics.stdev(diff[n]) / len(diff[n]) ** 0.5 * 1e3 if n in diff else 0.0,
             "probe": probe.get(n)} for n in names]
    result = {"sampled_step_cost_ms": sampled * 1e3, "sampled_step_share": sampled / base,
              "defaults_interval": every, "interleaved_interval": kept, "amortised_cost_ms": sampled / every * 1e3,
              "amortised_share": sampled / every / base,
              "probe_own_median_cost_ms": own * 1e3 if own is not None else None}
    md = [
        "# Attention probe cost",
        "",
        f"Preset `{a.preset}` ({cfg.precision}, {cfg.n_layer} layers, batch {cfg.batch_size} x {cfg.block_size}) on "
        f"{a.device}, {a.steps} measured steps per configuration after {a.warmup} warm-up steps; identical runs in "
        "one process taking steps in turn (rotating order), each step paired with the unmonitored step of its round.",
        "",
        "| config | median step | median paired diff | mean paired diff ± s.e. | probe interval | probe's own cost (median) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["probe"] or {}
        cost = p.get("median_cost_seconds")
        md.append(f"| {r['config']} | {r['median_step_ms']:.2f} ms | {r['median_paired_diff_ms']:+.2f} ms | "
                  f"{r['mean_paired_diff_ms']:+.2f} ± {r['mean_paired_diff_se_ms']:.2f} ms | {p.get('every', '-') if p.get('enabled') else '-'} | "
                  f"{f'{cost * 1e3:.2f} ms' if cost is not None and p.get('enabled') else '-'} |")
    md += [
        "",
        f"- **Sampled step**: +{result['sampled_step_cost_ms']:.2f} ms, {result['sampled_step_share'] * 100:.2f}% of "
        f"the unmonitored step (median paired difference, probe every step vs probe off).",
        f"- **Amortised** at the interval a run alone keeps with the defaults ({every} steps: the probe's schedule "
        f"fed the unmonitored step and the sampled-step cost): {result['amortised_cost_ms']:.3f} ms per step, "
        f"{result['amortised_share'] * 100:.3f}% (budget: {AttentionConfig().budget:.2%}). The `defaults` run here kept "
        f"{kept}: its clock sees "
        "a whole round of interleaved steps as one step.",
        f"- The probe's own measurement of a sampled step: "
        f"{result['probe_own_median_cost_ms']:.2f} ms (run.json `attention_probe.median_cost_seconds`)."
        if own is not None else "- The probe reported no cost.",
        "- The mean paired differences include the sampled steps; their standard errors show how much of the "
        "gap between `defaults` and `probe off` this machine's noise can explain.",
    ]
    text = "\n".join(md) + "\n"
    path = write_results(f"attention-{a.preset}-{a.device}", {"args": vars(a), "rows": rows, **result}, text)
    print(text)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
