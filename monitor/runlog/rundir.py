"""The run directory: run.json, targets.json, alerts.jsonl and per-rank event files.

Layout (see DESIGN.md): rank 0 writes its event file into the run directory
itself; rank N > 0 into `rankN/` (TensorBoard reads one growing file per
directory at a time, so concurrent writers need a directory each). run.json and
targets.json are shared by all ranks and updated under a file lock with an
atomic rename, so readers never see a half-written file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from monitor import jsontext
from monitor.schema import Alert, Endpoint, RunInfo

RUN_JSON = "run.json"
TARGETS_JSON = "targets.json"
# Beside the run directories: one file per run, so that Prometheus (whose file_sd globs only the
# last path segment) can discover new runs with `<runs>/.trainmon-targets/*.json`.
SHARED_TARGETS_DIR = ".trainmon-targets"
ALERTS_JSONL = "alerts.jsonl"
_LOCK = ".trainmon.lock"
_RANK_DIR = re.compile(r"^rank(\d+)$")
# How long an update waits for the directory's lock. Every holder keeps it for one small read and
# rename (milliseconds), so a longer wait means a hung network filesystem or a stopped process:
# `flock` without a timeout would wait forever, and the training process with it.
LOCK_TIMEOUT_SECONDS = 10.0
# What parsing a damaged JSON file raises: ValueError (JSONDecodeError, UnicodeDecodeError) and, for
# arrays or objects nested deeper than the interpreter's recursion limit, RecursionError. Readers
# catch both alike: a file that is not JSON and one nested too deeply are the same damage.
JSON_DAMAGE = (ValueError, RecursionError)


class RunDirError(OSError):
    """The run directory cannot be created or written; the message names the path."""


class RunDirLocked(TimeoutError):
    """The run directory's lock was not free within LOCK_TIMEOUT_SECONDS; the update was given up."""


# The framework callbacks' runs go under <the framework's output directory>/trainmon/.
INTEGRATION_RUNS = "trainmon"


def default_run_dir(environ: dict[str, str] | None = None, parent: str | os.PathLike[str] | None = None) -> Path:
    """$MONITOR_RUN_DIR, else <parent>/<utc-time>-<host> (parent: runs/, or a framework's output directory)."""
    env = os.environ if environ is None else environ
    if env.get("MONITOR_RUN_DIR"):
        return Path(env["MONITOR_RUN_DIR"])
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path("runs" if parent is None else parent) / f"{stamp}-{socket.gethostname()}"


def latest_run_dir(parent: str | os.PathLike[str]) -> Path | None:
    """The most recently named run directory (one holding run.json) directly under `parent`: where a
    framework's resumed run goes on (default names start with the UTC time, so they sort by it)."""
    try:
        with os.scandir(parent) as it:
            names = sorted(e.name for e in it if e.is_dir() and not e.name.startswith(".")
                           and os.path.exists(os.path.join(e.path, RUN_JSON)))
    except OSError:
        return None
    return Path(parent) / names[-1] if names else None


def rank_dir(run_dir: Path, rank: int) -> Path:
    return run_dir if rank == 0 else run_dir / f"rank{rank}"


def rank_dirs(run_dir: Path) -> dict[int, Path]:
    """Every rank's directory of a run (rank 0's is the run directory itself), by rank."""
    out = {0: run_dir}
    with os.scandir(run_dir) as it:
        for e in it:
            m = _RANK_DIR.match(e.name)
            if m and e.is_dir():
                out[int(m.group(1))] = Path(e.path)
    return out


class RunDir:
    def __init__(self, path: str | os.PathLike[str], rank: int = 0) -> None:
        self.path = Path(path)
        self.rank = rank
        # time.monotonic() past which lock waits give up at once (the monitor's close sets it: its
        # updates fit its overall deadline); None: each wait has LOCK_TIMEOUT_SECONDS.
        self.deadline: float | None = None
        try:
            self.events_dir.mkdir(parents=True, exist_ok=True)
            # The real test of writability (permission bits lie for root and read-only mounts).
            with tempfile.NamedTemporaryFile(dir=self.events_dir, prefix=".probe"):
                pass
        except OSError as e:
            raise RunDirError(f"run_dir {str(self.path)!r} is not writable: {e.strerror or e}") from e

    @property
    def run_id(self) -> str:
        return self.path.resolve().name

    @property
    def events_dir(self) -> Path:
        return rank_dir(self.path, self.rank)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The directory's lock, polled until LOCK_TIMEOUT_SECONDS (or `deadline`) pass: RunDirLocked then."""
        with open(self.path / _LOCK, "a") as lock:
            deadline = time.monotonic() + LOCK_TIMEOUT_SECONDS
            if self.deadline is not None:
                deadline = min(deadline, self.deadline)
            pause = 0.001
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise RunDirLocked(f"{self.path / _LOCK} stayed locked by another process; the update of "
                                           f"{self.path} was given up") from None
                    time.sleep(min(pause, left))
                    pause = min(pause * 2, 0.05)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read_json(self, name: str, default: Any) -> Any:
        """A JSON file of the directory as it stands (no lock), or `default` when missing or damaged."""
        try:
            return jsontext.loads((self.path / name).read_text(encoding="utf-8"))
        except (FileNotFoundError, *JSON_DAMAGE):
            return default

    def _write_json(self, name: str, data: Any) -> None:
        """Atomically, durably: a synced temporary file renamed over `name`; removed when a write fails
        (a full disk leaves no partial files behind). Mode 0644 under the usual umask, as the event
        files: a Prometheus or `monitor watch` running as another user reads targets.json and run.json."""
        fd, tmp = _create_readable(self.path, f".{name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, default=str)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path / name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def update_json(self, name: str, fn: Callable[[Any], Any], default: Any) -> Any:
        with self._locked():
            data = fn(self.read_json(name, default))
            self._write_json(name, data)
            return data

    def write_run_info(self, info: RunInfo) -> None:
        """Write run.json, keeping endpoints other ranks registered already and the attempts as run.json
        lists them (registered under this lock; their heartbeats change)."""
        new = info.model_dump(mode="json")

        def merge(old: dict) -> dict:
            eps = {e["rank"]: e for e in old.get("endpoints", [])} if isinstance(old, dict) else {}
            eps.update({e["rank"]: e for e in new.get("endpoints", [])})
            new["endpoints"] = [eps[k] for k in sorted(eps)]
            if isinstance(old, dict) and old.get("attempts"):
                new["attempts"] = old["attempts"]
            return new

        self.update_json(RUN_JSON, merge, {})

    def add_endpoint(self, ep: Endpoint, run_id: str) -> None:
        """Record this rank's /metrics endpoint in run.json and targets.json (Prometheus file_sd)."""
        epd = ep.model_dump(mode="json")

        def add_to_run(old: dict) -> dict:
            old = old if isinstance(old, dict) else {"run_id": run_id}
            eps = [e for e in old.get("endpoints", []) if e.get("rank") != ep.rank] + [epd]
            old["endpoints"] = sorted(eps, key=lambda e: e["rank"])
            return old

        def add_to_targets(old: list) -> list:
            old = [t for t in (old if isinstance(old, list) else [])
                   if t.get("labels", {}).get("trainmon_rank") != str(ep.rank)]
            old.append({"targets": [_hostport(ep.host, ep.port)],  # the advertised address (metrics.advertise)
                        "labels": {"trainmon_run": run_id, "trainmon_rank": str(ep.rank)}})
            return sorted(old, key=lambda t: int(t["labels"]["trainmon_rank"]))

        self.update_json(RUN_JSON, add_to_run, {})
        self._share_targets(self.update_json(TARGETS_JSON, add_to_targets, []))

    def remove_endpoint(self, rank: int, *, run_json: bool = False) -> None:
        """Drop this rank's target once its server is gone, so Prometheus stops scraping a dead port;
        `run_json`: from run.json's endpoints too (a rank that serves no endpoint, where an earlier
        attempt left one)."""
        if run_json:
            def drop(old: Any) -> Any:
                if isinstance(old, dict) and old.get("endpoints"):
                    old["endpoints"] = [e for e in old["endpoints"] if e.get("rank") != rank]
                return old

            self.update_json(RUN_JSON, drop, {})
        self._share_targets(self.update_json(
            TARGETS_JSON,
            lambda old: [t for t in (old if isinstance(old, list) else [])
                         if t.get("labels", {}).get("trainmon_rank") != str(rank)],
            [],
        ))

    @property
    def shared_targets_path(self) -> Path:
        return self.path.resolve().parent / SHARED_TARGETS_DIR / f"{self.run_id}.json"

    def _share_targets(self, targets: list) -> None:
        """Mirror targets.json into the shared directory (best effort: the run's own file is the contract)."""
        path = self.shared_targets_path
        try:
            if not targets:
                path.unlink(missing_ok=True)
                return
            path.parent.mkdir(exist_ok=True)
            fd, tmp = _create_readable(path.parent, ".tmp.")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(targets, f, indent=2)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError:
            pass


def _hostport(host: str, port: int) -> str:
    """host:port as a file_sd target; an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _create_readable(directory: Path, prefix: str) -> tuple[int, str]:
    """(fd, path) of a new, uniquely named file created 0644 less the umask (mkstemp's are 0600: a
    Prometheus running as another user could not read the targets)."""
    while True:
        path = os.path.join(directory, prefix + secrets.token_hex(6))
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), path
        except FileExistsError:
            continue


def _ends_a_line(path: Path) -> bool:
    """Whether the file is empty or ends with a newline (unreadable: assumed so, as before this check)."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return True
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"
    except OSError:
        return True


class JsonlAlertSink:
    """Appends each alert to alerts.jsonl as one line (O_APPEND: concurrent ranks never interleave a line).
    A write error (a full disk) is the caller's to count; a line cut short by one is ended before the
    next, so that only it is lost (readers skip it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        # The last write stopped inside its line: ours, or (a file that does not end its last line) a
        # writer that crashed mid-line, whose torn line must not swallow our first alert.
        self._torn = not _ends_a_line(path)

    def emit(self, alert: Alert) -> None:
        data = (alert.model_dump_json() + "\n").encode("utf-8")
        if self._torn:
            data = b"\n" + data
        n = os.write(self._fd, data)  # raises when nothing could be written
        self._torn = n < len(data)
        if self._torn:
            raise OSError(f"only {n} of {len(data)} bytes of an alert were written to {self.path}")

    def restore(self, alert: Alert) -> None:
        """Already in the file."""

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
