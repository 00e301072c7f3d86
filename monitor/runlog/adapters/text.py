"""Text training logs, tailed by byte offset: Megatron-LM iteration lines and llm.c log files.

Megatron-LM / Megatron-DeepSpeed print one line per logging interval::

    [2024-05-01 10:00:00] iteration      100/  500000 | consumed samples:        51200 | elapsed time per
    iteration (ms): 1234.5 | learning rate: 1.500E-05 | global batch size:   512 | lm loss: 8.071461E+00 |
    loss scale: 65536.0 | grad norm: 2.345 | number of skipped iterations:   0 | number of nan iterations:   0 |

(one line in the file; the timestamp is optional, fields may be missing or reordered). A line is
one record: step = the iteration number as printed (the framework's own numbering, so alerts point
at lines you can find), lr = [learning rate], step_time = the ms field / 1000, skipped = skipped
iterations > 0, tokens = the per-iteration rise of "consumed tokens" when printed; max_steps comes
from "/ 500000". Other numeric fields go to `scalars` (a few, by normalised name, e.g.
"nan_iterations", "consumed_samples").

llm.c (and modded-nanogpt's llm.c baseline) write ``s:STEP trl:LOSS lr:LR norm:NORM`` per step and
``s:STEP tel:VAL_LOSS`` (``s:STEP eval:ACC``) before the training line of the steps that evaluate:
the validation loss goes to `scalars["val_loss"]` of that step's record; a step with a validation
line but no training line (the final evaluation after the last step) yields no record.

A record's `time` is the line's own timestamp when it has one, else the log file's modification
time when the line was read (text logs carry no per-step time; an old log thus never looks live).
A line ends at a newline or a carriage return (progress output); a partial last line is left for the
next poll. A line that does not parse (an iteration number int() refuses, say) is skipped and reported
once (counted), and the lines after it are read: parsing is line by line from a byte offset, so no line
is met twice. A value that is not in ASCII numeric syntax ("1_000", "١٢") is left out of its record and
reported; a step so spelled makes its line not parse. A line longer than CHUNK_BYTES is skipped and
reported. Lines are split, and parsed (`textformats`), in time linear in their length. `poll(limit)` stops
after the line that completes its `limit`-th record. The format is sniffed from the file's first 64 KiB.
Only a regular file is read: a FIFO or device (which would block the reader) is refused with SourceError.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from monitor.runlog.adapters.frameworks import json_float
from monitor.runlog.adapters.strict import not_regular
from monitor.runlog.adapters.textformats import BY_NAME, TEXT_FORMATS, Parsed, TextFormat
from monitor.runlog.sources import ProblemLog
from monitor.schema import RunInfo, StepRecord

HEAD_BYTES = 64 * 1024
CHUNK_BYTES = 8 * 1024 * 1024  # read at a time without a limit; a longer line is skipped
LINE_BYTES = 1024  # about what a line takes (Megatron's ~500 bytes): the read size per record of a limit
_SIGNAL_FIELDS = ("loss", "lr", "grad_norm", "loss_scale", "skipped", "step_time", "tokens")


def line_ends(buf: bytes) -> Iterator[int]:
    r"""The end (past its \n, \r or \r\n) of each whole line of `buf`, in order; bytes after the last are a
    partial line. Linear in len(buf): each byte is looked at by one bytes.find of each end character (a
    regex such as [^\r\n]*\n, tried again at every byte of an unterminated tail, is quadratic in it)."""
    nl, cr = buf.find(b"\n"), buf.find(b"\r")  # the next of each at or after `start`; -1: none to the end
    start = 0
    while nl >= 0 or cr >= 0:
        if cr < 0 or 0 <= nl < cr:
            start = nl + 1
        else:
            start = cr + 2 if cr + 1 == nl else cr + 1  # \r\n is one end
        yield start
        if 0 <= nl < start:
            nl = buf.find(b"\n", start)
        if 0 <= cr < start:
            cr = buf.find(b"\r", start)


def read_head(path: Path, n: int = HEAD_BYTES) -> str:
    with open(path, "rb") as f:
        data = f.read(n)
    if b"\0" in data[:4096]:
        return ""  # binary
    return data.decode("utf-8", "replace")


def sniff_head(head: str) -> TextFormat | None:
    for fmt in TEXT_FORMATS:
        if fmt.sniff(head):
            return fmt
    return None


def sniff_file(path: Path) -> TextFormat | None:
    try:
        return sniff_head(read_head(path))
    except OSError:
        return None


def describe_formats() -> str:
    return " and ".join(f.description for f in TEXT_FORMATS)


class TextLogSource:
    """A Source over one text log (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], fmt: TextFormat | str | None = None) -> None:
        from monitor.runlog.sources import SourceError

        self.path = Path(path)
        try:  # a FIFO or device would block open() or never end: refused before it is opened
            kind = not_regular(os.stat(self.path).st_mode)
        except FileNotFoundError:
            kind = None  # with a format given, poll() reports it missing; sniffing (below) raises
        except OSError as e:
            raise SourceError(f"{self.path}: unreadable: {e.strerror or e}") from None
        if kind is not None:
            raise SourceError(f"{self.path}: {kind}, not a regular file: a text log is read from a file")
        if isinstance(fmt, str):
            fmt = BY_NAME[fmt]
        if fmt is None:
            try:
                fmt = sniff_head(read_head(self.path))
            except OSError as e:
                raise SourceError(f"{self.path}: unreadable: {e.strerror or e}") from None
            if fmt is None:
                raise SourceError(f"{self.path}: not a log of a known format (looked for {describe_formats()} "
                                  f"in its first {HEAD_BYTES // 1024} KiB)")
        self.format = fmt
        self.info = RunInfo(run_id=self.path.name, source=fmt.name, created=0.0)
        self.problems: list[str] = []
        self.offset = 0
        self._ino: int | None = None
        self._pending: Parsed | None = None
        self._prev_tokens: tuple[int, float] | None = None  # (step, consumed tokens) of the previous line
        self._skipping = False  # in a line longer than CHUNK_BYTES: drop up to its end
        self._problems = ProblemLog(self.problems)

    def _report(self, key: str, message: str) -> None:
        self._problems.report(key, message)

    @property
    def problem_counts(self) -> dict[str, int]:
        return self._problems.counts

    # -- reading --------------------------------------------------------------------------------

    def poll(self, limit: int | None = None) -> list[StepRecord]:
        """The records of the lines appended since the last call; with `limit`, at most that many (the
        lines after the last one taken wait for the next call)."""
        out: list[StepRecord] = []
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._report("gone", f"{self.path}: the file vanished after {self.offset} bytes")
            return out
        except OSError as e:
            self._report("stat", f"{self.path}: unreadable: {e.strerror or e}")
            return out
        kind = not_regular(st.st_mode)
        if kind is not None:  # replaced by a FIFO or a device since: reading it could block
            self._report("special", f"{self.path}: {kind} now, not a regular file; not read (counted)")
            return out
        if (self._ino is not None and st.st_ino != self._ino) or st.st_size < self.offset:
            self._report("restart", f"{self.path}: the file was truncated or replaced; reading it again from the "
                         "start (and at each later such change: counted)")
            self.offset, self._pending, self._prev_tokens, self._skipping = 0, None, None, False
        self._ino = st.st_ino
        if st.st_size == self.offset:
            return out
        # With a limit, about what that many lines take (grown to CHUNK_BYTES for a longer line).
        size = CHUNK_BYTES if limit is None else min(CHUNK_BYTES, max(HEAD_BYTES, LINE_BYTES * limit))
        try:
            with open(self.path, "rb") as f:
                while limit is None or len(out) < limit:
                    f.seek(self.offset)
                    chunk = f.read(size)
                    if not chunk:
                        break
                    used = self._lines(chunk, st.st_mtime, out, limit)
                    self.offset += used
                    if used:
                        if len(chunk) < size:
                            break  # read to the end: what is left is a partial last line
                    elif limit is not None and len(out) >= limit:
                        break  # the limit was reached at the chunk's first line
                    elif len(chunk) < size:
                        break  # a partial last line: wait for its end
                    elif size < CHUNK_BYTES:
                        size = CHUNK_BYTES  # a line longer than a limit's read
                    else:
                        if not self._skipping:  # (a line of several chunks is one line skipped)
                            self._report("long", f"{self.path}: a line longer than {CHUNK_BYTES} bytes at byte "
                                         f"{self.offset}; skipped it (and any more such lines: counted)")
                        self.offset += len(chunk)
                        self._skipping = True
        except OSError as e:
            self._report("read", f"{self.path}: unreadable: {e.strerror or e}")
        return out

    def _lines(self, buf: bytes, mtime: float, out: list[StepRecord], limit: int | None) -> int:
        """The records of the whole lines of `buf` (read at self.offset) into `out`, up to `limit`;
        returns the bytes of the lines taken."""
        used = 0
        for end in line_ends(buf):
            if limit is not None and len(out) >= limit:
                break
            if self._skipping:  # the rest of a line too long to read
                self._skipping = False
            elif not self._line(buf[used:end], mtime, out, limit, self.offset + used):
                break  # the limit was reached before this line: the next poll reads it again
            used = end
        return used

    def _line(self, raw: bytes, mtime: float, out: list[StepRecord], limit: int | None, at: int) -> bool:
        """One line into `out`; False when `limit` was reached before it could be taken. A line that does
        not parse, or whose values make no record, is skipped, whatever it raises (int() of 5000 digits)."""
        try:
            p = self.format.parse(raw.decode("utf-8", "replace").rstrip("\r\n"))
            if p is None:
                return True
            q = self._pending
            if q is not None and q.step != p.step:
                # The held step is complete: emitted on its own first, so that when it fills the limit this
                # line (nothing of it noted yet) is read again by the next poll, with nothing held.
                self._pending = None
                self._emit(q, out)
                if limit is not None and len(out) >= limit:
                    return False
            if p.bad:  # the line's other values still make its record
                self._report("value", f"{self.path}: values that are not numbers in the line at byte {at} "
                             f"({', '.join(p.bad[:3])}); left them out (and any more such values: counted)")
            self._note(p, mtime)
            self._take(p, out)
        except Exception as e:
            self._report("line", f"{self.path}: an unreadable line at byte {at} ({type(e).__name__}: "
                         f"{str(e)[:200]}); skipped it (and any more such lines: counted)")
        return True

    def _note(self, p: Parsed, mtime: float) -> None:
        """The line's time, and what it tells of the run (created, max_steps, the per-step token rise)."""
        if p.time is None:
            p.time = mtime
        if not self.info.created:
            self.info.created = p.time
        if p.max_steps and self.info.max_steps is None:
            self.info.max_steps = p.max_steps
        c = p.consumed_tokens
        if c is not None and math.isfinite(c):  # "consumed tokens: inf/nan" is no count: as if not printed
            prev = self._prev_tokens
            if prev is not None and p.step > prev[0] and c >= prev[1]:
                p.fields["tokens"] = round((c - prev[1]) / (p.step - prev[0]))
            self._prev_tokens = (p.step, c)

    def _take(self, p: Parsed, out: list[StepRecord]) -> None:
        """A line into the held step (one of another step was released by `_line`); out when it closes."""
        q = self._pending
        if q is not None:
            q.fields.update(p.fields)
            q.scalars.update(p.scalars)
            q.time = p.time
        self._pending = None if p.closes else q or p
        if p.closes:
            self._emit(q or p, out)

    def _emit(self, p: Parsed, out: list[StepRecord]) -> None:
        if not any(k in p.fields for k in _SIGNAL_FIELDS):
            return  # validation/eval lines only: no optimizer step here
        out.append(StepRecord(step=p.step, time=p.time if p.time is not None else time.time(),
                              scalars=p.scalars, **p.fields))

    def flush(self) -> list[StepRecord]:
        out: list[StepRecord] = []
        if self._pending is not None:
            self._emit(self._pending, out)
            self._pending = None
        return out

    # -- positions ------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        q = self._pending
        pending = None
        if q is not None:
            pending = {"step": q.step, "time": q.time,
                       "fields": {k: ([json_float(x) for x in v] if k == "lr" else
                                      json_float(v) if isinstance(v, float) else v) for k, v in q.fields.items()},
                       "scalars": {k: json_float(v) for k, v in q.scalars.items()}}
        return {"kind": "text", "format": self.format.name, "offset": self.offset, "pending": pending,
                "prev_tokens": list(self._prev_tokens) if self._prev_tokens else None, "skipping": self._skipping,
                "max_steps": self.info.max_steps, "created": self.info.created}

    def restore(self, state: dict[str, Any]) -> None:
        self.offset = int(state.get("offset") or 0)
        self._skipping = bool(state.get("skipping"))
        pt = state.get("prev_tokens")
        self._prev_tokens = (int(pt[0]), float(pt[1])) if pt else None
        if state.get("max_steps"):
            self.info.max_steps = int(state["max_steps"])
        if state.get("created"):
            self.info.created = float(state["created"])
        q = state.get("pending")
        self._pending = None
        if q:
            fields = {}
            for k, v in q["fields"].items():
                if k == "lr":
                    fields[k] = [float(x) for x in v]
                elif k == "skipped":
                    fields[k] = bool(v)
                elif k == "tokens":
                    fields[k] = int(v)
                else:
                    fields[k] = float(v)
            self._pending = Parsed(step=int(q["step"]), fields=fields, time=q.get("time"), closes=False,
                                   scalars={k: float(v) for k, v in q["scalars"].items()})

