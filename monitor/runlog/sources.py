"""Sources: anything a run's StepRecords can be read from, incrementally.

A Source is one training run: trainmon's own run directory, or another framework's TensorBoard
logdir or text log. `poll()` returns the records completed since the previous call (never
re-reading what it has read: it keeps byte offsets), `state()`/`restore()` carry those offsets
across a daemon restart, and `info` describes the run for the rules (RunInfo.source names the
kind). `monitor check` polls a source to the end; `monitor watch` polls many, forever.

Damaged input never raises out of poll(): a corrupt or vanished file is recorded in `problems`
and skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from monitor.schema import RunInfo, StepRecord


@runtime_checkable
class Source(Protocol):
    path: Path  # the run directory, logdir or log file
    info: RunInfo  # source="trainmon" | "huggingface" | "lightning" | "megatron" | "megatron-text" | "llmc" | "tensorboard"
    problems: list[str]  # human-readable, one per damaged/unreadable file; appended, never raised

    def poll(self, limit: int | None = None) -> list[StepRecord]:
        """Records completed since the last call, in step order per rank. `limit` bounds a call's
        records where the source can stop part-way (trainmon run directories, read record by record;
        the rest waits for the next call); sources that parse a whole file at a time return it all."""
        ...

    def flush(self) -> list[StepRecord]:
        """Records still held back (a step whose scalars may not all have arrived); call at the end."""
        ...

    def state(self) -> dict[str, Any]:
        """JSON-serialisable read positions, for resuming after a restart."""
        ...

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from positions saved by state()."""
        ...


class SourceError(ValueError):
    """A path that is not a readable run of any known kind; the message says what was looked for."""


class RunReadError(SourceError):
    """The path is not a readable run; the message says why."""
