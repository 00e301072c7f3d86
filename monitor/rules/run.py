"""Run-level rules: a run that stopped producing steps."""

from __future__ import annotations

from collections import deque
from statistics import median

from pydantic import Field

from monitor.rules.base import Finding, Rule, RuleConfig
from monitor.rules.registry import register
from monitor.schema import Severity, StepRecord


class RunStalledConfig(RuleConfig):
    floor_seconds: float = Field(120.0, gt=0, description="Never call a run stalled sooner than this.")
    factor: float = Field(10.0, gt=1, description="Stalled after this many times the run's median step interval ...")
    window: int = Field(50, ge=2, description="... measured over the last this-many steps.")
    resolve_after: int = Field(1, ge=1, description="Steps after a stall before the alert resolves (one step: it moves again).")
    cooldown_steps: int = Field(0, ge=0, description="Steps after resolution during which a new stall is not reported.")


@register
class RunStalled(Rule):
    """The run has stopped producing optimizer steps.

    Symptom: no optimizer step for longer than max(floor_seconds, factor x the median interval
    between recent steps) while the run is expected to be going (checked by the daemon's clock and
    by the in-process watchdog).
    Why: a hung collective (a rank died or diverged in control flow), a stuck data loader, a full
    disk or a deadlock stops a run without an error; on a cluster it keeps burning its allocation
    until someone looks.
    Fix: look at the stack dump (in-process watchdog) or py-spy dump the ranks; check that every
    rank is alive and reaches the same collectives, the data loader workers, and free disk space.
    """

    id = "run.stalled"
    family = "run"
    severity = Severity.critical
    scope = "rank"
    Config = RunStalledConfig

    def __init__(self, config: RunStalledConfig, run) -> None:
        super().__init__(config, run)
        self.last_time: float | None = None
        self.last_step: int | None = None
        self.intervals: deque[float] = deque(maxlen=config.window)

    def timeout(self) -> float:
        c = self.config
        if len(self.intervals) < 2:
            return c.floor_seconds
        return max(c.floor_seconds, c.factor * median(self.intervals))

    def observe(self, r: StepRecord) -> Finding | None:
        """Only keeps the clock of the steps: `on_tick` judges it."""
        t, last = r.time, self.last_time
        if last is not None and t > last:
            self.intervals.append(t - last)
        if last is None or t >= last:
            self.last_time, self.last_step = t, r.step
        return None

    def on_tick(self, now: float) -> Finding | None:
        if self.last_time is None:
            return None
        idle = now - self.last_time
        limit = self.timeout()
        if idle <= limit:
            return None
        return Finding(
            message=f"no optimizer step for {idle:.0f} s (last: step {self.last_step}); the run's limit is "
            f"{limit:.0f} s.",
            hint="Dump the stacks of every rank (py-spy dump, or the watchdog's stacks file) and check for a dead "
            "rank, a stuck data loader or a full disk.",
            evidence={"idle_seconds": round(idle, 1), "last_step": self.last_step, "timeout_seconds": round(limit, 1),
                      "last_step_time": self.last_time},
            step=self.last_step,
        )
