"""What the StepCollector (hooks/collector.py) is given: the user's objects it hooks, and its options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Hooked:
    """The user's objects the collector hooks, as found inside their wrappers."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]  # the optimizer's parameters, in order
    scaler: Any | None = None
    scheduler: Any | None = None
    loss_fn: torch.nn.Module | None = None
    scheduler_steps_per_step: int = 1  # scheduler.step() calls a wrapper makes per optimizer step (Accelerate)


@dataclass(frozen=True)
class CollectorOptions:
    start_step: int = 0  # the index of the next optimizer step
    param_norms_every: int = 0  # per-parameter gradient norms every this many steps (0: never)
    count_tokens: bool = True
    # Gradients, LRs and loss scale are the same on every rank after the all-reduce: only rank 0
    # computes them; every rank reports its own loss, timing and local gradient norm.
    global_stats: bool = True
    fingerprint_every: int = 0  # the weight fingerprint for the rank exchange (0: never)
    local_grad_norm: bool = True
    forward_hooks: bool = True  # False: a framework integration reports micro-batches itself
    sharded: bool = False  # FSDP: a local norm is not the global one, and the monitor runs no collective
