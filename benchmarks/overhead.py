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

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

import monitor  # noqa: E402
from monitor.trainer import TrainConfig  # noqa: E402
from monitor.trainer.loop import _Run  # noqa: E402

CONFIGS = {
    "defaults": {},
    "no per-param norms": {"collector": {"param_norms_every": 0}},
}


def one_step(run: _Run, step: int, autocast) -> None:
    cfg = run.cfg
    for micro in range(cfg.grad_accum):
        x, y = run.data.batch(step * cfg.grad_accum + micro)
        with autocast():
            _, loss = run.model(x, y)
            loss = loss / cfg.grad_accum
        run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=150, help="measured optimizer steps per configuration")
    ap.add_argument("--warmup", type=int, default=5, help="unmeasured steps first")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    cfg = TrainConfig.from_preset(a.preset, max_steps=a.steps + a.warmup, device=a.device)
    device = torch.device(a.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(device.type, enabled=False)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()  # benchmark only: step boundaries must be real on the device

    names = ["off", *CONFIGS]
    runs = {name: _Run(cfg, device) for name in names}
    tmp = tempfile.TemporaryDirectory()
    mons = {
        name: monitor.attach(runs[name].model, runs[name].optimizer, scaler=runs[name].scaler,
                             scheduler=runs[name].scheduler, run_dir=Path(tmp.name) / name, max_steps=cfg.max_steps,
                             config={"metrics": {"port": 0}, "console": {"enabled": False}, **CONFIGS[name]})
        for name in CONFIGS
    }
    times: dict[str, list[float]] = {n: [] for n in names}
    try:
        for step in range(a.warmup + a.steps):
            order = names[step % len(names):] + names[:step % len(names)]
            for name in order:
                sync()
                t0 = time.perf_counter()
                one_step(runs[name], step, autocast)
                sync()
                if step >= a.warmup:
                    times[name].append(time.perf_counter() - t0)
            if step % 25 == 0:
                print(f"step {step}/{a.warmup + a.steps}: " + ", ".join(
                    f"{n} {times[n][-1] * 1e3:.1f} ms" for n in names if times[n]), flush=True)
    finally:
        for m in mons.values():
            m.close()
        tmp.cleanup()
    for name, m in mons.items():
        assert m.internal_errors == 0 and m.dropped_records == 0, name
    base = statistics.median(times["off"])
    rows = []
    for name in names:
        ratios = [t / o for t, o in zip(times[name], times["off"])]
        rows.append({"config": name, "median_step_ms": statistics.median(times[name]) * 1e3,
                     "median_paired_ratio": statistics.median(ratios),
                     "ratio_p25": statistics.quantiles(ratios, n=4)[0], "ratio_p75": statistics.quantiles(ratios, n=4)[2],
                     "median_ratio_of_medians": statistics.median(times[name]) / base})
    md = [
        "# Monitor overhead per optimizer step",
        "",
        f"Preset `{a.preset}` ({cfg.precision}) on {a.device}, {a.steps} measured steps per configuration after "
        f"{a.warmup} warm-up steps; identical runs in one process taking steps in turn (rotating order), each "
        "step paired with the unmonitored step of its round.",
        "",
        "| config | median step | median paired ratio | ratio IQR | ratio of medians |",
        "|---|---|---|---|---|",
    ]
    md += [f"| {r['config']} | {r['median_step_ms']:.2f} ms | {(r['median_paired_ratio'] - 1) * 100:+.2f}% | "
           f"{(r['ratio_p25'] - 1) * 100:+.2f}% .. {(r['ratio_p75'] - 1) * 100:+.2f}% | "
           f"{(r['median_ratio_of_medians'] - 1) * 100:+.2f}% |" for r in rows]
    md += ["", "Target: defaults add at most 1% per-step time on `small` (CPU)."]
    text = "\n".join(md) + "\n"
    path = write_results(f"overhead-{a.preset}-{a.device}", {"args": vars(a), "rows": rows}, text)
    print(text)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
