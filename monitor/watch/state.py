"""The daemon's memory across restarts: read positions, rule state and alert state per run.

One file, written atomically (temp file + rename) every few seconds and at shutdown. Read
positions are JSON (Source.state()); the rules engine of each run, whose windows and alert
lifecycle must survive so that a restart neither re-sends old alerts nor forgets an active one,
is pickled. A state file from another version that cannot be loaded is set aside, not fatal:
the daemon then re-reads the runs with its sinks muted up to where it was.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("trainmon.watch")

STATE_FILE = "watch-state.json"
VERSION = 1


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "trainmon" / "watch"


@dataclass
class SavedRun:
    positions: dict[str, Any] = field(default_factory=dict)
    engine: Any = None  # a RulesEngine, unpickled
    live: bool = False
    last_time: float | None = None


class WatchState:
    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.path = self.dir / STATE_FILE
        self.runs: dict[str, SavedRun] = {}

    def load(self) -> list[str]:
        """Read the state file; returns problems (a damaged file is moved aside, never fatal)."""
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("version") != VERSION:
                raise ValueError(f"state version {data.get('version')!r}, expected {VERSION}")
            for key, r in data.get("runs", {}).items():
                engine = pickle.loads(base64.b64decode(r["engine"])) if r.get("engine") else None
                self.runs[key] = SavedRun(positions=r.get("positions", {}), engine=engine, live=r.get("live", False),
                                          last_time=r.get("last_time"))
            return []
        except Exception as e:
            aside = self.path.with_name(f"{STATE_FILE}.unreadable-{int(time.time())}")
            try:
                self.path.replace(aside)
            except OSError:
                pass
            self.runs = {}
            return [f"{self.path}: could not load the saved state ({e}); moved to {aside.name}, starting afresh"]

    def save(self, runs: dict[str, SavedRun]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        data = {"version": VERSION, "saved": time.time(), "runs": {}}
        for key, r in runs.items():
            data["runs"][key] = {
                "positions": r.positions,
                "engine": base64.b64encode(pickle.dumps(r.engine)).decode("ascii") if r.engine is not None else None,
                "live": r.live,
                "last_time": r.last_time,
            }
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".watch-state.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, self.path)
