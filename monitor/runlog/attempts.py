"""Attempts: the processes that wrote one run directory, and the one reading of a directory that has several.

Every `attach` into a run directory starts an attempt (run.json `attempts`; see `monitor.schema.Attempt`)
and every event file names its attempt (`...rank<R>.attempt<N>`; files from before attempts are attempt
1). Reading a rank's records in file order, attempt after attempt, the records that count (its
*lineage*) follow from how each attempt started:
- a resume at step k supersedes the earlier attempts' records from k on;
- a restart from scratch starts over: nothing earlier is kept;
- within one attempt, a step seen again (a foreign log that restarted) supersedes from that step on.

`lineage` gives those records; `history` the ones a new attempt builds on (what a resumed process, or
a rules engine crossing into the next attempt, replays to rebuild its windows). The training process,
`monitor check`, `monitor watch` and the report all read attempts through these two functions.
No torch here.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterable
from pathlib import Path

from monitor.runlog.rundir import RunDirError
from monitor.schema import Attempt, RunInfo, StepRecord

_ATTEMPT_NAME = re.compile(r"\.attempt(\d+)$")


class RunDirBusy(RunDirError):
    """Another live process writes this run directory; the message names it."""


def attempt_of(file_name: str) -> int:
    """The attempt an event file belongs to (files written before attempts belong to attempt 1)."""
    m = _ATTEMPT_NAME.search(file_name)
    return int(m.group(1)) if m else 1


def file_order(file_name: str) -> tuple:
    """The order a run directory's event files are read in: attempt by attempt, then by name."""
    from monitor.runlog.adapters.tbtail import natural_key

    return attempt_of(file_name), natural_key(file_name)


def resolve(info: RunInfo, attempt_id: int, first_step: int) -> Attempt:
    """run.json's attempt, or (not listed yet, or lost) a stand-in inferred from its first record."""
    a = info.attempt(attempt_id)
    if a is not None:
        return a
    return Attempt(id=attempt_id, kind="resumed" if first_step > 0 else "restarted", start_step=first_step,
                   lineage_start=first_step, how="first record")


def _cut(out: list[StepRecord], step: int) -> None:
    while out and out[-1].step >= step:
        out.pop()


def lineage(records: Iterable[StepRecord], info: RunInfo) -> list[StepRecord]:
    """The records of one rank that count, from all of them in reading order (attempt after attempt)."""
    out: list[StepRecord] = []
    current: int | None = None
    for r in records:
        if r.attempt != current:
            first = current is None
            current = r.attempt
            a = resolve(info, current, r.step)
            if not first:
                if a.kind == "resumed":
                    _cut(out, a.start_step)
                else:
                    out.clear()
        elif out and r.step <= out[-1].step:
            _cut(out, r.step)
        out.append(r)
    return out


def history(records: Iterable[StepRecord], info: RunInfo, attempt: Attempt) -> list[StepRecord]:
    """What `attempt` builds on, from one rank's records of the earlier attempts (in reading order):
    the lineage before its start step when it resumed, nothing when it restarted."""
    if attempt.kind != "resumed":
        return []
    return [r for r in lineage((r for r in records if r.attempt < attempt.id), info) if r.step < attempt.start_step]


class Recorded:
    """The attempts of a run read whole (`read_run`): what a rules engine asks when it crosses into one."""

    def __init__(self, info: RunInfo, stream: dict[int, list[StepRecord]]) -> None:
        self.info, self.stream = info, stream

    def attempt(self, attempt_id: int, first_step: int) -> Attempt:
        return resolve(self.info, attempt_id, first_step)

    def history(self, rank: int, attempt: Attempt) -> list[StepRecord]:
        return history(self.stream.get(rank, []), self.info, attempt)


def read_rank(run_dir: Path, rank: int, info: RunInfo, below_attempt: int | None = None,
              problems: list[str] | None = None) -> list[StepRecord]:
    """Every record of one rank of a trainmon run directory in reading order (attempts below
    `below_attempt` only, when given)."""
    from monitor.runlog.adapters.tbtail import TensorBoardTail
    from monitor.runlog.events import StepDecoder
    from monitor.runlog.rundir import rank_dir

    directory = rank_dir(run_dir, rank)
    if not directory.is_dir():
        return []
    decoders: dict[int, StepDecoder] = {}

    def decoder(name: str):
        n = attempt_of(name)
        if below_attempt is not None and n >= below_attempt:
            return lambda data: None
        d = decoders.get(n)
        if d is None:
            d = decoders[n] = StepDecoder(rank, info.model.param_names, attempt=n)
        return d.decode

    return TensorBoardTail(directory, problems, order=file_order).poll_decoded(decoder)


# -- liveness --------------------------------------------------------------------------------------


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), None where unknown or not running."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            rest = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if rest[0] in (b"Z", b"X"):  # a zombie has exited: only its exit status is left
        return None
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OSError:
        return False
    if os.path.isdir("/proc/self"):
        return process_start(pid) is not None  # not a zombie
    return True


def alive(a: Attempt, *, now: float | None = None, stale_after: float = 120.0) -> bool:
    """Whether the attempt's process may still be writing: on this host, its pid is running (and is the
    same process: its start time matches); elsewhere, its heartbeat is fresh."""
    if a.ended is not None:
        return False
    if a.host == socket.gethostname() and a.pid is not None:
        if not _pid_running(a.pid):
            return False
        return a.pid_start is None or process_start(a.pid) in (None, a.pid_start)
    beat = a.heartbeat if a.heartbeat is not None else a.started
    return (time.time() if now is None else now) - beat < stale_after


def describe(a: Attempt) -> str:
    """One line about an attempt, for errors, the live view and the report."""
    how = {"fresh": "fresh", "restarted": "restarted from scratch",
           "resumed": f"resumed at step {a.start_step}"}.get(a.kind, a.kind)
    where = f"pid {a.pid} on {a.host}" if a.pid is not None else (a.host or "unknown host")
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a.started))
    end = f", ended at step {a.steps}" if a.ended is not None and a.steps is not None else (
        ", ended" if a.ended is not None else "")
    return f"attempt {a.id}: {how}, {where}, started {started}{end}"
