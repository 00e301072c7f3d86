"""Hugging Face Trainer: `Trainer(..., callbacks=[TrainmonCallback()])`, whatever `report_to` says.

At `on_train_begin` the callback attaches to what the Trainer actually steps: the optimizer inside
Accelerate's `AcceleratedOptimizer` with the accelerator's GradScaler (found by `attach`), the
scheduler, the outermost model (`model_wrapped`: DDP or FSDP when distributed), `max_steps` and
the resume step from the Trainer's state. The run directory goes under `args.output_dir`
(`<output_dir>/trainmon/<utc-time>-<host>`) unless `run_dir=` (or $MONITOR_RUN_DIR) says otherwise.

The loss is the one the Trainer logs: `training_step` returns each micro-batch's share of the step
loss (divided by the accumulation steps, or normalised by the tokens of the whole window when the
model takes `num_items_in_batch`, and multiplied by the number of processes when tokens are
averaged across them), and the Trainer sums the shares; the monitor sums the same values per
optimizer step. A model output's own `.loss` would be off by up to grad_accum x world_size.

A halt (`halt_on`) sets `should_save` and `should_training_stop` at the step every rank agreed on,
so the Trainer saves a checkpoint and stops; nothing is raised out of `trainer.train()`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from monitor.config import MonitorConfig, load_config
from monitor.hooks.intercept import intercept
from monitor.runlog.rundir import INTEGRATION_RUNS

log = logging.getLogger("trainmon")

__all__ = ["TrainmonCallback"]


def _find_trainer() -> Trainer | None:
    """The Trainer whose callback handler is calling us: the `self` of a caller's frame.

    Callbacks are not given the Trainer, and it alone knows the wrapped model and the losses it logs.
    """
    frame = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            return None
        obj = frame.f_locals.get("self")
        if isinstance(obj, Trainer):
            return obj
        frame = frame.f_back
    return None


class TrainmonCallback(TrainerCallback):
    """Monitors a Hugging Face Trainer run; the running Monitor is `.monitor` (None before training)."""

    def __init__(self, config: MonitorConfig | dict | str | os.PathLike[str] | None = None,
                 run_dir: str | os.PathLike[str] | None = None) -> None:
        self.config = load_config(config)  # a bad config fails here, before training starts
        self.run_dir = run_dir
        self.monitor: Any = None
        self._undo: list = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        self._close()
        trainer = _find_trainer()
        try:
            from monitor.hooks.attach import Monitor

            if trainer is not None:
                model, optimizer, lr_scheduler = trainer.model_wrapped, trainer.optimizer, trainer.lr_scheduler
            else:
                log.warning("trainmon: the Trainer calling this callback was not found; the loss is read from the "
                            "model's outputs and may differ from the Trainer's logged loss")
            self.monitor = Monitor(
                model, optimizer, scheduler=lr_scheduler, config=self.config, run_dir=self.run_dir,
                max_steps=state.max_steps or None, start_step=state.global_step, raise_on_halt=False,
                runs_root=Path(args.output_dir or ".") / INTEGRATION_RUNS,
            )
            if trainer is not None:
                self._undo.append(intercept(trainer, "training_step", self._training_step))
        except Exception as e:  # never an exception out of trainer.train(): it trains on, unmonitored
            log.error("trainmon: not monitoring this run: %s", e, exc_info=not isinstance(e, NotImplementedError))
            self._close()
        return control

    def _training_step(self, original, *args, **kwargs):
        loss = original(*args, **kwargs)
        mon = self.monitor
        if mon is not None and mon._collector is not None:
            mon._collector.add_loss("shares", loss)
        return loss

    def on_step_end(self, args, state, control, **kwargs):
        mon = self.monitor
        why = mon.halt_requested if mon is not None else None
        if why:
            mon.flush()
            log.critical("%s; saving a checkpoint and stopping the Trainer", why)
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._close()
        return control

    def _close(self) -> None:
        for undo in self._undo:
            undo()
        self._undo.clear()
        if self.monitor is not None:
            self.monitor.close()
