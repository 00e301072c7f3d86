"""The user's own optimizer, scaler and scheduler behind the wrappers frameworks hand out.

Accelerate's `prepare()` returns an `AcceleratedOptimizer` (it holds the accelerator's GradScaler
and steps the inner optimizer only when gradients are synced) and an `AcceleratedScheduler`;
Lightning's `self.optimizers()` returns a `LightningOptimizer`. Both pass `isinstance(...,
torch.optim.Optimizer)`, but the first never ran `Optimizer.__init__` (registering a step hook
fails) and the second is not the object GradScaler.step() receives. The monitor hooks the optimizer
inside, which steps exactly once per real optimizer step. Wrappers are recognised by shape (an
object holding another torch optimizer as `optimizer` or `_optimizer`), not by importing the
frameworks.

DeepSpeed engines own the step, loss scaling and clipping in code the hooks do not see: they are
refused with a message saying what to do instead.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

_INNER_OPTIMIZER = ("optimizer", "_optimizer")  # AcceleratedOptimizer, LightningOptimizer
_DEEPSPEED = (
    "DeepSpeed engines are not supported yet: the engine runs the optimizer step, loss scaling and "
    "gradient clipping itself, where the monitor's hooks cannot see them. Train with DDP or FSDP "
    "(torchrun, Accelerate or the Trainer without `deepspeed=`) to use monitor.attach, or point "
    "`monitor watch` at DeepSpeed's own text log (steps_per_print) to run the rules on what it prints."
)


@dataclass(frozen=True)
class Resolved:
    optimizer: torch.optim.Optimizer
    scaler: Any | None  # a GradScaler found inside the optimizer's wrapper (Accelerate's), or None
    scheduler: Any | None
    scheduler_steps_per_step: int  # inner scheduler.step() calls per optimizer step by design


def _is_deepspeed(obj: Any) -> bool:
    return any(c.__module__.split(".")[0] == "deepspeed" or c.__name__.startswith("DeepSpeed")
               for c in type(obj).__mro__)


def check_not_deepspeed(*objects: Any) -> None:
    if any(o is not None and _is_deepspeed(o) for o in objects):
        raise NotImplementedError(f"monitor.attach: {_DEEPSPEED}")


def resolve(optimizer: Any, scheduler: Any) -> Resolved:
    """The optimizer and scheduler to hook, and the GradScaler a wrapper holds.

    Raises TypeError when `optimizer` is not a torch optimizer (or a wrapper of one), ValueError when the
    scheduler steps another optimizer.
    """
    optimizer, scaler = _unwrap(optimizer)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"monitor.attach: `optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    per_step = 1
    if type(scheduler).__name__ == "AcceleratedScheduler" and hasattr(scheduler, "scheduler"):
        # Accelerate steps the inner scheduler once per process per optimizer step unless batches are split
        # (the schedule is written in per-process batches): that is by design, not a per-micro-batch bug.
        if getattr(scheduler, "step_with_optimizer", True) and not getattr(scheduler, "split_batches", False):
            state = sys.modules.get("accelerate.state")
            per_step = int(getattr(state.AcceleratorState(), "num_processes", 1) or 1) if state else 1
        scheduler = scheduler.scheduler
    stepped = getattr(scheduler, "optimizer", None)
    if isinstance(stepped, torch.optim.Optimizer) and _unwrap(stepped)[0] is not optimizer:
        # Its warmup and step count would be read as this optimizer's schedule.
        raise ValueError(f"monitor.attach: `scheduler` ({type(scheduler).__name__}) schedules another optimizer "
                         f"than `optimizer` ({type(optimizer).__name__}); pass the scheduler of the optimizer")
    return Resolved(optimizer, scaler, scheduler, per_step)


def _unwrap(optimizer: Any) -> tuple[Any, torch.amp.GradScaler | None]:
    """The optimizer inside wrappers of wrappers, and the first GradScaler a wrapper holds."""
    scaler = None
    for _ in range(4):  # wrappers of wrappers (Accelerate inside Lightning) are a few levels at most
        inner = next((getattr(optimizer, a) for a in _INNER_OPTIMIZER
                      if isinstance(getattr(optimizer, a, None), torch.optim.Optimizer)), None)
        if inner is None or inner is optimizer:
            break
        found = getattr(optimizer, "scaler", None)
        if scaler is None and isinstance(found, torch.amp.GradScaler):
            scaler = found
        optimizer = inner
    return optimizer, scaler
