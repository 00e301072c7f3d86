"""`monitor check`: the rules over a finished (or growing) run of any kind.

The path is anything `monitor.runlog.adapters.open_source` opens: a trainmon run directory, another
framework's TensorBoard logdir (`mapping` names tags detection does not know: {"loss": "my/loss"}),
or a Megatron-LM / llm.c text log.

`examine_run` also tells what is wrong with the input from what the rules find: `damage` holds the
reading problems (corrupt, vanished or unreadable files, and incomplete tails: a last event or line
cut short, which readers leave for a later poll and a one-shot check would drop unseen); `notes` what
is incomplete about the run itself (run.json without an end summary: it did not close, or still runs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitor.config import MonitorConfig
from monitor.rules.engine import RulesEngine
from monitor.runlog import attempts
from monitor.runlog.reader import RunData, read_source
from monitor.runlog.rundir import rank_dir
from monitor.runlog.sources import Source
from monitor.schema import Alert, Attempt


@dataclass
class CheckResult:
    data: RunData
    alerts: list[Alert]  # firing, preflight first
    damage: list[str] = field(default_factory=list)  # the input's problems: the run was read, not all of it
    notes: list[str] = field(default_factory=list)  # about the run: it did not close, or is still running


def check_run(run_dir: Path, config: MonitorConfig, mapping: dict[str, str] | None = None) -> tuple[RunData, list[Alert]]:
    """Replay every rank's records through a fresh engine, as `monitor watch` would have judged them live
    (attempt after attempt); returns the firing alerts, preflight first. (`data.problems` are the
    reader's; `examine_run` adds incomplete tails and the run's end.)"""
    result = examine_run(run_dir, config, mapping)
    return result.data, result.alerts


def examine_run(run_dir: Path, config: MonitorConfig, mapping: dict[str, str] | None = None) -> CheckResult:
    """`check_run`, with what is damaged or incomplete about the input. Raises RunReadError (a
    SourceError) when the path is not a readable run."""
    data, source = read_source(run_dir, mapping)
    notes: list[str] = []
    live = False
    ended, last = _ended(data)
    if data.info.source == "trainmon" and ended is None:
        live = last is not None and attempts.alive(last, stale_after=config.attempts.stale_after_seconds)
        if live:
            notes.append(f"{data.path}: the run is still running ({attempts.describe(last)}): checked the records "
                         "written so far")
        else:
            maybe = "" if last is not None else ", or is still running"
            notes.append(f"{data.path}: run.json has no end summary (\"ended\"): the run did not close (its process "
                         f"crashed or was killed{maybe}); the records of its last moments may be missing")
    damage = list(data.problems)
    for path, offset, size in incomplete_tails(source):
        what = "event" if "tfevents" in path.name else "line"
        if live:
            notes.append(f"{path}: {size - offset} bytes after byte {offset} are a last {what} still being written")
        else:
            damage.append(f"{path}: incomplete last {what}: {size - offset} bytes after byte {offset} (cut short: "
                          f"the writer stopped mid-{what}); the records before it were read")
    return CheckResult(data, _replay(data, config), damage, notes)


def _replay(data: RunData, config: MonitorConfig) -> list[Alert]:
    engine = RulesEngine(data.info, config.rules, attempts=data.attempts)
    # Ranks are independent streams: each in reading order, preflight (from run.json's facts) first.
    for rank in sorted(data.stream) or [0]:
        stream = data.stream.get(rank, [])
        if stream:
            engine.begin(stream[0])
        else:
            engine.start(rank)
        engine.observe_many(stream)
    return [a for a in engine.alerts if a.status == "firing"]


def _ended(data: RunData) -> tuple[float | None, Attempt | None]:
    """When the run closed (None: it did not, yet) and its last attempt. With attempts, the last one's end
    counts (run.json's top-level "ended" is an earlier attempt's after a resume)."""
    info = data.info
    if info.attempts:
        last = info.attempts[-1]
        return last.ended, last
    ended = (info.model_extra or {}).get("ended")
    return (float(ended) if isinstance(ended, (int, float)) else None), None


def incomplete_tails(source: Source) -> list[tuple[Path, int, int]]:
    """(file, offset, size) of every file the source stopped reading before its end, not for damage it
    reported (a corrupt record) but at a last record or line it found incomplete: TFRecord event files
    of trainmon run directories and TensorBoard logdirs, text logs and Lightning CSVs (from the read
    positions `state()` gives)."""
    try:
        state: dict[str, Any] = source.state() or {}
    except Exception:  # a source without positions to tell: nothing to say
        return []
    kind = state.get("kind")
    files: list[tuple[Path, int]] = []

    def tail_files(directory: Path, tail: dict[str, Any]) -> None:
        dead = set(tail.get("dead") or [])
        files.extend((directory / name, int(off)) for name, off in (tail.get("offsets") or {}).items()
                     if name not in dead)

    if kind == "trainmon":
        for rank, tail in (state.get("ranks") or {}).items():
            tail_files(rank_dir(source.path, int(rank)), tail)
    elif kind == "tensorboard":
        tail_files(Path(getattr(getattr(source, "tail", None), "directory", source.path)), state.get("tail") or {})
    elif kind == "text":
        files.append((source.path, int(state.get("offset") or 0)))
    elif kind == "lightning-csv" and state.get("header"):
        files.append((Path(getattr(source, "file", source.path)), int(state.get("offset") or 0)))
    out = []
    for path, offset in files:
        try:
            size = os.stat(path).st_size
        except OSError:
            continue  # vanished or unreadable: the source reported it
        if size > offset:
            out.append((path, offset, size))
    return out
