"""A Source over trainmon's own run directory, read incrementally.

run.json gives the RunInfo (re-read when it changes: the training process adds endpoints while it
runs and a summary with "ended" at close); rank 0's event files lie in the run directory itself,
rank N's in `rank<N>/` (ranks that appear later are picked up). Each event is one whole step
(`monitor.runlog.events.StepDecoder`), so nothing is held back.
"""

from __future__ import annotations

import os
import re
from operator import lt
from pathlib import Path
from typing import Any

from monitor.runlog.adapters.tbtail import TensorBoardTail
from monitor.runlog.events import StepDecoder
from monitor.runlog.reader import read_run_info
from monitor.runlog.rundir import RUN_JSON
from monitor.runlog.sources import SourceError
from monitor.schema import StepRecord

_RANK_DIR = re.compile(r"^rank(\d+)$")


def rank_dirs(run_dir: Path) -> dict[int, Path]:
    out = {0: run_dir}
    with os.scandir(run_dir) as it:
        for e in it:
            m = _RANK_DIR.match(e.name)
            if m and e.is_dir():
                out[int(m.group(1))] = Path(e.path)
    return out


class TrainmonSource:
    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir)
        self.info = read_run_info(self.path)  # RunReadError (a SourceError) when missing or unreadable
        self.problems: list[str] = []
        self._info_mtime = self._mtime()
        self._tails: dict[int, TensorBoardTail] = {}
        self._decoders: dict[int, StepDecoder] = {}  # per rank: each keeps its event shapes' templates
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
        daemon reads a long backlog in slices, each decoded, judged and freed while in the CPU's cache)."""
        self._refresh_info()
        try:
            dirs = rank_dirs(self.path)
        except OSError as e:
            self._report("dir", f"{self.path}: unreadable: {e.strerror or e}")
            return []
        out: list[StepRecord] = []
        names = self.info.model.param_names
        for rank, d in sorted(dirs.items()):
            if limit is not None and len(out) >= limit:
                break
            tail = self._tails.get(rank)
            if tail is None:
                tail = self._tails[rank] = TensorBoardTail(d, self.problems)
            dec = self._decoders.get(rank)
            if dec is None or dec.param_names is not names:  # run.json may name the parameters later
                dec = self._decoders[rank] = StepDecoder(rank, names)
            recs = tail.poll_decoded(dec.decode, None if limit is None else limit - len(out))
            steps = [r.step for r in recs]
            if all(map(lt, steps, steps[1:])):  # the usual case: one writer, steps in order
                out.extend(recs)
                continue
            by_step: dict[int, StepRecord] = {}
            for r in recs:
                by_step[r.step] = r  # a restarted writer's later record for a step wins (as read_run)
            out.extend(by_step[s] for s in sorted(by_step))
        return out

    def flush(self) -> list[StepRecord]:
        return []

    def state(self) -> dict[str, Any]:
        return {"kind": "trainmon", "ranks": {str(rank): t.state() for rank, t in self._tails.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        for rank, s in (state.get("ranks") or {}).items():
            rank = int(rank)
            d = self.path if rank == 0 else self.path / f"rank{rank}"
            tail = self._tails[rank] = TensorBoardTail(d, self.problems)
            tail.restore(s)
