"""The daemon's own metrics (trainmon_watch_*) and its garbage-collector setting."""

from __future__ import annotations

import gc
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class WatchHealth:
    """The daemon's own metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.runs = Gauge("trainmon_watch_runs", "Runs being watched, by state.", ["state"], registry=registry)
        self.records = Counter("trainmon_watch_records", "Step records ingested.", registry=registry)
        self.alerts = Counter("trainmon_watch_alerts", "Alerts raised by the daemon's rules.", ["severity"], registry=registry)
        self.problems = Counter("trainmon_watch_source_problems", "Damaged or unreadable inputs reported.", registry=registry)
        self.errors = Counter("trainmon_watch_errors", "Errors caught in the daemon (never fatal).", registry=registry)
        self.poll = Histogram("trainmon_watch_poll_seconds", "Time of one pass over all runs.", registry=registry,
                              buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5))

    def count_runs(self, runs: Iterable[Any]) -> None:
        """The watched runs by state: finished (its end seen), live (a step arrived while watched), idle."""
        counts = {"live": 0, "finished": 0, "idle": 0}
        for run in runs:
            counts["finished" if run.finished else "live" if run.live else "idle"] += 1
        for state, n in counts.items():
            self.runs.labels(state).set(n)


def tune_gc() -> None:
    """For the daemon process: records are freed by reference counting (they hold no cycles), yet every
    700 allocations the cyclic collector walks the young objects, a batch of live records among them.
    Collect far less often. Process-wide, so the CLI calls it, not the Watcher."""
    gc.set_threshold(50_000, 10, 10)
