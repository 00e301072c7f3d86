"""Learning-rate schedules as multipliers of the peak LR, from the formulas of the seed lesson.

`step` counts optimizer updates, 1-based: update 1 uses multiplier(1). Warmup is linear,
multiplier(step) = step / warmup_steps for step < warmup_steps, so multiplier(0) = 0 (the start of
warmup), multiplier(warmup_steps) = 1 (the peak) and, for the lesson's exercise, base 1e-4 with
warmup 1000 gives 5e-5 at step 500. After warmup every decaying schedule ends at min_lr_ratio at
step max_steps and stays there.

LambdaLR evaluates its lambda at 0 when built and at k after k scheduler.step() calls, so
`build_scheduler` shifts by one: the first optimizer step runs at multiplier(1) = 1/warmup_steps,
never at 0, and the last (step max_steps) at min_lr_ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from monitor.trainer.config import TrainConfig

SCHEDULES = ("cosine", "linear", "polynomial", "inverse_sqrt", "constant_cooldown", "constant")


@dataclass(frozen=True)
class ScheduleSpec:
    kind: str
    warmup_steps: int
    max_steps: int
    min_lr_ratio: float = 0.1
    power: float = 2.0  # polynomial only
    cooldown_frac: float = 0.2  # constant_cooldown only

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r}; choose one of: {', '.join(SCHEDULES)}")

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> ScheduleSpec:
        return cls(
            kind=cfg.schedule,
            warmup_steps=int(cfg.warmup_steps or 0),
            max_steps=cfg.max_steps,
            min_lr_ratio=cfg.min_lr_ratio,
            power=cfg.poly_power,
            cooldown_frac=cfg.cooldown_frac,
        )

    def lr_multiplier(self, step: int) -> float:
        """LR of update `step` as a fraction of the peak LR."""
        w, n, lo = self.warmup_steps, self.max_steps, self.min_lr_ratio
        if step < w:
            return max(step, 0) / w
        if self.kind == "constant":
            return 1.0
        if self.kind == "inverse_sqrt":
            # Vaswani et al.: continuous with warmup at step == w; w=0 behaves like w=1.
            return math.sqrt(max(w, 1) / max(step, 1))
        if self.kind == "constant_cooldown":
            # Flat, then a straight line down to min over the last cooldown_frac of the run (WSD).
            start = max(w, n - round(self.cooldown_frac * n))
            if step <= start or n <= start:
                return 1.0
            frac = min(1.0, (step - start) / (n - start))
            return 1.0 - (1.0 - lo) * frac
        # Decays over the post-warmup span [w, n], clamped after it.
        progress = 1.0 if n <= w else min(1.0, (step - w) / (n - w))
        if self.kind == "cosine":
            return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))
        power = 1.0 if self.kind == "linear" else self.power
        return lo + (1.0 - lo) * (1.0 - progress) ** power


def lr_multiplier(
    step: int, kind: str = "cosine", *, warmup_steps: int, max_steps: int, **kw: float
) -> float:
    """Functional form of ScheduleSpec.lr_multiplier."""
    return ScheduleSpec(kind, warmup_steps, max_steps, **kw).lr_multiplier(step)


def build_scheduler(
    optimizer: torch.optim.Optimizer, spec: ScheduleSpec
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `spec`; its lambda is a plain function, so the scheduler's state_dict holds
    only its position (last_epoch) and a resumed run takes its schedule from the current config."""
    from torch.optim.lr_scheduler import LambdaLR

    def multiplier(scheduler_steps: int) -> float:
        return spec.lr_multiplier(scheduler_steps + 1)

    return LambdaLR(optimizer, multiplier)
