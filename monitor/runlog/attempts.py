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

import math
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from monitor.runlog.rundir import RunDirError
from monitor.schema import Alert, Attempt, RunInfo, StepRecord

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


class _Bounds:
    """Per attempt id, the step its records must stay below to count for `target` (an attempt after
    them; None: the directory as it stands): the smallest start of the resumes after it, -inf past a
    restart. Attempts run.json does not list supersede nothing."""

    def __init__(self, info: RunInfo, target: Attempt | None) -> None:
        self.listed = sorted(info.attempts, key=lambda a: a.id)
        self.target = target
        self._cache: dict[int, float] = {}

    def __call__(self, attempt_id: int) -> float:
        bound = self._cache.get(attempt_id)
        if bound is None:
            t = self.target
            bound = math.inf if t is None else t.start_step if t.kind == "resumed" else -math.inf
            for b in self.listed:
                if attempt_id < b.id and (t is None or b.id < t.id):
                    bound = min(bound, b.start_step) if b.kind == "resumed" else -math.inf
            self._cache[attempt_id] = bound
        return bound


def kept(records: Iterable[StepRecord], info: RunInfo, before: Attempt | None = None) -> Iterator[StepRecord]:
    """The records (of one rank, in reading order) that count for attempt `before` (its history: the
    earlier attempts' records it keeps), or for the directory as it stands; streamed, in step order."""
    bound = _Bounds(info, before)
    limit = math.inf if before is None else before.id
    for r in records:
        if r.attempt < limit and r.step < bound(r.attempt):
            yield r


def lineage(records: Iterable[StepRecord], info: RunInfo) -> list[StepRecord]:
    """The records of one rank that count, from all of them in reading order (attempt after attempt);
    a step seen again (an attempt run.json does not list, a foreign log that restarted) supersedes
    the records from that step on."""
    out: list[StepRecord] = []
    for r in kept(records, info):
        if out and r.step <= out[-1].step:
            _cut(out, r.step)
        out.append(r)
    return out


def history(records: Iterable[StepRecord], info: RunInfo, attempt: Attempt) -> Iterator[StepRecord]:
    """What `attempt` builds on, from one rank's records (in reading order): the earlier attempts'
    records it keeps before its start step when it resumed, nothing when it restarted."""
    if attempt.kind != "resumed":
        return iter(())
    return kept(records, info, attempt)


def still_active(alerts: Iterable[Alert], rank: int, below_attempt: int) -> list[Alert]:
    """The alerts of `rank` that earlier attempts left firing (alerts.jsonl: the last word per rule)."""
    last: dict[str, Alert] = {}
    for a in alerts:
        if a.rank == rank and (a.attempt or 1) < below_attempt:
            last[a.rule] = a
    return [a for a in last.values() if a.status == "firing"]


class Recorded:
    """The attempts of a run read whole (`read_run`): what a rules engine asks when it crosses into one."""

    def __init__(self, info: RunInfo, stream: dict[int, list[StepRecord]]) -> None:
        self.info, self.stream = info, stream

    def attempt(self, attempt_id: int, first_step: int) -> Attempt:
        return resolve(self.info, attempt_id, first_step)

    def history(self, rank: int, attempt: Attempt) -> Iterator[StepRecord]:
        return history(self.stream.get(rank, []), self.info, attempt)


def read_rank(run_dir: Path, rank: int, info: RunInfo, below_attempt: int | None = None,
              problems: list[str] | None = None, chunk: int = 8192) -> Iterator[StepRecord]:
    """Every record of one rank of a trainmon run directory in reading order (attempts below
    `below_attempt` only, when given), read `chunk` records at a time: memory stays bounded."""
    from monitor.runlog.adapters.tbtail import TensorBoardTail
    from monitor.runlog.events import StepDecoder
    from monitor.runlog.rundir import rank_dir

    directory = rank_dir(run_dir, rank)
    if not directory.is_dir():
        return
    decoders: dict[int, StepDecoder] = {}

    def decoder(name: str):
        n = attempt_of(name)
        if below_attempt is not None and n >= below_attempt:
            return lambda data: None
        d = decoders.get(n)
        if d is None:
            d = decoders[n] = StepDecoder(rank, info.model.param_names, attempt=n)
        return d.decode

    tail = TensorBoardTail(directory, problems, order=file_order)
    while True:
        got = tail.poll_decoded(decoder, chunk)
        yield from got
        if len(got) < chunk:
            return


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
