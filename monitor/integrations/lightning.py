"""Lightning: `Trainer(callbacks=[TrainmonCallback()])`, with `lightning.pytorch` or `pytorch_lightning`.

The callback subclasses the Callback of each of the two packages that is installed, so either
Trainer accepts it. At `on_train_start` (after a checkpoint was restored) it attaches to the
trainer's first optimizer (the torch optimizer inside LightningOptimizer), its step-interval LR
scheduler, the precision plugin's GradScaler and the strategy's model (DDP when distributed); the
run directory goes under `default_root_dir` (`<root>/trainmon/<utc-time>-<host>`) unless `run_dir=`
says otherwise.

Lightning runs the forward, backward and clipping inside `optimizer.step(closure)`, and
`training_step` is not the model's `forward`, so the callback reports the micro-batches itself:
one starts at `on_train_batch_start`, its forward ends when the strategy's backward begins, and
the loss is the one handed to that backward (in automatic optimisation Lightning divided
`training_step`'s loss by `accumulate_grad_batches`; that is undone, so a step's loss is the mean
of its `training_step` losses). The gradients are read when the closure returns, before the
optimizer uses them: the pre-clip norm of the current step, with `gradient_clip_val` or without.
A halt (`halt_on`) sets `trainer.should_stop` at the step every rank agreed on.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
from pathlib import Path
from typing import Any

from monitor.config import MonitorConfig
from monitor.hooks.intercept import intercept
from monitor.integrations._attached import Attached
from monitor.runlog.rundir import INTEGRATION_RUNS

log = logging.getLogger("trainmon")

__all__ = ["TrainmonCallback"]

_PACKAGES = ("lightning.pytorch", "pytorch_lightning")
_AUTOCAST = {"16-mixed": "float16", "bf16-mixed": "bfloat16"}


def _callback_bases() -> tuple[type, ...]:
    found = [p for p in _PACKAGES if importlib.util.find_spec(p.split(".")[0]) is not None]
    if not found:
        raise ImportError("monitor.integrations.lightning needs `lightning` or `pytorch_lightning` installed")
    return tuple(importlib.import_module(p).Callback for p in found)


def _batch_args(batch: Any) -> tuple[tuple, dict]:
    if isinstance(batch, dict):
        return (), batch
    return (tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)), {}


class TrainmonCallback(Attached, *_callback_bases()):  # type: ignore[misc]
    """Monitors a Lightning run; takes `config=` and `run_dir=` like monitor.attach. The running Monitor is
    `.monitor` (None before training starts)."""

    def __init__(self, config: MonitorConfig | dict | str | os.PathLike[str] | None = None,
                 run_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__(config, run_dir)
        self._autocast: str | None = None
        self._unnormalize = 1
        self._losses = True  # the backward losses are the monitored optimizer's

    def on_train_start(self, trainer, pl_module) -> None:
        from monitor.hooks.attach import Monitor

        # With more optimizers, a backward's loss may belong to any of them: the first one's is not known.
        self._losses = len(trainer.optimizers) <= 1
        if not self._losses:
            log.info("trainmon: %d optimizers; monitoring the first. Its loss is not known (the backward losses of "
                     "the others cannot be told apart): report it with callback.monitor.log(loss=...)",
                     len(trainer.optimizers))
        first = trainer.optimizers[0] if trainer.optimizers else None
        configs = [c for c in trainer.lr_scheduler_configs if c.interval == "step" and c.frequency == 1
                   and getattr(c.scheduler, "optimizer", first) is first]  # the first optimizer's own
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if max_steps is None and math.isfinite(trainer.estimated_stepping_batches):
            max_steps = int(trainer.estimated_stepping_batches)
        runs_root = Path(trainer.default_root_dir) / INTEGRATION_RUNS
        attached = self._attach(lambda: Monitor(
            trainer.strategy.model, trainer.optimizers[0], scaler=getattr(trainer.precision_plugin, "scaler", None),
            scheduler=configs[0].scheduler if configs else None, config=self.config,
            run_dir=self._run_dir(runs_root, trainer.global_step), max_steps=max_steps,
            resume_step=trainer.global_step, raise_on_halt=False, forward_hooks=False, runs_root=runs_root,
        ))
        if attached:
            self._autocast = _AUTOCAST.get(str(getattr(trainer.precision_plugin, "precision", "")))
            self._unnormalize = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            self._undo.append(intercept(trainer.strategy, "backward", self._backward))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        mon = self._live()
        if mon is not None:
            args, kwargs = _batch_args(batch)
            mon._collector.begin_forward(args, kwargs, autocast=self._autocast)

    def _backward(self, original, closure_loss, *args, **kwargs):
        mon = self._live()
        if mon is not None:
            mon._collector.end_forward()
            if self._losses:
                loss = closure_loss * self._unnormalize if self._unnormalize != 1 else closure_loss
                mon._collector.add_loss("training_step", loss)
        return original(closure_loss, *args, **kwargs)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._halt_due("stopping the Lightning Trainer"):
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close()
