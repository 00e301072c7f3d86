"""Console alert sink: one line per alert on stderr (or any writer)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from monitor.schema import Alert


class ConsoleSink:
    def __init__(self, write: Callable[[str], object] | None = None) -> None:
        self._write = write

    def emit(self, alert: Alert) -> None:
        line = alert.line()
        if self._write is not None:
            self._write(line)
        else:
            print(line, file=sys.stderr, flush=True)
