"""What attach() learns once about the process, the model and the optimizer (for run.json and the rules)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch

from monitor.schema import ModelInfo, OptimizerInfo, ParamGroupInfo


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def initialized(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()


def dist_info() -> DistInfo:
    """Rank and world size from torch.distributed when initialized, else from torchrun's environment."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return DistInfo(torch.distributed.get_rank(), local_rank, torch.distributed.get_world_size())
    return DistInfo(int(os.environ.get("RANK", "0") or 0), local_rank, int(os.environ.get("WORLD_SIZE", "1") or 1))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DDP/FSDP-style wrappers, Lightning's wrapper and torch.compile."""
    for attr in ("module", "_orig_mod", "_forward_module"):
        inner = getattr(model, attr, None)
        if isinstance(inner, torch.nn.Module):
            return unwrap(inner)
    return model


def sharded(model: torch.nn.Module, params: list[torch.Tensor]) -> bool:
    """Whether gradients are sharded across ranks (FSDP 1 or 2): then a local norm is not the global one.

    Recognised by class names (FSDP1's wrapper, FSDP2's DTensor parameters), without importing them.
    """
    if any(c.__name__ in ("FullyShardedDataParallel", "FSDPModule") for m in model.modules() for c in type(m).__mro__):
        return True
    return any(type(p).__name__ == "DTensor" for p in params[:1] + params[-1:])


def param_names(model: torch.nn.Module, params: list[torch.Tensor]) -> list[str]:
    by_id = {id(p): n for n, p in unwrap(model).named_parameters(remove_duplicate=False)}
    return [by_id.get(id(p), f"param{i}") for i, p in enumerate(params)]


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _num(v) -> float | None:
    if isinstance(v, torch.Tensor):
        # One host read at attach time (not per step): the hyperparameter may be a tensor.
        return float(v.detach().cpu()) if v.numel() == 1 else None
    return float(v) if isinstance(v, (int, float)) else None


def optimizer_info(optimizer: torch.optim.Optimizer, names: dict[int, str] | None = None) -> OptimizerInfo:
    names = names or {}
    groups = []
    for g in optimizer.param_groups:
        betas = g.get("betas")
        one_d = [p for p in g["params"] if p.dim() <= 1]
        groups.append(ParamGroupInfo(
            lr=_num(g.get("lr")),
            initial_lr=_num(g.get("initial_lr")),
            decay_1d=len(one_d),
            decay_1d_names=[names.get(id(p), "?") for p in one_d[:5]],
            betas=[_num(b) for b in betas] if isinstance(betas, (tuple, list)) else None,
            eps=_num(g.get("eps")),
            weight_decay=_num(g.get("weight_decay")),
            momentum=_num(g.get("momentum")),
            params=len(g["params"]),
            numel=sum(p.numel() for p in g["params"]),
        ))
    return OptimizerInfo(name=type(optimizer).__name__, groups=groups)


def model_info(model: torch.nn.Module, names: list[str]) -> ModelInfo:
    inner = unwrap(model)
    ps = list(inner.parameters())
    return ModelInfo(
        name=type(inner).__name__,
        parameters=sum(p.numel() for p in ps),
        trainable=sum(p.numel() for p in ps if p.requires_grad),
        param_names=names,
    )


def resumed_step(optimizer: torch.optim.Optimizer) -> int:
    """The optimizer's own step count when it was loaded from a checkpoint (0 for a fresh run).

    One host read at attach time, not per step.
    """
    for state in optimizer.state.values():
        step = state.get("step") if isinstance(state, dict) else None
        if step is not None:
            try:
                return int(step.item() if isinstance(step, torch.Tensor) else step)
            except (TypeError, ValueError):
                return 0
    return 0


def hostname() -> str:
    return socket.gethostname()


def schedule_preview(scheduler, max_steps: int | None, limit: int = 20_000) -> dict | None:
    """The warmup a LambdaLR will produce, read from its multiplier functions before any step.

    LambdaLR (and Hugging Face's get_*_schedule_with_warmup, which return one) applies
    base_lr * f(k) at optimizer step k, so evaluating f over the run tells the warmup at attach
    time. Other schedulers are judged from the LR trace as the run goes.
    """
    fns = getattr(scheduler, "lr_lambdas", None)
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) or not fns or not callable(fns[0]):
        return None
    n = min(max_steps or limit, limit)
    try:
        values = [float(fns[0](k)) for k in range(n)]
    except Exception:  # a lambda that needs state we do not have: fall back to the trace
        return None
    if not values:
        return None
    peak = max(values)
    return {"source": "LambdaLR", "steps_previewed": n, "first_multiplier": values[0], "peak_multiplier": peak,
            "warmup_steps": values.index(peak) + 1 if values[0] < peak else 0}


# Step counters of torch's LRScheduler and of common hand-written schedulers.
_SCHEDULER_COUNTERS = ("last_epoch", "current_step", "step_count", "_step_count", "steps")


class SchedulerSteps:
    """How many times the loop stepped its LR scheduler per optimizer step, from the scheduler's own
    counter. The scheduler is not wrapped: an attribute set on it would land in its state_dict()
    (LRScheduler saves its __dict__) and break the user's checkpoints."""

    def __init__(self, scheduler: Any, per_step: int = 1) -> None:
        """`per_step`: scheduler.step() calls a wrapper makes per optimizer step (Accelerate)."""
        self.scheduler, self.per_step = scheduler, per_step
        self.attr = None
        if scheduler is not None:
            self.attr = next((n for n in _SCHEDULER_COUNTERS if isinstance(getattr(scheduler, n, None), int)), None)
        self.last = self._read()

    def _read(self) -> int | None:
        if self.attr is None:
            return None
        v = getattr(self.scheduler, self.attr, None)
        return v if isinstance(v, int) else None

    def since_last(self) -> int | None:
        """Scheduler steps since the last call (None: no counter to read)."""
        now = self._read()
        steps = (now - self.last) // self.per_step if now is not None and self.last is not None else None
        self.last = now
        return steps
