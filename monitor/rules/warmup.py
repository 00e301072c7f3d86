"""Warmup rules: judged from the LR trace the optimizer actually used."""

from __future__ import annotations

from pydantic import Field

from monitor.rules.base import Finding, Rule, RuleConfig
from monitor.rules.registry import register
from monitor.schema import Severity, StepRecord


class WarmupMissingConfig(RuleConfig):
    ratio: float = Field(
        0.5, gt=0, le=1, description="The first step's LR at or above this fraction of the peak seen counts as no warmup.",
    )
    window: int = Field(20, ge=2, description="Optimizer steps over which the peak is taken before deciding.")
    patience: int = Field(
        5, ge=1, description="Decide early when the LR has not risen above the first step's within this many steps.",
    )
    drop_ratio: float = Field(
        0.1, gt=0, lt=1,
        description="An LR that falls below this fraction of step 0's right after it means the scheduler's first "
        "update came after the first optimizer step (optimizer built at the peak LR).",
    )


@register
class WarmupMissing(Rule):
    """The first optimizer steps run at (or near) the peak learning rate.

    Symptom: the LR of the first optimizer step is at least `ratio` of the peak LR seen in the first
    `window` steps, or it drops sharply right after step 0 (the scheduler's first update came after
    the first step, so step 0 ran at the optimizer's base LR).
    Why: Adam's second-moment estimate is poor in the first ~2/(1-beta2) steps; full-size updates then
    push a transformer into instability (loss spikes, attention entropy collapse) that it may never
    leave.
    Fix: warm the LR up linearly from ~0 over at least 2/(1-beta2) steps (1-5% of training); set the
    warmup-start LR on the optimizer before the first step, e.g. with LambdaLR, which applies the
    schedule at construction.
    """

    id = "warmup.missing"
    family = "warmup"
    severity = Severity.warning
    Config = WarmupMissingConfig
    once = True

    def __init__(self, config: WarmupMissingConfig, run) -> None:
        super().__init__(config, run)
        self.lr0: float | None = None
        self.first_step: int | None = None
        self.peak = 0.0
        self.seen = 0
        self.done = run.start_step > 0 or (bool(run.optimizer.name) and not run.optimizer.adam_family)

    def observe(self, r: StepRecord) -> Finding | None:
        if self.done or r.max_lr is None:
            return None
        lr = r.max_lr
        if self.lr0 is None:
            if r.step > 1:  # the run was resumed or joined late: we never saw its start
                self.done = True
                return None
            self.lr0, self.first_step, self.peak = lr, r.step, lr
            self.seen = 1
            return None
        self.seen += 1
        self.peak = max(self.peak, lr)
        c = self.config
        lr0 = self.lr0
        ev = {"first_lr": lr0, "peak_lr_seen": self.peak, "lr_now": lr, "steps_seen": self.seen}
        if lr0 > 0 and self.seen <= 3 and lr < c.drop_ratio * lr0:
            self.done = True
            return Finding(
                message=f"step {self.first_step} ran at LR {lr0:.3g}, then the LR fell to {lr:.3g}: the scheduler's "
                "first update came after the first optimizer step, so the first update used the peak LR.",
                hint="Create the optimizer at the warmup-start LR (or step the scheduler once before training, "
                "or use LambdaLR, which applies the schedule at construction).",
                evidence=ev,
                step=self.first_step,
            )
        no_rise = self.seen > c.patience and self.peak <= lr0
        if no_rise or self.seen >= c.window:
            self.done = True
            if lr0 > 0 and lr0 >= c.ratio * self.peak:
                return Finding(
                    message=f"the first optimizer step ran at LR {lr0:.3g}, {lr0 / self.peak:.0%} of the peak "
                    f"{self.peak:.3g} seen in {self.seen} steps: no warmup.",
                    hint="Add a linear warmup from ~0 over at least 2/(1-beta2) steps (1-5% of training).",
                    evidence=ev,
                    step=self.first_step,
                )
        return None
