"""A Source over trainmon's own run directory, read incrementally.

run.json gives the RunInfo (re-read when it changes: the training process adds endpoints while it
runs and a summary with "ended" at close); rank 0's event files lie in the run directory itself,
rank N's in `rank<N>/` (ranks that appear later are picked up). Each event is one whole step
(`monitor.runlog.events.StepDecoder`), so nothing is held back. Files are read attempt by attempt
(`monitor.runlog.attempts`); each record carries its attempt, and `history` gives what a new attempt
builds on (a rules engine replays it when it crosses into that attempt).
This is how `monitor check`, `monitor watch` and `monitor.runlog.reader.read_run` read a run directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from monitor import jsontext
from monitor.runlog import attempts
from monitor.runlog.adapters.tbtail import TensorBoardTail
from monitor.runlog.events import StepDecoder
from monitor.runlog.rundir import JSON_DAMAGE, RUN_JSON, rank_dir, rank_dirs
from monitor.runlog.sources import RunReadError, SourceError
from monitor.schema import Attempt, RunInfo, StepRecord


def read_run_info(run_dir: Path) -> RunInfo:
    path = run_dir / RUN_JSON
    try:
        return RunInfo.model_validate(jsontext.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise RunReadError(f"{run_dir}: not a trainmon run directory (no {RUN_JSON})") from None
    except (*JSON_DAMAGE, ValidationError) as e:  # not JSON, not UTF-8, nested too deeply, not a RunInfo
        raise RunReadError(f"{path}: unreadable run.json: {e}") from None


def unread_records(path: Path, info: RunInfo) -> str | None:
    """The problem of a trainmon run directory none of whose records could be read (the caller knows that:
    its source read nothing of rank 0) while run.json says rank 0 published some (the end summary's
    `records_published`, written when an attempt closes): the event files are missing or empty. None when
    run.json says nothing of the kind: a run that has not closed yet (a live run not yet at its first
    record is no damage), or whose config turned the event files off (`tensorboard.enabled: false`)."""
    if info.source != "trainmon":
        return None
    published = (info.model_extra or {}).get("records_published")
    if not isinstance(published, int) or isinstance(published, bool) or published <= 0:
        return None
    tensorboard = info.config.get("tensorboard")
    if isinstance(tensorboard, dict) and tensorboard.get("enabled") is False:
        return None
    return (f"{path / RUN_JSON} records {published} published step record(s) (rank 0's) and none could be read: "
            "the event files are missing or empty")


class TrainmonSource:
    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir)
        self.info = read_run_info(self.path)  # RunReadError (a SourceError) when missing or unreadable
        self.problems: list[str] = []
        self._info_mtime = self._mtime()
        self._tails: dict[int, TensorBoardTail] = {}
        self._decoders: dict[tuple[int, int], StepDecoder] = {}  # per (rank, attempt)
        self._reported: set[str] = set()

    def _mtime(self) -> int | None:
        try:
            return os.stat(self.path / RUN_JSON).st_mtime_ns
        except OSError:
            return None

    def _report(self, key: str, message: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            self.problems.append(message)

    def _refresh_info(self) -> None:
        mtime = self._mtime()
        if mtime is None or mtime == self._info_mtime:
            return
        try:
            self.info = read_run_info(self.path)
            self._info_mtime = mtime
        except SourceError as e:  # written atomically, so this is real damage; keep what we had
            self._report(f"info:{mtime}", str(e))

    def poll(self, limit: int | None = None) -> list[StepRecord]:
        """Records completed since the last call, rank by rank; with `limit`, at most that many (the
        rest waits for the next call: the daemon reads a long backlog in slices, to bound its memory)."""
        self._refresh_info()
        try:
            dirs = rank_dirs(self.path)
        except OSError as e:
            self._report("dir", f"{self.path}: unreadable: {e.strerror or e}")
            return []
        out: list[StepRecord] = []
        for rank, d in sorted(dirs.items()):
            if limit is not None and len(out) >= limit:
                break
            tail = self._tails.get(rank)
            if tail is None:
                tail = self._tails[rank] = TensorBoardTail(d, self.problems, order=attempts.file_order)
            out += tail.poll_decoded(self._decoder(rank), None if limit is None else limit - len(out))
        if limit is None or len(out) < limit:  # read to the end: a closed run with nothing ever read is damaged
            rank0 = self._tails.get(0)
            if rank0 is None or not any(rank0.offsets.values()):
                missing = unread_records(self.path, self.info)
                if missing:
                    self._report("unread", missing)
        return out

    def _decoder(self, rank: int) -> Callable[[str], Callable[[bytes], StepRecord | None]]:
        names = self.info.model.param_names

        def for_file(name: str) -> Callable[[bytes], StepRecord | None]:
            n = attempts.attempt_of(name)
            dec = self._decoders.get((rank, n))
            if dec is None or dec.param_names is not names:  # run.json may name the parameters later
                dec = self._decoders[rank, n] = StepDecoder(rank, names, attempt=n)
            return dec.decode
        return for_file

    def attempt(self, attempt_id: int, first_step: int) -> Attempt:
        """The attempt's facts from run.json (read again when it is not listed yet)."""
        if self.info.attempt(attempt_id) is None:
            self._refresh_info()
        return attempts.resolve(self.info, attempt_id, first_step)

    def history(self, rank: int, attempt: Attempt) -> Iterator[StepRecord]:
        """The rank's records `attempt` builds on, streamed from the files again (attempts are rare)."""
        if attempt.kind != "resumed":
            return iter(())
        return attempts.history(attempts.read_rank(self.path, rank, self.info, attempt.id), self.info, attempt)

    def flush(self) -> list[StepRecord]:
        return []

    def state(self) -> dict[str, Any]:
        return {"kind": "trainmon", "ranks": {str(rank): t.state() for rank, t in self._tails.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        for rank, s in (state.get("ranks") or {}).items():
            rank = int(rank)
            tail = self._tails[rank] = TensorBoardTail(rank_dir(self.path, rank), self.problems, order=attempts.file_order)
            tail.restore(s)
