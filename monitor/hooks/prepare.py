"""Before a monitor starts: its arguments checked, an earlier monitor of the same model closed, the run
directory agreed on, the run's facts (RunInfo)."""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from monitor.config import MonitorConfig
from monitor.hooks import ddp, introspect, resolve
from monitor.runlog.rundir import default_run_dir
from monitor.schema import Attempt, RunInfo

log = logging.getLogger("trainmon")

# Monitors not yet closed: a second attach to the same model or optimizer (a re-run notebook cell)
# closes the first, whose hooks would otherwise see every step twice.
LIVE: weakref.WeakSet[Any] = weakref.WeakSet()


def check_args(model, optimizer, scaler, scheduler, loss_fn, run_dir, config, max_steps, resume_step=None) -> None:
    """TypeError or ValueError naming the first wrong argument of `attach`."""
    def bad(name: str, want: str, got: Any) -> TypeError:
        return TypeError(f"monitor.attach: `{name}` must be {want}, got {type(got).__name__}")

    if not isinstance(model, torch.nn.Module):
        raise bad("model", "a torch.nn.Module", model)
    resolve.check_not_deepspeed(model, optimizer)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise bad("optimizer", "a torch.optim.Optimizer", optimizer)
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise bad("scaler", "a torch.amp.GradScaler or None", scaler)
    if scheduler is not None and (isinstance(scheduler, torch.optim.Optimizer)
                                  or not callable(getattr(scheduler, "step", None))):
        raise bad("scheduler", "an LR scheduler (an object with a step() method) or None", scheduler)
    if loss_fn is not None and not isinstance(loss_fn, torch.nn.Module):
        raise bad("loss_fn", "a torch.nn.Module (e.g. nn.CrossEntropyLoss()) or None", loss_fn)
    if run_dir is not None and not isinstance(run_dir, (str, os.PathLike)):
        raise bad("run_dir", "a path (str or os.PathLike) or None", run_dir)
    if run_dir is not None and "\0" in str(os.fspath(run_dir)):
        raise ValueError(f"monitor.attach: `run_dir` holds a NUL byte, which no path can: {str(run_dir)!r}")
    if run_dir is not None and not str(os.fspath(run_dir)):
        # Path("") is the working directory: the run's files would land among the user's own.
        raise ValueError(f"monitor.attach: `run_dir` is empty ({str(run_dir)!r}); pass a directory, or None for "
                         "a new one under runs/")
    if config is not None and not isinstance(config, (MonitorConfig, Mapping, str, os.PathLike)):
        raise bad("config", "a MonitorConfig, a dict, a YAML/TOML path or None", config)
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)):
        raise bad("max_steps", "an int or None", max_steps)
    if max_steps is not None and max_steps <= 0:
        raise ValueError(f"monitor.attach: `max_steps` must be positive, got {max_steps}")
    if resume_step is not None and (isinstance(resume_step, bool) or not isinstance(resume_step, int)):
        raise bad("resume_step", "an int or None", resume_step)
    if resume_step is not None and resume_step < 0:
        raise ValueError(f"monitor.attach: `resume_step` must be >= 0, got {resume_step}")
    if not any(True for g in optimizer.param_groups for _ in g["params"]):
        raise ValueError("monitor.attach: `optimizer` has no parameters")
    owned = {id(p) for p in model.parameters()}
    if not any(id(p) in owned for p in introspect.optimizer_params(optimizer)):
        # A notebook's new model with the old optimizer: nothing the loop computes reaches the optimizer.
        raise ValueError(f"monitor.attach: none of the parameters of `optimizer` ({type(optimizer).__name__}) is a "
                         f"parameter of `model` ({type(model).__name__}); pass the model the optimizer trains")


def replace_earlier(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Close a live monitor of this model or optimizer, saying so."""
    inner = introspect.unwrap(model)
    for other in list(LIVE):
        c = other._collector
        if other._closed or c is None:
            continue
        if c.optimizer is optimizer or introspect.unwrap(c.model) is inner:
            log.warning("trainmon: this model or optimizer already had a monitor (run dir %s); it is closed and "
                        "replaced by the new one", other.run_dir)
            other.close()


def replace_writer_of(run_dir: Path) -> None:
    """Close a live monitor of this process that writes the same run directory (a notebook cell run
    again with a new model), saying so: one process, one attempt at a time."""
    try:
        target = run_dir.resolve()
    except OSError:
        return
    for other in list(LIVE):
        if other._closed:
            continue
        try:
            same = other.run_dir.resolve() == target
        except OSError:
            continue
        if same:
            log.warning("trainmon: a monitor of this process already writes %s; it is closed and replaced by the "
                        "new one", run_dir)
            other.close()


def probe_allowed(model: torch.nn.Module, cfg: MonitorConfig) -> tuple[bool, str | None]:
    """Whether the attention probe may intercept attention in this model's forward."""
    if not cfg.attention.enabled:
        return False, "attention.enabled is false"
    # torch.compile's OptimizedModule holds the original as submodule `_orig_mod` (checked by name:
    # importing torch._dynamo to test the type would slow down every attach).
    if any("_orig_mod" in m._modules for m in model.modules()):
        # A mode around a compiled graph would make dynamo recompile; report with observe_attention.
        return False, "compiled model: report attention with mon.observe_attention"
    return True, None


def agree_on_run_dir(run_dir: str | os.PathLike[str] | None, dist: introspect.DistInfo, store: Any,
                     runs_root: str | os.PathLike[str] | None) -> Path:
    if run_dir is not None:
        return Path(run_dir)
    if runs_root is not None and not isinstance(runs_root, (str, os.PathLike)):
        raise TypeError(f"monitor.attach: `runs_root` must be a path (str or os.PathLike) or None, got "
                        f"{type(runs_root).__name__}")
    path = default_run_dir(parent=runs_root)
    if dist.world_size > 1 and store is not None and "MONITOR_RUN_DIR" not in os.environ:
        # Ranks start at slightly different times: rank 0's name wins, through the job's store (no
        # collective: a rank that does not attach the monitor cannot make the others wait forever).
        path = Path(ddp.agree_on_name(store, dist.rank, str(path)))
    return path


def scaler_info(scaler: torch.amp.GradScaler | None) -> dict[str, Any] | None:
    if scaler is None:
        return None
    enabled = scaler.is_enabled()
    info: dict[str, Any] = {"enabled": enabled}
    if enabled:
        info.update(init_scale=scaler._init_scale, growth_factor=scaler._growth_factor,
                    backoff_factor=scaler._backoff_factor, growth_interval=scaler._growth_interval)
    return info


def run_info(run_id: str, cfg: MonitorConfig, *, world_size: int, model: torch.nn.Module,
             optimizer: torch.optim.Optimizer, scaler: Any, scheduler: Any, params: list[torch.Tensor],
             names: list[str], attempt: Attempt, prior: RunInfo | None, max_steps: int | None) -> RunInfo:
    """The run's facts for run.json and the rules (preflight checks among them). The start step is
    where the records the attempt builds on begin (a resume keeps the run's start, and the schedule
    read at that start: a resumed scheduler cannot be previewed from its first step)."""
    from monitor import __version__

    start_step = attempt.lineage_start
    if attempt.kind == "resumed" and prior is not None and attempt.lineage_start < attempt.start_step:
        schedule = prior.schedule
    else:
        schedule = introspect.schedule_preview(scheduler, max_steps) if attempt.start_step == 0 else None
    return RunInfo(
        run_id=run_id,
        hostname=introspect.hostname(),
        world_size=world_size,
        max_steps=max_steps,
        start_step=start_step,
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        trainmon_version=__version__,
        device=str(params[0].device),
        model=introspect.model_info(model, names),
        optimizer=introspect.optimizer_info(optimizer, dict(zip(map(id, params), names))),
        scaler=scaler_info(scaler),
        scheduler=type(scheduler).__name__ if scheduler is not None else None,
        schedule=schedule,
        config=cfg.model_dump(mode="json"),
        attempts=[*(prior.attempts if prior is not None else []), attempt],
    )
