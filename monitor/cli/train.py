"""`monitor train` and `monitor demo`: the reference trainer from the command line."""

from __future__ import annotations

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

    try:
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
