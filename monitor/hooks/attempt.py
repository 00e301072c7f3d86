"""The attempt a training process starts in its run directory (see monitor.runlog.attempts).

At attach, rank 0 reads what the directory holds, tells a resume from a restart, finds the loop's
step index, and registers the attempt in run.json under the directory's lock, refusing when the
directory's current attempt is still alive (another process writes it). The other ranks of the job
take rank 0's attempt through the job's store. Every rank reads its own records of the earlier
attempts, which a resumed process's rules replay before its first step (a warm start).

The loop's step index of a resume, in order of trust:
1. `resume_step` from the caller (framework integrations pass their trainer's global step);
2. the scheduler's own count (`last_epoch`), which counts loop steps also when GradScaler skipped the
   optimizer step, divided by the scheduler calls per optimizer step seen in the directory's records;
3. the optimizer's count (`state['step']`), which lags the loop by every skipped step: the directory's
   records say which steps were skipped, so the count maps back to the loop's index.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from monitor import jsontext
from monitor.config import AttemptsConfig
from monitor.hooks import ddp, introspect
from monitor.runlog import attempts
from monitor.runlog.attempts import RunDirBusy
from monitor.runlog.reader import read_alerts
from monitor.runlog.rundir import RUN_JSON, RunDir, RunDirError
from monitor.schema import Alert, Attempt, RunInfo, StepRecord

log = logging.getLogger("trainmon")



@dataclass
class Started:
    attempt: Attempt
    prior: RunInfo | None  # run.json as the earlier attempts left it (None: a new directory)
    history: Iterable[StepRecord]  # this rank's records the attempt builds on (its rules replay them), streamed
    active: list[Alert]  # this rank's alerts the earlier attempts left firing (carried over or resolved)


def _prior_info(path: Path) -> RunInfo | None:
    try:
        return RunInfo.model_validate(jsontext.loads((path / RUN_JSON).read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except Exception as e:  # damaged: the attempt starts as if the directory were new, and says so
        log.warning("trainmon: %s is unreadable (%s); earlier attempts are not taken into account", path / RUN_JSON, e)
        return None


def scheduler_count(scheduler: Any) -> int:
    """A torch LR scheduler's own step count (`last_epoch`), 0 for a fresh one or another kind."""
    n = getattr(scheduler, "last_epoch", None) if scheduler is not None else None
    return n if isinstance(n, int) and n > 0 else 0


def resume_point(optimizer: torch.optim.Optimizer, scheduler: Any, resume_step: int | None,
                 earlier: Iterable[StepRecord]) -> tuple[int, str]:
    """(the loop's index of the first step this process takes, how it was found); `earlier`: this
    rank's records of the earlier attempts that count, in step order (read once, streamed)."""
    if resume_step is not None:
        return resume_step, "resume_step"
    optimizer_steps = introspect.resumed_step(optimizer)
    scheduler_steps = scheduler_count(scheduler)
    if not optimizer_steps and not scheduler_steps:
        return 0, "none"
    per_step: Counter[int] = Counter()  # scheduler calls per optimizer step, as recorded
    updates, mapped, last = 0, None, None
    for r in earlier:
        if r.scheduler_steps:
            per_step[r.scheduler_steps] += 1
        if mapped is None and updates == optimizer_steps:
            mapped = r.step  # the first loop step after that many updates that were not skipped
        updates += not r.skipped
        last = r.step
    if mapped is None and last is not None and updates == optimizer_steps:
        mapped = last + 1
    if scheduler_steps:
        if per_step:
            return round(scheduler_steps / per_step.most_common(1)[0][0]), "scheduler"
        # No records to tell: one scheduler call per loop step unless the counts say per micro-batch.
        if not optimizer_steps or scheduler_steps < 2 * optimizer_steps:
            return scheduler_steps, "scheduler"
    return (mapped if mapped is not None else optimizer_steps), "optimizer"


def _job() -> str | None:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return run_id if run_id and run_id != "none" else None


def _register(rundir: RunDir, new: Attempt, stale_after: float,
              on_error: Callable[[str, BaseException], None] | None = None) -> Attempt:
    """Append `new` to run.json's attempts under the directory's lock (its id is the next one), unless
    the current attempt is alive and not of this job: RunDirBusy names it.

    With `on_error`, a write that fails (a full disk, the lock not free in time) is handed to it and the
    attempt goes on unregistered, its id and the busy check taken from run.json as it stands."""
    out: list[Attempt] = []

    def add(old: Any) -> dict:
        old = old if isinstance(old, dict) else {}
        listed = []
        for raw in old.get("attempts") or []:
            try:
                listed.append(Attempt.model_validate(raw))
            except Exception:
                continue  # a damaged entry: left out
        current = listed[-1] if listed else None
        if current is not None and attempts.alive(current, stale_after=stale_after) and not (
                new.job is not None and current.job == new.job):
            beat = current.heartbeat if current.heartbeat is not None else current.started
            raise RunDirBusy(
                f"run_dir {str(rundir.path)!r} is being written by another process ({attempts.describe(current)}; "
                f"last heartbeat {time.time() - beat:.0f} s ago). Stop that process or wait for it to end, or give "
                "this run its own run_dir.")
        base = listed[-1].id if listed else (1 if old else 0)  # a run.json without attempts: attempt 1 wrote it
        attempt = new.model_copy(update={"id": base + 1})
        out.append(attempt)
        old["attempts"] = [a.model_dump(mode="json") for a in listed] + [attempt.model_dump(mode="json")]
        return old

    try:
        rundir.update_json(RUN_JSON, add, {})
    except RunDirError:
        raise  # RunDirBusy: a refusal, not a fault
    except OSError as e:
        if on_error is None:
            raise
        on_error("attempt registration", e)
        if not out:  # the lock was never had: judged on run.json as it stands
            add(rundir.read_json(RUN_JSON, {}))
    return out[0]


def _share(store: Any, rank: int, attempt: Attempt | None, timeout_s: float = 60.0) -> Attempt | None:
    """Rank 0's attempt on every rank of the job (one key per torchrun restart of its workers)."""
    what = f"attempt/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    raw = ddp.from_rank0(store, rank, what, attempt.model_dump_json() if attempt is not None else None, timeout_s)
    try:
        return Attempt.model_validate_json(raw) if raw is not None else attempt
    except ValueError as e:
        log.warning("trainmon: rank %d got an unreadable attempt from rank 0 (%s)", rank, e)
        return attempt


def begin(rundir: RunDir, *, rank: int, store: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
          resume_step: int | None, cfg: AttemptsConfig,
          on_error: Callable[[str, BaseException], None] | None = None) -> Started:
    """Start this process's attempt (rank 0 registers it; RunDirBusy when the directory is in use).
    `on_error`: where a failed write of run.json goes (the attempt goes on); without it, it raises."""
    prior = _prior_info(rundir.path)
    # The directory's records are streamed (a long run's history is never held whole), once to find
    # the resume step and once for the warm start.
    earlier: Iterable[StepRecord] = ()
    if prior is not None and resume_step is None and (rank == 0 or store is None):
        earlier = attempts.kept(attempts.read_rank(rundir.path, rank, prior), prior)
    attempt: Attempt | None = None
    if rank == 0 or store is None:
        step, how = resume_point(optimizer, scheduler, resume_step, earlier)
        used = prior is not None
        kind = ("resumed" if step > 0 else "restarted") if used else ("resumed" if step > 0 else "fresh")
        current = prior.attempts[-1] if prior is not None and prior.attempts else None
        lineage_start = step
        if kind == "resumed" and prior is not None:  # the start of the records it keeps, if any
            lineage_start = min(current.lineage_start if current is not None else prior.start_step, step)
        mine = Attempt(id=0, kind=kind, start_step=step, lineage_start=lineage_start, how=how,
                       host=socket.gethostname(), pid=os.getpid(), pid_start=attempts.process_start(os.getpid()),
                       job=_job(), heartbeat=time.time())
        if rank == 0:
            attempt = _register(rundir, mine, cfg.stale_after_seconds, on_error)
        elif prior is not None and prior.attempts:  # no store to ask rank 0: its latest registration
            attempt = prior.attempts[-1]
        else:
            attempt = mine.model_copy(update={"id": 1})
    if store is not None:
        attempt = _share(store, rank, attempt)
        if attempt is None:  # rank 0 never said: this rank judges on its own, from step 0
            attempt = Attempt(id=1, host=socket.gethostname(), pid=os.getpid())
    history: Iterable[StepRecord] = ()
    if cfg.warm_start and prior is not None and attempt.kind == "resumed":
        history = attempts.history(attempts.read_rank(rundir.path, rank, prior, attempt.id), prior, attempt)
    active: list[Alert] = []
    if prior is not None:
        try:
            earlier_alerts = read_alerts(rundir.path)  # damaged lines are skipped; an unreadable file raises
        except OSError as e:
            if on_error is None:
                raise
            on_error("alerts.jsonl read", e)  # the attempt goes on without the earlier alerts to carry over
            earlier_alerts = []
        # Setup checks are judged again by every attempt (its own facts), and printed at its attach.
        active = [a for a in attempts.still_active(earlier_alerts, rank, attempt.id)
                  if not a.rule.startswith("preflight.")]
    return Started(attempt, prior, history, active)


def set_fields(info: Any, attempt_id: int, **fields: Any) -> Any:
    """run.json's content `info` with fields of one attempt set (for an update that changes more)."""
    if isinstance(info, dict):
        for a in info.get("attempts") or []:
            if isinstance(a, dict) and a.get("id") == attempt_id:
                a.update(fields)
    return info


def update(rundir: RunDir, attempt_id: int, **fields: Any) -> None:
    """Set fields of one attempt in run.json (the heartbeat, the end)."""
    rundir.update_json(RUN_JSON, lambda old: set_fields(old, attempt_id, **fields), {})


class Heartbeat:
    """Rank 0's thread refreshing its attempt's heartbeat in run.json (for processes on other hosts)."""

    def __init__(self, rundir: RunDir, attempt_id: int, every: float, on_error: Callable[[str, BaseException], None]) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(rundir, attempt_id, every, on_error),
                                        name="trainmon-heartbeat", daemon=True)
        self._thread.start()

    def _run(self, rundir: RunDir, attempt_id: int, every: float, on_error: Callable[[str, BaseException], None]) -> None:
        while not self._stop.wait(every):
            try:
                update(rundir, attempt_id, heartbeat=time.time())
            except Exception as e:
                on_error("attempt heartbeat", e)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout)
