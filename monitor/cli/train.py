"""`monitor train` and `monitor demo`: the reference trainer from the command line.

`monitor train --nproc N` (N > 1) does not train itself: it validates the config, picks the run
directory, and runs torchrun with N copies of `monitor train --resolved-config JSON --run-dir DIR`,
so that every rank trains exactly the parent's config into one shared run directory.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE pairs; values are parsed as YAML scalars (numbers, booleans, lists)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(raw)
    return out


def build_config(preset: str, overrides: dict[str, Any]):
    from monitor.trainer import TrainConfig

    try:
        return TrainConfig.from_preset(preset, **{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        lines = [f"  {'.'.join(str(p) for p in err['loc']) or '(config)'}: {err['msg']}" for err in e.errors()]
        raise ValueError("invalid training config:\n" + "\n".join(lines)) from None


def config_from_json(text: str):
    """The TrainConfig a launching parent resolved (--resolved-config), validated again."""
    from monitor.trainer import TrainConfig

    try:
        return TrainConfig.model_validate_json(text)
    except ValidationError as e:
        raise ValueError(f"invalid --resolved-config: {e}") from None


def check_launch(cfg, nproc: int) -> None:
    """ValueError, before anything starts, for what would fail (or hang) only once the ranks run."""
    from monitor.trainer.faults import check_world, parse_faults
    from monitor.trainer.launch import env_world_size, under_torchrun

    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    if nproc > 1 and under_torchrun():
        raise ValueError("--nproc launches torchrun; this process already is a torchrun rank (drop --nproc)")
    world = nproc if nproc > 1 else env_world_size()
    check_world(parse_faults(cfg.faults), world)
    if cfg.checkpoint_dir:  # a file in the way: found now, not at the first checkpoint, after training
        path = Path(cfg.checkpoint_dir)
        there = next(d for d in (path, *path.parents) if d.exists())
        if not there.is_dir():
            raise ValueError(f"--checkpoint-dir {path}: {there} is not a directory")
        if not os.access(there, os.W_OK | os.X_OK):
            raise ValueError(f"--checkpoint-dir {path}: {there} is not writable")
    if cfg.ddp_backend == "nccl" and not cfg.device.startswith("cuda"):
        raise ValueError("--ddp-backend nccl needs --device cuda; gloo runs on CPU")
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"device {cfg.device!r} requested but CUDA is not available")
        gpus = torch.cuda.device_count()
        if nproc > 1 and cfg.ddp_backend != "gloo" and (":" in cfg.device or nproc > gpus):
            raise ValueError(f"nccl needs one GPU per rank: {nproc} ranks on "
                             f"{'one chosen GPU' if ':' in cfg.device else f'{gpus} GPU(s)'}; "
                             "add --ddp-backend gloo to share GPUs between ranks")


def launch_ranks(cfg, *, nproc: int, run_dir: Path | None, config_path: Path | None, no_monitor: bool,
                 progress: bool) -> int:
    """Run `nproc` ranks of this training under torchrun, all in one run directory; their exit code."""
    from monitor.runlog.rundir import default_run_dir
    from monitor.trainer.launch import run_torchrun, torchrun_command, torchrun_env

    args = ["-m", "monitor.cli.app", "train", "--resolved-config", cfg.model_dump_json()]
    extra: dict[str, str] = {}
    where = ""
    if no_monitor:
        args.append("--no-monitor")
    else:
        # One name for every rank, chosen here: ranks starting a second apart would pick different ones.
        shared = Path(run_dir) if run_dir is not None else default_run_dir()
        args += ["--run-dir", str(shared)]
        extra["MONITOR_RUN_DIR"] = str(shared)
        if config_path is not None:
            args += ["--config", str(config_path)]
        where = f"; run dir {shared}"
    if not progress:
        args.append("--no-progress")
    typer.echo(f"trainmon: launching {nproc} ranks with torchrun{where}", err=True)
    return run_torchrun(torchrun_command(nproc, args), torchrun_env(nproc, extra))


def execute(cfg, *, run_dir: Path | None, monitor_config: Any, no_monitor: bool, progress: bool) -> int:
    """Train in this process (one rank under torchrun); print where to look (rank 0); the exit code."""
    from monitor.trainer.launch import under_torchrun

    rank = int(os.environ.get("RANK", "0") or 0) if under_torchrun() else 0
    if no_monitor:
        from monitor.trainer import train as train_fn

        train_fn(cfg, attach_monitor=False, progress=progress)
        return 0
    import monitor

    try:
        _, url, halted, mon = run_training(cfg, run_dir=run_dir, monitor_config=monitor_config, progress=progress,
                                           announce=rank == 0)
    except monitor.RunDirError as e:  # unwritable, or another live process writes it
        typer.echo(f"error: {e}", err=True)
        return 2
    if halted:
        typer.echo(f"rank {rank}: {halted}" if under_torchrun() else halted, err=True)
    mon_dir = mon.run_dir if mon else run_dir
    if mon_dir is not None and rank == 0:
        typer.echo(where_to_look(Path(mon_dir), url, len(mon.alerts) if mon else 0))
    return 1 if halted else 0


def list_faults() -> str:
    import textwrap

    from monitor.trainer import FAULTS

    out = []
    for spec in FAULTS.values():
        out.append(spec.usage)
        out.append(textwrap.indent(textwrap.fill(spec.doc, 96), "    "))
    return "\n".join(out)


def run_training(cfg, *, run_dir: Path | None, monitor_config: Any, progress: bool, linger: float = 0.0,
                 announce: bool = True):
    """Train and return (result, the monitor's metrics URL, halted alert line or None)."""
    import monitor
    from monitor.trainer import train

    seen: dict[str, Any] = {}

    def on_attach(mon) -> None:
        seen["url"] = mon.metrics_url
        seen["mon"] = mon
        if announce:
            typer.echo(f"trainmon: run dir {mon.run_dir}; metrics {mon.metrics_url or '(disabled)'}", err=True)

    def on_step(info) -> bool:
        if linger > 0 and info.step == cfg.max_steps - 1 and seen.get("url"):
            typer.echo(f"trainmon: serving {seen['url']} for {linger:.0f} s more (Ctrl-C to stop)", err=True)
            try:
                time.sleep(linger)
            except KeyboardInterrupt:
                pass
        return False

    from monitor.exporters.console import to_terminal

    try:
        with to_terminal():
            result = train(cfg, run_dir=run_dir, monitor_config=monitor_config, progress=progress,
                           on_step=on_step, on_attach=on_attach)
    except monitor.TrainingHalted as e:
        a = e.alert
        line = f"Training halted by trainmon after {a.rule} at step {a.step} (halt_on: {a.severity.value})."
        return None, seen.get("url"), line, seen.get("mon")
    return result, seen.get("url"), None, seen.get("mon")


def where_to_look(run_dir: Path, url: str | None, n_alerts: int) -> str:
    lines = [
        "",
        "Where to look:",
        f"  run dir      {run_dir}",
        f"  alerts       {run_dir / 'alerts.jsonl'}  ({n_alerts} raised; replay them: monitor check {run_dir})",
    ]
    if url:
        lines.append(f"  metrics      {url}  (served while the run was live; --linger SECONDS keeps it up after)")
    lines.append(f"  tensorboard  tensorboard --logdir {run_dir}")
    return "\n".join(lines)
