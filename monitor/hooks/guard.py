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

    def record(self, where: str, exc: BaseException, *, expected: bool = False) -> None:
        """Count `exc`, raised in `where`; say it once per `where`: with its traceback, or (`expected`: a
        condition of the environment the monitor knows, such as a deadline passed) as one plain line."""
        with self._lock:
            self.count += 1
            first = where not in self._reported
            self._reported.add(where)
        for listener in self.listeners:
            try:
                listener()
            except Exception:  # a broken listener must not turn into a loop of errors
                pass
        if first and expected:
            log.warning("trainmon: %s: %s; training continues (counted in trainmon_internal_errors_total)",
                        where, exc)
        elif first:
            log.warning(
                "trainmon: internal error in %s; training continues, further errors here are only counted "
                "(trainmon_internal_errors_total)", where, exc_info=exc,
            )
