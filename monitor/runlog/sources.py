"""Sources: anything a run's StepRecords can be read from, incrementally.

A Source is one training run: trainmon's own run directory, or another framework's TensorBoard
logdir or text log. `poll()` returns the records completed since the previous call (never
re-reading what it has read: it keeps byte offsets), `state()`/`restore()` carry those offsets
across a daemon restart, and `info` describes the run for the rules (RunInfo.source names the
kind). `monitor check` polls a source to the end; `monitor watch` polls many, forever.

Damaged input never raises out of poll(): a corrupt or vanished file, or a record that does not
decode, is recorded in `problems` and skipped, and the read position moves past it, so no later poll
meets it again. `ProblemLog` keeps `problems` bounded: one message per file and kind of damage, counted
after that, and at most MAX_PROBLEMS messages per source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from monitor.schema import RunInfo, StepRecord


@runtime_checkable
class Source(Protocol):
    path: Path  # the run directory, logdir or log file
    info: RunInfo  # source="trainmon" | "huggingface" | "lightning" | "megatron" | "megatron-text" | "llmc" | "tensorboard"
    problems: list[str]  # human-readable, one per file and kind of damage (see ProblemLog); never raised
    # Optionally `problem_counts: dict[str, int]`: how often each listed problem (and, under UNLISTED, the
    # ones past the cap) was met.

    def poll(self, limit: int | None = None) -> list[StepRecord]:
        """Records completed since the last call, in step order per rank. With `limit`, at most that
        many, reading only about what they take (the rest waits for the next call; a call that returns
        fewer has read everything there is now): trainmon run directories and TensorBoard logdirs stop
        step by step, text logs and Lightning's metrics.csv line by line, Hugging Face's
        trainer_state.json (one JSON document) parsed whole at each call that stops in it."""
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


MAX_PROBLEMS = 100
"""Messages one source lists at most. Damage is reported per file and kind, so this is only met with
many damaged files (or many distinct events: rewrites of a state file); past it the problems are
counted, not listed, so a huge damaged logdir cannot grow a daemon's memory or flood its output."""
UNLISTED = "unlisted"  # the ProblemLog.counts key of the reports past MAX_PROBLEMS


class ProblemLog:
    """How a source reports damage into its `problems` list, bounded.

    A report carries a key naming the file and the kind of damage (`proto:<file>`); the first report of
    a key appends its message, later ones only count (`counts[key]`), so a file with a million bad records
    is one message. The message is never changed after: the daemon announces each new string once, and a
    count in the text would announce it again at every change. At most MAX_PROBLEMS messages are listed
    in `problems` (a list several logs may share: a run directory's ranks), the last saying that the
    others are counted, not listed (`counts[UNLISTED]`; the keys past the cap are not kept, so the same
    problem may count there more than once).
    """

    def __init__(self, problems: list[str] | None = None) -> None:
        self.problems: list[str] = problems if problems is not None else []
        self.counts: dict[str, int] = {}

    def report(self, key: str, message: str) -> None:
        counts = self.counts
        n = counts.get(key)
        if n is not None:
            counts[key] = n + 1
        elif len(self.problems) < MAX_PROBLEMS - 1:
            counts[key] = 1
            self.problems.append(message)
        else:
            if len(self.problems) == MAX_PROBLEMS - 1:
                self.problems.append(f"more than {MAX_PROBLEMS - 1} problems: the others are counted, not listed")
            counts[UNLISTED] = counts.get(UNLISTED, 0) + 1
