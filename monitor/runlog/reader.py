"""Reading a finished (or growing) trainmon run directory back into RunInfo and StepRecords."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from monitor.runlog.events import decode_records
from monitor.runlog.rundir import ALERTS_JSONL, RUN_JSON
from monitor.runlog.sources import SourceError
from monitor.runlog.tfrecord import CorruptRecord, read_records
from monitor.schema import Alert, RunInfo, StepRecord

_RANK_DIR = re.compile(r"^rank(\d+)$")


class RunReadError(SourceError):
    """The path is not a readable trainmon run directory; the message says why."""


@dataclass
class RunData:
    path: Path
    info: RunInfo
    records: dict[int, list[StepRecord]] = field(default_factory=dict)  # by rank, in step order
    problems: list[str] = field(default_factory=list)  # corrupt/truncated files, reported not fatal

    def all_records(self) -> list[StepRecord]:
        return sorted((r for rs in self.records.values() for r in rs), key=lambda r: (r.step, r.rank))


def is_run_dir(path: Path) -> bool:
    return (path / RUN_JSON).is_file()


def event_files(directory: Path) -> list[Path]:
    from monitor.runlog.adapters.tbtail import event_file_names

    return [directory / name for name in event_file_names(directory)]


def rank_dirs(run_dir: Path) -> dict[int, Path]:
    out = {0: run_dir}
    for p in run_dir.iterdir():
        m = _RANK_DIR.match(p.name)
        if m and p.is_dir():
            out[int(m.group(1))] = p
    return out


def read_run_info(run_dir: Path) -> RunInfo:
    path = run_dir / RUN_JSON
    try:
        return RunInfo.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise RunReadError(f"{run_dir}: not a trainmon run directory (no {RUN_JSON})") from None
    except (ValueError, ValidationError) as e:
        raise RunReadError(f"{path}: unreadable run.json: {e}") from None


def read_events(path: Path, rank: int, problems: list[str], param_names: list[str] | None = None) -> list[StepRecord]:
    datas = []
    try:
        with open(path, "rb") as f:
            for _, data in read_records(f):
                datas.append(data)
    except CorruptRecord as e:
        problems.append(f"{path}: {e}; read the records before it")
    except OSError as e:
        problems.append(f"{path}: {e.strerror or e}")
    return decode_records(datas, rank, param_names)


def read_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunReadError(f"{run_dir}: no such directory")
    info = read_run_info(run_dir)
    data = RunData(path=run_dir, info=info)
    for rank, d in sorted(rank_dirs(run_dir).items()):
        by_step: dict[int, StepRecord] = {}
        for f in event_files(d):
            for r in read_events(f, rank, data.problems, info.model.param_names):
                by_step[r.step] = r  # a restarted writer's later record for a step wins
        if by_step:
            data.records[rank] = [by_step[s] for s in sorted(by_step)]
    return data


def read_alerts(run_dir: Path) -> list[Alert]:
    path = Path(run_dir) / ALERTS_JSONL
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(Alert.model_validate_json(line))
            except ValidationError:
                continue  # a torn last line of a crashed writer
    return out
