"""What the framework callbacks share: the validated config, the Monitor they attach, the undo of their
own intercepts, and turning a halt (`halt_on`) into the framework's own way of stopping."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monitor.config import MonitorConfig, load_config

log = logging.getLogger("trainmon")


class Attached:
    def __init__(self, config: MonitorConfig | dict | str | os.PathLike[str] | None = None,
                 run_dir: str | os.PathLike[str] | None = None) -> None:
        self.config = load_config(config)  # a bad config fails here, before training starts
        self.run_dir = run_dir
        self.monitor: Any = None  # the running Monitor (None before training starts)
        self._undo: list[Callable[[], None]] = []
        self._halted = False

    def _attach(self, build: Callable[[], Any]) -> bool:
        """Attach through `build()`; a fault of the monitor's own is logged and training goes on unmonitored."""
        self._close()
        self._halted = False
        try:
            self.monitor = build()
            return True
        except Exception as e:  # never an exception out of the framework's train()/fit()
            log.error("trainmon: not monitoring this run: %s", e, exc_info=not isinstance(e, NotImplementedError))
            self._close()
            return False

    def _run_dir(self, runs_root: Path, resume_step: int) -> str | os.PathLike[str] | None:
        """Where this run goes: `run_dir=` or $MONITOR_RUN_DIR when given; a resumed trainer (its global step
        > 0) goes on in the latest run directory under `runs_root`, as a new attempt of that run; else a
        new directory there (None: attach names it)."""
        from monitor.runlog.rundir import latest_run_dir

        if self.run_dir is not None or os.environ.get("MONITOR_RUN_DIR") or resume_step <= 0:
            return self.run_dir
        return latest_run_dir(runs_root)

    def _live(self) -> Any:
        mon = self.monitor
        return mon if mon is not None and not mon._closed else None

    def _halt_due(self, action: str) -> bool:
        """Whether the framework must stop now; the first time, flushes the run and says why."""
        mon = self._live()
        why = mon.halt_requested if mon is not None else None
        if why and not self._halted:
            self._halted = True
            mon.flush()
            log.critical("%s; %s", why, action)
        return bool(why)

    def _close(self) -> None:
        for undo in self._undo:
            undo()
        self._undo.clear()
        if self.monitor is not None:
            self.monitor.close()
