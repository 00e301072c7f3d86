"""Console alert sink: one line per alert through `logging`, logger "trainmon.alerts".

Through logging, users route, filter or silence alerts with the usual configuration (a level on
"trainmon", a handler of their own). Until they configure logging anywhere (no handler on the
root logger), the "trainmon" logger keeps one handler of its own that writes the line above any
tqdm progress bar (the Hugging Face Trainer's and Lightning's) with `tqdm.write`, so a bar is not
torn, and to stderr otherwise. Levels: info, warning and critical alerts log at INFO, WARNING and
CRITICAL; a resolved alert at INFO. The CLI's own training commands (`monitor train`, `monitor
demo`) print to their terminal whatever else configured logging (`to_terminal`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from monitor.schema import Alert, Severity

LOGGER = "trainmon"
ALERTS_LOGGER = "trainmon.alerts"
_LEVELS = {Severity.info: logging.INFO, Severity.warning: logging.WARNING, Severity.critical: logging.CRITICAL}


class ConsoleHandler(logging.Handler):
    """The default handler of the "trainmon" logger; silent once the root logger has a handler
    (the user configured logging, and the record reaches their handlers by propagation)."""

    forced = False  # inside to_terminal(): always write

    def emit(self, record: logging.LogRecord) -> None:
        if not ConsoleHandler.forced and logging.getLogger().handlers:
            return
        try:
            msg = self.format(record)
            tqdm = sys.modules.get("tqdm")  # loaded: a bar may be on screen
            if tqdm is not None and hasattr(tqdm, "tqdm"):
                tqdm.tqdm.write(msg, file=sys.stderr)
            else:
                sys.stderr.write(msg + "\n")
                sys.stderr.flush()
        except Exception:
            self.handleError(record)


def install_console_handler() -> None:
    """Give the "trainmon" logger its default handler and INFO level, unless it has a handler or a level."""
    logger = logging.getLogger(LOGGER)
    if not logger.handlers:
        logger.addHandler(ConsoleHandler())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


@contextlib.contextmanager
def to_terminal() -> Iterator[None]:
    """For a command that trains in its own process: the "trainmon" records go to its stderr, once
    (not also to the root logger's handlers); the logger's settings come back afterwards."""
    install_console_handler()
    logger = logging.getLogger(LOGGER)
    saved = logger.propagate
    logger.propagate, ConsoleHandler.forced = False, True
    try:
        yield
    finally:
        logger.propagate, ConsoleHandler.forced = saved, False


class ConsoleSink:
    """Alerts as log lines on "trainmon.alerts" (a `Sink`)."""

    def __init__(self) -> None:
        self._log = logging.getLogger(ALERTS_LOGGER)

    def emit(self, alert: Alert) -> None:
        level = _LEVELS[alert.severity] if alert.status == "firing" else logging.INFO
        self._log.log(level, alert.line())

    def restore(self, alert: Alert) -> None:
        """Nothing to re-establish: the line was logged when the alert fired, and logging it again
        would read as a second alert."""

    def close(self) -> None:
        """Nothing to release: the handlers belong to logging."""
