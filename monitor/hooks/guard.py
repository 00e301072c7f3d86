"""Errors inside the monitor are caught, counted and reported once: they never reach the training loop."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("trainmon")


class ErrorGuard:
    def __init__(self) -> None:
        self.count = 0
        self._reported: set[str] = set()
        self._lock = threading.Lock()
        self.listeners: list[Callable[[], None]] = []  # e.g. the Prometheus error counter

    def record(self, where: str, exc: BaseException) -> None:
        with self._lock:
            self.count += 1
            first = where not in self._reported
            self._reported.add(where)
        for listener in self.listeners:
            try:
                listener()
            except Exception:  # a broken listener must not turn into a loop of errors
                pass
        if first:
            log.warning(
                "trainmon: internal error in %s; training continues, further errors here are only counted "
                "(trainmon_internal_errors_total)", where, exc_info=exc,
            )
