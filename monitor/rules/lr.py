"""Learning-rate rules."""

from __future__ import annotations

from pydantic import Field

from monitor.rules.base import Finding, Rule, RuleConfig
from monitor.rules.registry import register
from monitor.schema import Severity, StepRecord


class LrZeroConfig(RuleConfig):
    patience: int = Field(3, ge=1, description="Consecutive optimizer steps at LR exactly 0 tolerated.")
    end_fraction: float = Field(
        0.1, ge=0, le=1,
        description="A schedule that decays smoothly to 0 is fine: zeros are ignored when the last non-zero LR was "
        "below this fraction of the peak (a decay, not a sudden drop).",
    )


@register
class LrZero(Rule):
    """The learning rate is exactly zero in every param group.

    Symptom: every param group's LR is exactly 0 for more than `patience` optimizer steps, not at the
    end of a schedule that decayed to 0.
    Why: the model is not training: compute is spent on steps that change nothing. The usual cause is
    integer division in a hand-written schedule (step // warmup_steps) or a multiplier lambda that
    returns 0.
    Fix: compute the schedule in floating point (step / warmup_steps) and check the LR of the first
    steps before launching the full run.
    """

    id = "lr.zero"
    family = "lr"
    severity = Severity.critical
    Config = LrZeroConfig

    def __init__(self, config: LrZeroConfig, run) -> None:
        super().__init__(config, run)
        self.zeros = 0
        self.first_zero: int | None = None
        self.peak = 0.0
        self.last_nonzero: float | None = None

    def observe(self, r: StepRecord) -> Finding | None:
        lr = max(r.lr) if r.lr else None  # r.max_lr, without the property's call (read on every record)
        if lr is None:
            return None
        if lr != 0.0:  # the usual case: only resets the count
            self.zeros, self.first_zero, self.last_nonzero = 0, None, lr
            if lr > self.peak:
                self.peak = lr
            return None
        if self.zeros == 0:
            self.first_zero = r.step
        self.zeros += 1
        if self.zeros <= self.config.patience:
            return None
        if self.last_nonzero is not None and self.last_nonzero < self.config.end_fraction * self.peak:
            return None  # decayed to zero: the end of a schedule
        return Finding(
            message=f"the LR has been exactly 0 in every param group for {self.zeros} optimizer steps "
            f"(since step {self.first_zero}).",
            hint="Compute the schedule in floating point (step / warmup_steps, not //) and check the LR of the first steps.",
            evidence={"zero_steps": self.zeros, "first_step": self.first_zero, "peak_lr_seen": self.peak},
            step=self.first_zero,
        )
