"""Per-step overhead of the monitor on the reference trainer (default: the `small` preset on CPU).

Design: identical copies of the run (same model, optimizer, scaler, scheduler and data) live in
one process, one unmonitored and one per monitor configuration. They take optimizer steps in
turn, the order rotating every round, so a shared machine's drift (other tenants, frequency
changes) hits every configuration alike; each step is timed and compared with the unmonitored
step of the same round. Reported: the median of those paired ratios, and the median step times.
Target (issue 2): defaults add at most 1% per-step time on `small`.
The loop is the trainer's (nanoGPT shape: accumulation, GradScaler, unscale_, clip, step).
Results: benchmarks/results/overhead-<preset>-<device>.{json,md}.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402
from _paired import arguments, run_paired  # noqa: E402

CONFIGS = {
    "defaults": {},
    "no per-param norms": {"collector": {"param_norms_every": 0}},
    "no attention probe": {"attention": {"enabled": False}},
    # What the hooks cost with the least publisher work: where the step is bound by the host (small
    # models on a GPU), the publisher thread's Python competes with the training thread for the GIL.
    "hooks + rules only": {"collector": {"param_norms_every": 0}, "attention": {"enabled": False},
                           "tensorboard": {"enabled": False}, "metrics": {"enabled": False}},
}


def main() -> None:
    a = arguments(__doc__.splitlines()[0])
    cfg, times, infos = run_paired(a, CONFIGS)
    names = list(times)
    base = statistics.median(times["off"])
    rows = []
    for name in names:
        ratios = [t / o for t, o in zip(times[name], times["off"])]
        rows.append({"config": name, "median_step_ms": statistics.median(times[name]) * 1e3,
                     "median_paired_ratio": statistics.median(ratios),
                     "ratio_p25": statistics.quantiles(ratios, n=4)[0], "ratio_p75": statistics.quantiles(ratios, n=4)[2],
                     "median_ratio_of_medians": statistics.median(times[name]) / base})
    compiled = " (torch.compile, inductor, compiled after attach)" if a.compile else ""
    md = [
        "# Monitor overhead per optimizer step" + compiled,
        "",
        f"Preset `{a.preset}` ({cfg.precision}) on {a.device}{compiled}, {a.steps} measured steps per configuration after "
        f"{a.warmup} warm-up steps; identical runs in one process taking steps in turn (rotating order), each "
        "step paired with the unmonitored step of its round.",
        "",
        "| config | median step | median paired ratio | ratio IQR | ratio of medians |",
        "|---|---|---|---|---|",
    ]
    md += [f"| {r['config']} | {r['median_step_ms']:.2f} ms | {(r['median_paired_ratio'] - 1) * 100:+.2f}% | "
           f"{(r['ratio_p25'] - 1) * 100:+.2f}% .. {(r['ratio_p75'] - 1) * 100:+.2f}% | "
           f"{(r['median_ratio_of_medians'] - 1) * 100:+.2f}% |" for r in rows]
    probe = infos["defaults"].get("attention_probe") or {}
    md += ["", "Target: defaults add at most 1% per-step time on `small` (CPU)."]
    if probe.get("enabled"):
        md += ["", f"The attention probe in `defaults` kept interval {probe.get('every')}: each run here takes its "
               "steps in turn with the others, so its clock sees a whole round as one step and its budget stretches "
               f"the interval less than a run alone would (`attention-{a.preset}-{a.device}.md` gives that interval)."]
    text = "\n".join(md) + "\n"
    if a.compile:
        md += ["", f"Attention probe: {probe.get('off', 'on')}."]
        text = "\n".join(md) + "\n"
    path = write_results(f"overhead-{a.preset}-{a.device}{'-compiled' if a.compile else ''}",
                         {"args": vars(a), "rows": rows}, text)
    print(text)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
