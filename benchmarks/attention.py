"""Cost of the attention probe: on a sampled step, and amortised over the run (issue 6).

Design (as benchmarks/overhead.py): identical copies of the reference run live in one process and
take optimizer steps in turn, the order rotating every round; each step is paired with the
unmonitored step of its round. Configurations:

- `probe off`: the monitor with `attention.enabled: false` (everything else at defaults);
- `probe every step`: `attention.every: 1` with an unlimited budget, so every step is a sampled step;
- `defaults`: the probe at its defaults (every 10 steps, 1% budget, the interval the budget keeps).

Reported: the sampled-step cost (median paired difference `probe every step` - `probe off`, in ms
and as a share of the unmonitored step), the amortised cost (that difference divided by the
interval `defaults` ended with), and the probe's own measurement of itself (run.json) beside it.
Results: benchmarks/results/attention-<preset>-<device>.{json,md}.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402
from _paired import arguments, run_paired  # noqa: E402

CONFIGS = {
    "probe off": {"attention": {"enabled": False}},
    "probe every step": {"attention": {"every": 1, "budget": 1.0}},
    "defaults": {},
}


def main() -> None:
    a = arguments(__doc__.splitlines()[0])
    cfg, times, infos = run_paired(a, CONFIGS)
    names = list(times)
    probe = {name: info.get("attention_probe") or {} for name, info in infos.items()}
    off = times["off"]
    base = statistics.median(off)
    diff = {n: [t - o for t, o in zip(times[n], off)] for n in CONFIGS}
    sampled = statistics.median([p - q for p, q in zip(times["probe every step"], times["probe off"])])
    every = probe["defaults"].get("every") or 10
    own = probe["probe every step"].get("median_cost_seconds")
    rows = [{"config": n, "median_step_ms": statistics.median(times[n]) * 1e3,
             "median_paired_diff_ms": statistics.median(diff[n]) * 1e3 if n in diff else 0.0,
             "mean_paired_diff_ms": statistics.fmean(diff[n]) * 1e3 if n in diff else 0.0,
             "mean_paired_diff_se_ms": statistics.stdev(diff[n]) / len(diff[n]) ** 0.5 * 1e3 if n in diff else 0.0,
             "probe": probe.get(n)} for n in names]
    result = {"sampled_step_cost_ms": sampled * 1e3, "sampled_step_share": sampled / base,
              "defaults_interval": every, "amortised_cost_ms": sampled / every * 1e3,
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
        f"- **Amortised** at the interval the defaults kept ({every} steps): {result['amortised_cost_ms']:.3f} ms per "
        f"step, {result['amortised_share'] * 100:.3f}% (budget: 1%).",
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
