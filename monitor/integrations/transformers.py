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
import sys
from pathlib import Path

from transformers import Trainer, TrainerCallback

from monitor.hooks.intercept import intercept
from monitor.integrations._attached import Attached
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


class TrainmonCallback(Attached, TrainerCallback):
    """Monitors a Hugging Face Trainer run; takes `config=` and `run_dir=` like monitor.attach. The running
    Monitor is `.monitor` (None before training)."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        from monitor.hooks.attach import Monitor

        trainer = _find_trainer()
        if trainer is not None:
            model, optimizer, lr_scheduler = trainer.model_wrapped, trainer.optimizer, trainer.lr_scheduler
        else:
            log.warning("trainmon: the Trainer calling this callback was not found; the loss is read from the "
                        "model's outputs and may differ from the Trainer's logged loss")
        runs_root = Path(args.output_dir or ".") / INTEGRATION_RUNS
        attached = self._attach(lambda: Monitor(
            model, optimizer, scheduler=lr_scheduler, config=self.config,
            run_dir=self._run_dir(runs_root, state.global_step), max_steps=state.max_steps or None,
            resume_step=state.global_step, raise_on_halt=False, runs_root=runs_root,
        ))
        if attached and trainer is not None:
            self._undo.append(intercept(trainer, "training_step", self._training_step))
        return control

    def _training_step(self, original, *args, **kwargs):
        loss = original(*args, **kwargs)
        mon = self._live()
        if mon is not None:
            mon._collector.add_loss("shares", loss)
        return loss

    def on_step_end(self, args, state, control, **kwargs):
        if self._halt_due("saving a checkpoint and stopping the Trainer"):
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._close()
        return control
