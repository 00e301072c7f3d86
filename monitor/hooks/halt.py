"""`halt_on`: stopping training on an alert at or above a severity.

The `HaltController` sees every alert (publisher thread). The first firing alert at or above
`halt_on` sets the optimizer step at which training stops: the next one when the rank runs alone;
under DDP a step every rank agrees on through the job's store (hooks/ddp.py: HaltCoordinator), far
enough ahead for every rank's publisher to read it, because a rank halting alone would leave the
others blocked in their next all-reduce. Other ranks' decisions are polled on the publisher thread
(each step and when idle). On the training thread, `check()` before each optimizer step raises
TrainingHalted once that step is reached (after flushing the run directory); framework
integrations read `reason` instead and stop their trainer themselves.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monitor.hooks.guard import ErrorGuard
from monitor.schema import Alert


class TrainingHalted(RuntimeError):
    """Raised at optimizer.step() after an alert at or above `halt_on`; the run dir was flushed first."""

    def __init__(self, message: str, alert: Any = None) -> None:
        super().__init__(message)
        self.alert = alert  # the monitor.Alert that asked for the halt


class HaltController:
    def __init__(self, halt_on: Any, *, rank: int, coordinator: Any | None, guard: ErrorGuard,
                 step: Callable[[], int], flush: Callable[[], object], raise_on_halt: bool, run_dir: Path) -> None:
        """`halt_on`: the config's severity (None: never halt). `coordinator`: a ddp.HaltCoordinator under
        DDP, else None. `step`: the index the next optimizer step will get. `flush`: writes out every
        finished step, before TrainingHalted is raised."""
        self.halt_on = halt_on
        self.rank = rank
        self.coordinator = coordinator
        self._guard = guard
        self._step = step
        self._flush = flush
        self._raise = raise_on_halt
        self.run_dir = run_dir
        self.alert: Alert | None = None  # this rank's alert that asked for the halt
        self.at: int | None = None  # the optimizer step at which training stops
        self.source: tuple[int, Alert] | None = None  # (rank, alert) of another rank's halt
        self._raised = False
        self._step_times: deque[float] = deque(maxlen=16)  # recent step times: the margin in steps

    # -- publisher thread -----------------------------------------------------------------------

    def emit(self, alert: Alert) -> None:
        """An alert was raised: the first firing one at or above `halt_on` asks for the halt."""
        if self.halt_on is None or self.alert is not None or alert.status != "firing":
            return
        if not alert.severity.at_least(self.halt_on):
            return
        self.alert = alert
        if self.coordinator is None:
            self.at = self._step()  # alone: at the next optimizer step
        elif self.at is None:
            # DDP: every rank stops at the same step (the first rank to ask sets it).
            # The median of recent steps: the slow first steps must not shrink the margin.
            recent = sorted(self._step_times)
            step_seconds = recent[len(recent) // 2] if recent else None
            try:
                self._apply(self.coordinator.request(self._step(), step_seconds, alert.model_dump(mode="json")))
            except Exception as e:  # no store: this rank still halts, as asked
                self._guard.record("halt coordination", e)
                self.at = self._step()

    def restore(self, alert: Alert) -> None:
        pass  # an alert of a previous session does not stop this one

    def close(self) -> None:
        pass

    def observe(self, step_time: float | None) -> None:
        """After each step's record (DDP): its time, for the margin, and another rank's decision."""
        if step_time is not None and step_time > 0:
            self._step_times.append(step_time)
        self.poll()

    def poll(self) -> None:
        """Another rank's decision, if one was made (DDP; also when no step comes)."""
        if self.coordinator is None or self.at is not None:
            return
        decision = self.coordinator.poll()
        if decision is not None:
            self._apply(decision)

    def _apply(self, decision: dict) -> None:
        if decision["rank"] != self.rank or self.alert is None:
            self.source = (int(decision["rank"]), Alert.model_validate(decision["alert"]))
        self.at = int(decision["at"])

    # -- training thread ------------------------------------------------------------------------

    def check(self) -> None:
        """Before each optimizer step: two int reads unless a halt is due."""
        at = self.at
        if at is None or self._raised or self._step() < at or not self._raise:
            return
        self._raised = True  # raise once; a loop that catches it may go on
        self._flush()
        raise TrainingHalted(self.reason, self.source[1] if self.source else self.alert)

    # -- any thread -----------------------------------------------------------------------------

    @property
    def reason(self) -> str | None:
        """Why training must stop now, once the step every rank agreed on is reached; else None."""
        at = self.at
        step = self._step()
        if at is None or step < at:
            return None
        if self.source is not None:
            rank, alert = self.source
            why = f"rank {rank} raised {alert.line()}"
        else:
            why = self.alert.line()
        where = f" at step {step}, with every rank" if self.coordinator is not None else ""
        return f"trainmon halted training{where} (halt_on={self.halt_on!r}): {why} Run dir: {self.run_dir}"
