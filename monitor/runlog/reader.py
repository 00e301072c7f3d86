"""Reading a whole run back: one call for `monitor check`, the report, tests and scripts.

`read_run(path)` opens the run with `monitor.runlog.adapters.open_source` (the Source `monitor watch`
tails, so the two read a directory the same way), reads it to the end and returns its RunInfo, every
record by rank in reading order (`stream`: attempt after attempt), the records that count by rank in
step order (`records`: each rank's lineage, see monitor.runlog.attempts) and the problems met on the way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from monitor.runlog import attempts
from monitor.runlog.rundir import ALERTS_JSONL
from monitor.runlog.sources import RunReadError, SourceError
from monitor.schema import Alert, RunInfo, StepRecord

__all__ = ["RunData", "RunReadError", "read_alerts", "read_run", "read_source"]


@dataclass
class RunData:
    path: Path
    info: RunInfo
    records: dict[int, list[StepRecord]] = field(default_factory=dict)  # by rank, in step order: what counts
    problems: list[str] = field(default_factory=list)  # corrupt/truncated files, reported not fatal
    stream: dict[int, list[StepRecord]] = field(default_factory=dict)  # by rank, every record as read

    @property
    def attempts(self) -> attempts.Recorded:
        """The run's attempts, for a rules engine crossing them (`RulesEngine(attempts=...)`)."""
        return attempts.Recorded(self.info, self.stream)

    def all_records(self) -> list[StepRecord]:
        return sorted((r for rs in self.records.values() for r in rs), key=lambda r: (r.step, r.rank))


def read_run(path: str | Path, mapping: dict[str, str] | None = None) -> RunData:
    """Every record of the run at `path` (a trainmon run directory or anything else `open_source`
    opens; `mapping` names tags of foreign logs), by rank in step order.

    Raises RunReadError (a SourceError) naming the path and what was looked for.
    """
    return read_source(path, mapping)[0]


def read_source(path: str | Path, mapping: dict[str, str] | None = None) -> tuple[RunData, Any]:
    """`read_run`, and the Source it read (its read positions tell what was left unread)."""
    from monitor.runlog.adapters import open_source, read_all

    try:
        source = open_source(path, mapping)
        stream = read_all(source)
    except RunReadError:
        raise
    except SourceError as e:
        raise RunReadError(str(e)) from None
    info = source.info
    data = RunData(path=Path(path), info=info, records={rank: attempts.lineage(rs, info) for rank, rs in stream.items()},
                   problems=list(source.problems), stream=stream)
    return data, source


def read_alerts(run_dir: str | Path) -> list[Alert]:
    """The alerts of alerts.jsonl in file order ([] when there is none). A line that is not one whole
    alert is skipped: a torn last line of a crashed writer (cut anywhere, even inside a multi-byte
    character), a byte that is not UTF-8, damage of any kind; the lines around it are read. Raises
    OSError when the file exists but cannot be read."""
    try:
        data = (Path(run_dir) / ALERTS_JSONL).read_bytes()
    except FileNotFoundError:
        return []
    out = []
    # Split the bytes, not decoded text: one undecodable byte then costs its line only, and a line ends
    # only at the writer's b"\n" (str.splitlines also splits at characters like U+2028 inside a message).
    for line in data.split(b"\n"):
        if line.strip():
            try:
                # Validating the bytes checks their UTF-8 too: a bad byte is a ValidationError like any damage.
                out.append(Alert.model_validate_json(line))
            except ValidationError:
                continue
    return out
