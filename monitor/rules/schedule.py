"""Schedule-stepping rules: the LR scheduler stepped at the wrong cadence, or started over mid-run.

Mistakes in how the loop drives its scheduler, rather than in the schedule it asked for (rules/warmup.py).
"""

from __future__ import annotations

from pydantic import Field

from monitor.rules.base import Finding, Rule, RuleConfig
from monitor.rules.registry import register
from monitor.rules.trackers import LrTrace
from monitor.schema import Severity, StepRecord


class WarmupPerMicrobatchConfig(RuleConfig):
    patience: int = Field(3, ge=1, description="Consecutive optimizer steps with more than one scheduler.step().")


@register
class WarmupPerMicrobatch(Rule):
    """The LR scheduler is stepped more than once per optimizer step.

    Symptom: scheduler.step() runs several times between optimizer steps (seen from the scheduler's
    own step counter, when the scheduler is passed to monitor.attach) for `patience` steps in a row.
    Why: with gradient accumulation, calling scheduler.step() inside the micro-batch loop runs the
    whole schedule grad_accum times too fast: warmup is over in a fraction of its steps and the LR
    reaches its floor long before the end of training.
    Fix: call scheduler.step() once per optimizer step, after optimizer.step() (or scaler.step()),
    outside the micro-batch loop.
    """

    id = "warmup.per_microbatch"
    family = "warmup"
    severity = Severity.critical
    Config = WarmupPerMicrobatchConfig

    def __init__(self, config: WarmupPerMicrobatchConfig, run) -> None:
        super().__init__(config, run)
        self.run_len = 0
        self.since: int | None = None

    def observe(self, r: StepRecord) -> Finding | None:
        n = r.scheduler_steps
        if n is None or n <= 1:
            self.run_len, self.since = 0, None
            return None
        if self.run_len == 0:
            self.since = r.step
        self.run_len += 1
        if self.run_len < self.config.patience:
            return None
        micro = f" ({r.micro_batches} forward passes per step)" if r.micro_batches and r.micro_batches > 1 else ""
        return Finding(
            message=f"scheduler.step() ran {n} times per optimizer step{micro} for {self.run_len} steps since step "
            f"{self.since}: the schedule runs {n}x too fast.",
            hint="Call scheduler.step() once per optimizer step, after optimizer.step(), outside the micro-batch loop.",
            evidence={"scheduler_steps_per_step": n, "micro_batches": r.micro_batches, "first_step": self.since,
                      "lr": r.max_lr},
            step=self.since,
        )


class WarmupRestartConfig(RuleConfig):
    drop: float = Field(
        0.5, gt=0, lt=1, description="A one-step fall of the LR below this fraction of the previous step's LR ...",
    )
    floor: float = Field(0.2, gt=0, lt=1, description="... to below this fraction of the peak ...")
    confirm: int = Field(5, ge=1, description="... followed within this many steps by a rise again is a restart.")


@register
class WarmupRestart(Rule):
    """The LR schedule jumps back to the start of its warmup in the middle of the run.

    Symptom: after warmup, the LR falls in one step to a small fraction of the peak and then climbs
    again: the warmup is being replayed.
    Why: this is what resuming from a checkpoint without the scheduler's state looks like: a fresh
    scheduler starts over, the run re-warms from a near-zero LR (wasting steps) and then trains
    with a schedule that no longer matches its progress (too high an LR late in training).
    Fix: save scheduler.state_dict() in checkpoints and load it on resume (and GradScaler's too),
    or rebuild the scheduler with last_epoch set to the resumed step.
    """

    id = "warmup.restart"
    family = "warmup"
    severity = Severity.warning
    Config = WarmupRestartConfig

    def __init__(self, config: WarmupRestartConfig, run) -> None:
        super().__init__(config, run)
        self.trace = LrTrace()
        self.drop_step: int | None = None
        self.drop_attempt = 1  # the attempt whose record the LR fell on (a resumed process's, usually)
        self.drop_lr = 0.0
        self.before = 0.0
        self.prev: float | None = None
        self.drop, self.floor = config.drop, config.floor  # read on every record (see Rule.observe)

    def observe(self, r: StepRecord) -> Finding | None:
        lr = max(r.lr) if r.lr else None  # r.max_lr, without the property's call (read on every record)
        if lr is None:
            return None
        warm = self.trace.warmup_done
        self.trace.push(r.step, lr)
        prev, self.prev = self.prev, lr
        finding = None
        if self.drop_step is not None:
            if lr > self.drop_lr * 1.01:
                finding = Finding(
                    message=f"the LR fell from {self.before:.3g} to {self.drop_lr:.3g} at step {self.drop_step} and is "
                    f"rising again ({lr:.3g}): the warmup restarted mid-run (a resume without scheduler state?).",
                    hint="Save and load scheduler.state_dict() with checkpoints (or rebuild it with last_epoch "
                    "set to the resumed step).",
                    evidence={"lr_before": self.before, "lr_after": self.drop_lr, "lr_now": lr,
                              "peak_lr": self.trace.peak, "first_step": self.drop_step, "attempt": self.drop_attempt},
                    step=self.drop_step,
                )
                self.drop_step = None
            elif r.step - self.drop_step >= self.config.confirm:
                self.drop_step = None  # a step decay, not a restart
        if warm and prev is not None and lr < self.drop * prev and lr < self.floor * self.trace.peak:
            self.drop_step, self.drop_lr, self.before, self.drop_attempt = r.step, lr, prev, r.attempt
        return finding
