"""The rules engine behind one lock, for the three threads that feed it.

The publisher thread gives it each batch of records; the watchdog thread (started here) runs the
clock rules (run.stalled and its stack dump) on its own, so they fire while the training loop is
stuck and also while the publisher is (waiting on a hung kernel's event, say: it holds no lock while
it waits); `close()` gives it the rank exchanges still pending at the end. The engine's state is
one, so each of them takes the lock.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from monitor.hooks.guard import ErrorGuard
from monitor.rules.engine import RulesEngine


class Judge:
    def __init__(self, engine: RulesEngine, guard: ErrorGuard) -> None:
        self.engine = engine
        self._guard = guard
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    def observe(self, record: Any) -> None:
        """One record (the publisher's output for a single record)."""
        with self._lock:
            self.engine.observe(record)

    def observe_many(self, records: list[Any]) -> None:
        """A batch of records (the publisher's batches): the lock once, the engine's batch path."""
        with self._lock:
            self.engine.observe_many(records)

    def observe_field(self, record: Any, field: str) -> None:
        """The rules that read `field` of a record that carries only it (the last rank exchange)."""
        with self._lock:
            self.engine.observe_field(record, field)

    def start_watchdog(self, interval: float) -> None:
        """The clock rules every `interval` seconds on a thread of their own, until `stop()`."""
        self._watchdog = threading.Thread(target=self._watch, args=(interval,), name="trainmon-watchdog",
                                          daemon=True)
        self._watchdog.start()

    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                with self._lock:
                    self.engine.tick(time.time())
            except Exception as e:
                self._guard.record("clock rules", e)

    def stop(self, timeout: float) -> None:
        """The watchdog ends (within `timeout`; it is a daemon thread if a tick outlasts it)."""
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=timeout)
