"""Alert delivery in a training process: each alert completed once, then the same object to every sink.

The rules engine hands its alerts to one `AlertFanout`. It first completes an alert with what only
this process can add (`StackDump`: on run.stalled, every thread's Python stack in a file of the
run directory, named in the alert's evidence), then hands the completed alert to each sink in
order. Sinks only read alerts: every sink gets the same one, whatever their order.
"""

from __future__ import annotations

import faulthandler
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from monitor.hooks.guard import ErrorGuard
from monitor.schema import Alert

# Extra evidence for an alert being raised, or None; called once per firing alert.
Completion = Callable[[Alert], "dict[str, Any] | None"]


class StackDump:
    """On run.stalled: every thread's Python stack into the run directory (a hung collective shows where)."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        self.run_dir, self.rank = run_dir, rank

    def __call__(self, alert: Alert) -> dict[str, Any] | None:
        if alert.rule != "run.stalled":
            return None
        path = self.run_dir / f"stacks-rank{self.rank}-step{alert.step}.txt"
        with open(path, "w") as f:
            f.write(f"trainmon: run.stalled at step {alert.step}, rank {self.rank}: {alert.message}\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        return {"stacks": str(path)}


class OnAlert:
    """The user's `on_alert` callback, with each firing alert."""

    def __init__(self, fn: Callable[[Alert], object]) -> None:
        self.fn = fn

    def emit(self, alert: Alert) -> None:
        if alert.status == "firing":
            self.fn(alert)

    def restore(self, alert: Alert) -> None:
        pass  # the callback ran when the alert was raised: not again

    def close(self) -> None:
        pass


class AlertFanout:
    """The rules engine's one sink: completes each alert, then hands it to every sink in order.

    The evidence a completion added to a firing alert is added to its resolution as well (the
    engine resolves the alert it raised). A completion or a sink that raises is counted under its
    name; the alert still reaches the other sinks.
    """

    def __init__(self, sinks: Iterable[Any], guard: ErrorGuard, completions: Iterable[Completion] = ()) -> None:
        self.sinks = list(sinks)
        self.completions = list(completions)
        self._guard = guard
        self._added: dict[tuple[str, int], dict[str, Any]] = {}  # (rule, rank) -> evidence added when it fired
        self._completed: dict[int, tuple[Alert, Alert]] = {}  # id(the engine's alert) -> (it, the completed one)

    def emit(self, alert: Alert) -> None:
        done = self._complete(alert)
        for sink in self.sinks:
            try:
                sink.emit(done)
            except Exception as e:
                self._guard.record(f"sink {type(sink).__name__}", e)

    def restore(self, alert: Alert) -> None:
        for sink in self.sinks:
            try:
                sink.restore(self.completed(alert))
            except Exception as e:
                self._guard.record(f"sink {type(sink).__name__}", e)

    def close(self) -> None:
        pass  # the sinks belong to the Monitor, which closes them

    def _complete(self, alert: Alert) -> Alert:
        key = (alert.rule, alert.rank)
        if alert.status == "firing":
            added: dict[str, Any] = {}
            for complete in self.completions:
                try:
                    added.update(complete(alert) or {})
                except Exception as e:
                    self._guard.record(f"alert completion {type(complete).__name__}", e)
            if added:
                self._added[key] = added
            else:
                self._added.pop(key, None)
        else:
            added = self._added.pop(key, {})
        if not added:
            return alert
        done = alert.model_copy(update={"evidence": {**alert.evidence, **added}})
        self._completed[id(alert)] = (alert, done)
        return done

    def completed(self, alert: Alert) -> Alert:
        """The alert as the sinks got it (the engine keeps its own copy)."""
        entry = self._completed.get(id(alert))
        return entry[1] if entry is not None else alert
