"""Alert delivery in a training process.

The rules engine completes each alert as it raises it with what only this process can add
(`StackDump`: on run.stalled, every thread's Python stack in a file of the run directory, named in
the alert's evidence), then hands it to one `AlertFanout`, which gives the same object to each sink
in order. Sinks only read alerts, so their order does not matter.
"""

from __future__ import annotations

import faulthandler
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from monitor.hooks.guard import ErrorGuard
from monitor.schema import Alert


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
    """The rules engine's one sink: every alert to each sink in order; a sink that raises is counted
    under its name and the alert still reaches the others.

    `active` is what `active_source` (the engine's active alerts) said after the last alert: taken on
    the publisher thread, which owns the engine, and replaced whole (one attribute store), so any
    thread reads a finished list (`refresh` takes it anew, e.g. once the engine has started)."""

    def __init__(self, sinks: Iterable[Any], guard: ErrorGuard,
                 active_source: Callable[[], list[Alert]] | None = None) -> None:
        self.sinks = list(sinks)
        self._guard = guard
        self.active_source = active_source
        self.active: tuple[Alert, ...] = ()

    def refresh(self) -> None:
        if self.active_source is not None:
            try:
                self.active = tuple(self.active_source())
            except Exception as e:
                self._guard.record("active alerts", e)

    def emit(self, alert: Alert) -> None:
        for sink in self.sinks:
            try:
                sink.emit(alert)
            except Exception as e:
                self._guard.record(f"sink {type(sink).__name__}", e)
        self.refresh()

    def restore(self, alert: Alert) -> None:
        for sink in self.sinks:
            try:
                sink.restore(alert)
            except Exception as e:
                self._guard.record(f"sink {type(sink).__name__}", e)
        self.refresh()

    def close(self) -> None:
        pass  # the sinks belong to the Monitor, which closes them
