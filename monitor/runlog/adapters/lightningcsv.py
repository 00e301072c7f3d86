"""A Source over PyTorch Lightning's CSVLogger file (`lightning_logs/version_N/metrics.csv`), tailed.

CSVLogger writes one row per `log_metrics` call: the module's `self.log` values with `epoch` and `step`,
LearningRateMonitor's `lr-<Opt>[/pg<N>]` in a row of their own, validation metrics in another; cells of
keys a row lacks are empty. Columns are mapped by the Lightning table of `frameworks` (and `--map`, with
column names as tags, fnmatch patterns included), as a Lightning TensorBoard logdir is: `train_loss` /
`train_loss_step` / `loss` (bare `loss` only when the file has an `epoch` column) -> loss, `lr-<Opt>...`
-> lr per param group, `grad_2.0_norm_total` -> grad_norm, `grad_2.0_norm/<param>` -> param_norms,
`val_loss` -> scalars. A file whose columns name none of these is not read until they appear (or a
--map names some); `unrecognized` says why.

Steps: Lightning's `step` column is the count of optimizer steps done BEFORE the one just logged (the
`_batches_that_stepped` of its loop: the first step logs at 0), which is StepRecord's 0-based step, as
the TensorBoard source keeps it; taken as written.

Rows of one step are gathered (`frameworks.StepBuffer`); a row of another step releases the step, as do
`flush()` and, in `poll()`, `settle_s` seconds without new rows (CSVLogger writes every
`flush_logs_every_n_steps` steps, 100 by default: the next step's rows may be far off). Records carry
the file's modification time (rows have none).

Tailing: new rows are read from a byte offset; a partial last line waits for its end. `poll(limit)`
stops after the row that completes its `limit`-th record, reading about what that many rows take
(a first read, the header line and on). When a new metric
key appears Lightning rewrites the whole file with a wider, re-sorted header and the old rows in their
order, then appends: a changed header line makes the file be read again from its start, skipping the
rows already read (checked: the old columns are all still there and the last row read is still at its
place), so no step is read twice or lost. A file caught mid-rewrite (fewer rows than were read) is read
again at the next poll that finds it changed; one that stays shorter, or whose rows differ, is another
run's file: reported in `problems`, and read again from its start. A bad cell (not a number in ASCII
syntax: "3_0", "١٢", " 3 " are not) is reported and left out; a row whose step is not a whole number
in ASCII digits, or is negative, is reported and skipped. Rows are parsed with `csv`, one per line
(metric names hold no newlines). A UTF-8 byte order mark before the header (a file saved by Excel) is
not part of the first column's name; of columns sharing a name the first is read (reported). Only a
regular file is read: a FIFO or device (which would block the reader) is refused with SourceError.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from monitor.runlog.adapters.frameworks import LIGHTNING, StepBuffer, TagMap, validate_mapping
from monitor.runlog.adapters.strict import ascii_float, ascii_int, not_regular
from monitor.runlog.sources import ProblemLog, SourceError
from monitor.schema import MAX_STEP, RunInfo, StepRecord

METRICS_CSV = "metrics.csv"
HPARAMS_YAML = "hparams.yaml"
SETTLE_S = 2.0
ROW_BYTES = 512  # about what a row takes: the read size per record of a limit
# Without an `epoch` column a bare `loss` column is nobody's in particular (see frameworks.LIGHTNING.weak).
_NO_BARE_LOSS = dataclasses.replace(LIGHTNING, tags={**LIGHTNING.tags, "loss": ("train_loss", "train_loss_step")})
_BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark, which Excel writes before a CSV's header


def _cells(line: bytes) -> list[str]:
    text = line.decode("utf-8", "replace").rstrip("\r\n")
    try:
        return next(csv.reader([text]), [])
    except csv.Error:
        return [text]  # a row no header matches: reported by the caller


class LightningCSVSource:
    """A Source over one CSVLogger metrics.csv (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], mapping: dict[str, str] | None = None, *,
                 settle_s: float | None = None, clock=time.monotonic) -> None:
        self.path = Path(path)
        self.file = self.path if self.path.suffix == ".csv" and not self.path.is_dir() else self.path / METRICS_CSV
        try:  # a FIFO or device would block open() or never end: refused before it is opened
            kind = not_regular(os.stat(self.file).st_mode)
        except OSError:
            kind = None  # missing or unreadable: poll() reports it (a run's file may come later)
        if kind is not None:
            raise SourceError(f"{self.file}: {kind}, not a regular file: a metrics CSV is read from a file")
        d = self.file.parent
        self.info = RunInfo(run_id=d.name or d.resolve().name, source="lightning", created=0.0)
        self.mapping = validate_mapping(mapping)
        self.settle_s = SETTLE_S if settle_s is None else settle_s
        self.problems: list[str] = []
        self.tagmap: TagMap | None = None
        self.header: list[str] | None = None
        self._header_line = ""  # the header line as read (decoded), and its length in bytes with its end
        self._header_len = 0
        self._tail: tuple[str, int] = ("", 0)  # the last whole line read (decoded, no end) and its length in bytes
        self.offset = 0  # bytes of whole lines read
        self.rows = 0  # data rows read
        self._last_row: list[list[str]] | None = None  # the last row read: [[column, cell], ...] of its cells
        self._seen: tuple[int, int, int] | None = None  # (inode, size, mtime) when last read
        self._columns: list[str] | None = None  # the header last seen, also when it names no known column
        self._waiting: tuple[int, int, int] | None = None  # the key of a file found shorter than what was read
        self._buffer = StepBuffer()
        self._last_arrival: float | None = None
        self._clock = clock
        self._problems = ProblemLog(self.problems)  # one message per file and kind, at most MAX_PROBLEMS

    def _report(self, key: str, message: str) -> None:
        self._problems.report(key, message)

    @property
    def problem_counts(self) -> dict[str, int]:
        return self._problems.counts

    @property
    def unrecognized(self) -> str | None:
        """Why no records can come from this file yet (no known column and no mapping), else None."""
        if self.tagmap is not None or self._columns is None:
            return None
        cols = ", ".join(repr(c) for c in self._columns[:20]) + (" ..." if len(self._columns) > 20 else "")
        return (f"{self.file}: a CSV without the columns of a Lightning run (looked for 'train_loss', "
                "'train_loss_step', 'loss' with 'epoch', 'lr-<Optimizer>', 'grad_2.0_norm_total'); "
                + (f"columns: {cols}; " if cols else "no header yet; ")
                + "name yours with --map loss=COLUMN (and lr=COLUMN, grad_norm=COLUMN, ...)")

    def _decide(self, header: list[str]) -> TagMap | None:
        cols = set(header)
        self._columns = header
        if not LIGHTNING.score(cols) and not self.mapping:
            return None
        return TagMap(LIGHTNING if "epoch" in cols else _NO_BARE_LOSS, self.mapping)

    # -- reading ----------------------------------------------------------------------------------

    def poll(self, limit: int | None = None) -> list[StepRecord]:
        """The records of the rows appended since the last call; with `limit`, reading stops after the row
        that completes the `limit`-th record (the next call goes on from there)."""
        out: list[StepRecord] = []
        try:
            st = os.stat(self.file)
        except FileNotFoundError:
            self._report("gone", f"{self.file}: the file {'vanished' if self.rows else 'does not exist'}")
            return out
        except OSError as e:
            self._report("stat", f"{self.file}: unreadable: {e.strerror or e}")
            return out
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        kind = not_regular(st.st_mode)
        if kind is not None:  # replaced by a FIFO or a device since: reading it could block
            self._report("special", f"{self.file}: {kind} now, not a regular file; not read (counted)")
        elif key != self._seen:
            try:
                with open(self.file, "rb") as f:
                    self._read(f, st, key, out, limit)
            except OSError as e:
                self._report(f"read:{key}", f"{self.file}: unreadable: {e.strerror or e}")
        now = self._clock()
        buf = self._buffer
        if buf.pending is not None and self._last_arrival is not None and now - self._last_arrival >= self.settle_s:
            self._emit(buf.release(), out)
        return out

    def _read(self, f: Any, st: os.stat_result, key: tuple[int, int, int], out: list[StepRecord],
              limit: int | None) -> None:
        if self.header is not None and st.st_size >= self.offset and self._same_file(f):  # rows were appended
            self._read_appended(f, st, key, out, limit)
            return
        f.seek(0)
        # A first read with a limit takes the header line alone; the rows follow from its end, as appended.
        head_only = self.header is None and limit is not None
        data = self._header_bytes(f, st.st_size) if head_only else f.read()
        end = data.rfind(b"\n") + 1
        lines = data[:end].split(b"\n")[:-1]
        if not lines:
            return  # not even a whole header yet (being written)
        header = _cells(lines[0].removeprefix(_BOM))
        rows = lines[1:]
        if self.header is not None and self.rows:
            wider = set(self.header) <= set(header)
            if wider and len(rows) >= self.rows and self._norm(header, _cells(rows[self.rows - 1])) == self._last_row:
                rows = rows[self.rows:]  # rewritten with a wider header: the rows after those read
            elif wider and len(rows) < self.rows and key != self._waiting:
                self._waiting = key  # caught mid-rewrite? wait for the file to change
                return
            else:
                self._report(f"restart:{key}", f"{self.file}: the file was rewritten with other rows (or shrank "
                             f"from {self.rows} to {len(rows)} rows): another run's? reading it again from its start")
                self._emit(self._buffer.release(), out)
                self.rows, self._last_row = 0, None
        self._waiting = None
        self._seen = key
        self.tagmap = tagmap = self._decide(header)
        if tagmap is None:
            self.header = None  # read again from the start when the file changes: its columns may come
            return
        self.header = header
        twice = [c for c, n in Counter(header).items() if n > 1]
        if twice:
            self._report("twice", f"{self.file}: the header names {', '.join(repr(c) for c in twice[:5])} more than "
                         "once; read the first column of each such name, left out the others")
        self._header_len = len(lines[0]) + 1
        self._header_line = data[: self._header_len].decode("utf-8", "replace")
        if not self.info.created:
            self.info.created = st.st_mtime
        # Where the rows to read begin: after the header and the rows already read (a wider rewrite).
        skipped = lines[: len(lines) - len(rows)]
        self.offset, self._tail = 0, ("", 0)
        self._advance(skipped)
        used = self._rows(rows, st.st_mtime, out, limit)
        self._advance(rows[:used])
        if used < len(rows):
            self._seen = None  # rows left for the next call, read from the offset
        elif head_only:
            self._seen = None
            self._read_appended(f, st, key, out, limit)

    @staticmethod
    def _header_bytes(f: Any, size: int) -> bytes:
        """The file's first line with its end (less when it has none yet)."""
        n = 64 * 1024
        while True:
            f.seek(0)
            data = f.read(min(n, size))
            cut = data.find(b"\n")
            if cut >= 0 or len(data) >= size:
                return data[:cut + 1] if cut >= 0 else data
            n *= 2

    def _read_appended(self, f: Any, st: os.stat_result, key: tuple[int, int, int], out: list[StepRecord],
                       limit: int | None) -> None:
        """The rows after the offset; with a limit, read about what that many rows take at a time."""
        size = None if limit is None else max(64 * 1024, ROW_BYTES * limit)
        while True:
            left = st.st_size - self.offset
            f.seek(self.offset)
            data = f.read(left if size is None else min(left, size))
            while b"\n" not in data and len(data) < left:  # no whole row in it yet: more
                size = 2 * len(data)
                f.seek(self.offset)
                data = f.read(min(left, size))
            lines = data[:data.rfind(b"\n") + 1].split(b"\n")[:-1]
            used = self._rows(lines, st.st_mtime, out, limit)
            self._advance(lines[:used])
            if used < len(lines):
                return  # the limit is reached; the next call goes on from the offset
            if len(data) == left:
                self._seen = key  # every whole row of this version of the file is read
                return
            if not lines:
                return

    def _same_file(self, f: Any) -> bool:
        """Whether the file still starts with the header read and has the last line read where it was."""
        if f.read(self._header_len).decode("utf-8", "replace") != self._header_line:
            return False
        text, n = self._tail
        if n > self.offset:
            return False
        f.seek(self.offset - n)
        return f.read(n).decode("utf-8", "replace") == text + "\n"

    def _norm(self, header: list[str], cells: list[str]) -> list[list[str]]:
        return sorted([k, v] for k, v in zip(header, cells) if v != "")

    def _advance(self, lines: list[bytes]) -> None:
        """Past these whole lines (read from the offset on): the offset and the last line read move."""
        if lines:
            self.offset += sum(len(line) + 1 for line in lines)
            self._tail = (lines[-1].decode("utf-8", "replace"), len(lines[-1]) + 1)

    def _rows(self, lines: list[bytes], mtime: float, out: list[StepRecord], limit: int | None = None) -> int:
        """Reads rows until the one that completes the `limit`-th record in `out`; returns how many it read."""
        header, tagmap = self.header, self.tagmap
        assert header is not None and tagmap is not None
        buf = self._buffer
        used = 0
        for line in lines:
            if limit is not None and len(out) >= limit:
                break
            used += 1
            cells = _cells(line)
            self.rows += 1
            if len(cells) != len(header):
                self._report("width", f"{self.file}: row {self.rows} has {len(cells)} cells, the header "
                             f"{len(header)}; skipped it (and any more such rows)")
                continue
            row: dict[str, str] = {}
            for col, cell in zip(header, cells):
                row.setdefault(col, cell)  # of columns sharing a name, the first (reported with the header)
            try:
                step = ascii_int(row.get("step", ""))
            except ValueError:  # more digits than int() converts
                step = None
            if step is None:
                self._report("step", f"{self.file}: row {self.rows} has no whole-number step "
                             f"({row.get('step', '')[:40]!r}); skipped it (and any more such rows)")
                continue
            if not 0 <= step <= MAX_STEP:
                self._report("negative", f"{self.file}: row {self.rows} has a step outside 0..{MAX_STEP} "
                             f"({str(step)[:40]}); skipped it (and any more such rows)")
                continue
            for col, cell in row.items():
                if cell == "" or col == "step" or not tagmap.relevant(col):
                    continue
                value = ascii_float(cell)
                if value is None:
                    self._report(f"cell:{col}", f"{self.file}: row {self.rows}: {col}={cell[:40]!r} is not a "
                                 f"number; left out (and any more such cells of {col!r})")
                    continue
                self._emit(buf.add(step, mtime, col, value), out)
        if used:
            self._last_row = self._norm(header, _cells(lines[used - 1]))
            self._last_arrival = self._clock()
        return used

    def _emit(self, p: Any, out: list[StepRecord]) -> None:
        if p is not None and self.tagmap is not None:
            r = self.tagmap.record(p.step, p.wall_time, p.values)
            if r is not None:
                out.append(r)

    def flush(self) -> list[StepRecord]:
        out: list[StepRecord] = []
        self._emit(self._buffer.release(), out)
        return out

    # -- positions --------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"kind": "lightning-csv", "offset": self.offset, "rows": self.rows, "header": self.header,
                "header_line": self._header_line, "header_len": self._header_len, "tail": list(self._tail),
                "last_row": self._last_row, "seen": list(self._seen) if self._seen else None,
                "pending": self._buffer.state(), "created": self.info.created}

    def restore(self, state: dict[str, Any]) -> None:
        header = state.get("header")
        if header:
            self.header = [str(c) for c in header]
            self.tagmap = self._decide(self.header)
            self._header_line = str(state.get("header_line") or "")
            self._header_len = int(state.get("header_len") or 0)
            tail = state.get("tail") or ["", 0]
            self._tail = (str(tail[0]), int(tail[1]))
            self.offset, self.rows = int(state.get("offset") or 0), int(state.get("rows") or 0)
            self._last_row = state.get("last_row")
            seen = state.get("seen")
            self._seen = (int(seen[0]), int(seen[1]), int(seen[2])) if seen else None
        if state.get("created"):
            self.info.created = float(state["created"])
        self._buffer.restore(state.get("pending"))
        self._last_arrival = self._clock() if self._buffer.pending is not None else None
