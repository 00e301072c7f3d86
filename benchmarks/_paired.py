"""Paired per-step timing of monitor configurations against an unmonitored run (overhead.py, attention.py).

Identical copies of the reference run (same model, optimizer, scaler, scheduler and data) live in
one process: one unmonitored ("off") and one per monitor configuration. They take optimizer steps
in turn, the order rotating every round, so a shared machine's drift (other tenants, frequency
changes) hits every configuration alike; each step is timed. The loop is the trainer's (nanoGPT
shape: accumulation, GradScaler, unscale_, clip, step).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import monitor
from monitor.trainer import TrainConfig
from monitor.trainer.loop import _Run


def arguments(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=150, help="measured optimizer steps per configuration")
    ap.add_argument("--warmup", type=int, default=5, help="unmeasured steps first")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile every run's model after attach (nanoGPT's order); results get a -compiled suffix")
    ap.add_argument("--configs", default="", help="comma-separated subset of the configurations (default: all)")
    return ap.parse_args()


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


def setup(preset: str, max_steps: int, device_name: str) -> tuple[TrainConfig, torch.device, Callable, Callable]:
    """(train config, device, autocast() context factory, sync()) for timing the reference run."""
    cfg = TrainConfig.from_preset(preset, max_steps=max_steps, device=device_name)
    device = torch.device(device_name)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(device.type, enabled=False)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()  # benchmarks only: step boundaries must be real on the device

    return cfg, device, autocast, sync


def run_paired(a: argparse.Namespace, configs: dict[str, dict]) -> tuple[TrainConfig, dict[str, list[float]],
                                                                        dict[str, dict]]:
    """(train config, step times per configuration with "off" first, run.json of each monitored run)."""
    cfg, device, autocast, sync = setup(a.preset, a.steps + a.warmup, a.device)
    if a.configs:
        configs = {k: v for k, v in configs.items() if k in a.configs.split(",")}
    names = ["off", *configs]
    runs = {name: _Run(cfg, device) for name in names}
    tmp = tempfile.TemporaryDirectory()
    dirs = {name: Path(tmp.name) / name.replace(" ", "-") for name in configs}
    mons = {
        name: monitor.attach(runs[name].model, runs[name].optimizer, scaler=runs[name].scaler,
                             scheduler=runs[name].scheduler, run_dir=dirs[name], max_steps=cfg.max_steps,
                             config={"metrics": {"port": 0}, "console": {"enabled": False}, **configs[name]})
        for name in configs
    }
    if a.compile:  # after attach, as nanoGPT compiles after building its optimizer; compiled by the warm-up steps
        for run in runs.values():
            run.model = torch.compile(run.model)
    times: dict[str, list[float]] = {n: [] for n in names}
    infos: dict[str, dict] = {}
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
        for name, d in dirs.items():
            infos[name] = json.loads((d / "run.json").read_text())
        tmp.cleanup()
    for name, m in mons.items():
        assert m.internal_errors == 0 and m.dropped_records == 0, name
    return cfg, times, infos
