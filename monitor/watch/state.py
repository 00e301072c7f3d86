"""The daemon's memory across restarts: per run, how far its rules got and which alerts were active.

One JSON file (versioned, written atomically: temp file + rename) every few seconds and at shutdown.
No rule state is kept: on a restart the daemon reads each run again from a saved read position
(`positions`, the Source's own `state()`, taken REPLAY_STEPS records per rank or more before the
end of what was judged; from the start when there is none) and replays the records from there to
what it had judged (per rank, `judged` records; `judged_at` of them lie before the position) through
fresh rules with its sinks muted, so windows, baselines and alert lifecycles are rebuilt from the
recent records themselves and no alert is sent twice. Alerts that were active (`active`) and still are after the replay are restored to the sinks,
not re-sent; those that are no longer active (a stall the run recovered from while no daemon
watched) are sent as resolved.
A state file that cannot be loaded is set aside, not fatal: every run present at startup is then
taken as already judged (replayed muted), so old alerts are not sent again.
The directory is created private (0700): it says which runs exist and where. A state directory (or
file) that another user owns, or that is group- or world-writable, is refused: whoever can write
there decides what the daemon believes it has judged and sent.
Runs not seen for FORGET_AFTER_SECONDS (deleted, or on a filesystem gone for good) are dropped.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitor import jsontext
from monitor.schema import Alert

log = logging.getLogger("trainmon.watch")

STATE_FILE = "watch-state.json"
VERSION = 3
REPLAY_STEPS = 5000  # records per rank replayed after a restart: past every rule's window (at most a few hundred)
FORGET_AFTER_SECONDS = 7 * 24 * 3600  # a run's entry outlives a week-long unmount, not forever


class WatchStateError(OSError):
    """The state directory cannot be trusted or used; the message names it and why."""


def check_private(path: Path) -> None:
    """WatchStateError unless `path` (when it exists) is ours and writable by no one else."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise WatchStateError(f"{path}: cannot be read: {e.strerror or e}") from None
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise WatchStateError(f"{path} belongs to uid {st.st_uid}, not to this user ({os.getuid()}): refusing to use "
                              "another user's state (give --state-dir a directory of your own)")
    if st.st_mode & 0o022:
        raise WatchStateError(f"{path} is writable by its group or by everyone (mode {st.st_mode & 0o777:o}): anyone "
                              f"who can write there decides what the daemon believes it sent; chmod go-w {path}")


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "trainmon" / "watch"


@dataclass
class SavedRun:
    judged: dict[int, int] = field(default_factory=dict)  # rank -> records the rules had seen
    active: list[Alert] = field(default_factory=list)  # the alerts active then
    live: bool = False  # steps arrived while the daemon watched (only such a run can stall)
    everything: bool = False  # judged up to whatever the run holds (the state was unreadable)
    seen: float = field(default_factory=time.time)  # when a daemon last watched it
    positions: dict[str, Any] | None = None  # the Source's read positions to replay from (None: the start)
    judged_at: dict[int, int] = field(default_factory=dict)  # rank -> records before those positions


def _saved_run(raw: Any) -> SavedRun:
    """A run's entry, checked field by field (the file is input like any other)."""
    if not isinstance(raw, dict):
        raise ValueError("a run's entry is not an object")
    judged = raw.get("judged", {})
    active = raw.get("active", [])
    if not isinstance(judged, dict) or not all(isinstance(v, int) and v >= 0 for v in judged.values()):
        raise ValueError("'judged' must map ranks to record counts")
    if not isinstance(active, list):
        raise ValueError("'active' must be a list of alerts")
    seen = raw.get("seen", time.time())
    if not isinstance(seen, (int, float)):
        raise ValueError("'seen' must be a time")
    positions = raw.get("positions")
    judged_at = raw.get("judged_at", {})
    if positions is not None and not isinstance(positions, dict):
        raise ValueError("'positions' must be an object")
    if not isinstance(judged_at, dict) or not all(isinstance(v, int) and v >= 0 for v in judged_at.values()):
        raise ValueError("'judged_at' must map ranks to record counts")
    return SavedRun(judged={int(k): v for k, v in judged.items()}, active=[Alert.model_validate(a) for a in active],
                    live=raw.get("live") is True, seen=float(seen), positions=positions,
                    judged_at={int(k): v for k, v in judged_at.items()})


class WatchState:
    def __init__(self, directory: Path) -> None:
        """WatchStateError when the directory or its state file is another user's or writable by others."""
        self.dir = Path(directory)
        self.path = self.dir / STATE_FILE
        check_private(self.dir)
        check_private(self.path)
        self.runs: dict[str, SavedRun] = {}
        self.unreadable = False  # a state file was there but could not be loaded

    def load(self) -> list[str]:
        """Read the state file; returns problems (a damaged file is moved aside, never fatal)."""
        if not self.path.exists():
            return []
        try:
            data = jsontext.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("version") != VERSION:
                version = data.get("version") if isinstance(data, dict) else None
                raise ValueError(f"state version {version!r}, expected {VERSION}")
            runs = data.get("runs", {})
            if not isinstance(runs, dict):
                raise ValueError("'runs' is not an object")
            self.runs = {str(key): _saved_run(r) for key, r in runs.items()}
            return []
        except Exception as e:
            aside = self.path.with_name(f"{STATE_FILE}.unreadable-{int(time.time())}")
            try:
                self.path.replace(aside)
            except OSError:
                pass
            self.runs = {}
            self.unreadable = True
            return [f"{self.path}: could not load the saved state ({e}); moved to {aside.name}; the runs found "
                    "now are taken as already judged (their old alerts are not sent again)"]

    def save(self, runs: dict[str, SavedRun]) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        now = time.time()
        data = {"version": VERSION, "saved": now, "runs": {
            key: {"judged": {str(rank): n for rank, n in r.judged.items()}, "active": [a.model_dump(mode="json") for a in r.active],
                  "live": r.live, "seen": r.seen, "positions": r.positions,
                  "judged_at": {str(rank): n for rank, n in r.judged_at.items()}}
            for key, r in runs.items() if not r.everything and now - r.seen < FORGET_AFTER_SECONDS}}
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".watch-state.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, self.path)
