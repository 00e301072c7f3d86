"""Incremental reading of the TensorBoard event files of one directory.

Every `*tfevents*` file of the directory is read from its own byte offset (TFRecord framing, see
`monitor.runlog.tfrecord`), so a poll costs one `stat` per file that has not grown. Files that appear
later are picked up by the next poll, in name order (TensorBoard's names start with the creation
time). A trailing record that is still being written is left for a later poll; a record whose
framing is bad (a checksum, an impossible length) is reported once in `problems` and the rest of that
file is skipped; a record whose framing holds but that does not decode (not an Event, or an Event its
decoder cannot read: anything it raises) is skipped and reported once per file and kind (counted: see
`ProblemLog`), and reading goes on after it; a file that vanishes or cannot be read is reported once,
never raised.

`poll()` yields scalar points from `simple_value` summaries (torch's SummaryWriter, TF1) and from
TF2-style rank-0 `tensor` summaries of the `scalars` plugin (DT_FLOAT / DT_DOUBLE; the plugin
name travels only with a tag's first value in a file, so it is remembered per tag).
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

from google.protobuf.message import DecodeError
from tensorboard.compat.proto import event_pb2, types_pb2

from monitor.runlog.sources import ProblemLog
from monitor.runlog.tfrecord import CorruptRecord, frames, record_size

_CHUNK = 16 << 20  # bytes read at a time


class ScalarPoint(NamedTuple):
    step: int
    wall_time: float
    tag: str
    value: float


def is_event_file(name: str) -> bool:
    return "tfevents" in name and not name.startswith(".")


_DIGITS = re.compile(r"([0-9]+)")


def natural_key(s: str) -> list[Any]:
    """A sort key that orders the digit runs of names and tags by value: pg2 before pg10. A run compares
    as (its length, its digits) without leading zeros: no int(), which refuses runs of more than 4300
    digits (and `str.isdigit` takes superscripts that int() refuses), so no name or tag makes it raise."""
    parts: list[Any] = _DIGITS.split(s)
    for i in range(1, len(parts), 2):
        d = parts[i].lstrip("0")
        parts[i] = (len(d), d)
    return parts


def event_file_names(directory: Path, key: Callable[[str], Any] = natural_key) -> list[str]:
    """Names of the event files directly in `directory`, in natural order (or `key`'s): TensorBoard's names
    carry the creation time, pid and a per-process counter, so ...1700000000.host.42.10 comes after
    ....42.9. Raises OSError when the directory is unreadable."""
    with os.scandir(directory) as it:
        return sorted((e.name for e in it if is_event_file(e.name) and e.is_file()), key=key)


def tensor_scalar(t: Any) -> float | None:
    """The value of a rank-0 DT_FLOAT / DT_DOUBLE TensorProto, else None."""
    if len(t.tensor_shape.dim):
        return None
    if t.dtype == types_pb2.DT_FLOAT:
        if t.float_val:
            return float(t.float_val[0])
        if len(t.tensor_content) == 4:
            return struct.unpack("<f", t.tensor_content)[0]
    elif t.dtype == types_pb2.DT_DOUBLE:
        if t.double_val:
            return float(t.double_val[0])
        if len(t.tensor_content) == 8:
            return struct.unpack("<d", t.tensor_content)[0]
    return None


class TensorBoardTail:
    """Reads new events of every event file in one directory, never re-reading what it has read."""

    def __init__(self, directory: str | os.PathLike[str], problems: list[str] | None = None,
                 order: Callable[[str], Any] = natural_key) -> None:
        """`order`: the sort key of file names, the order files are read in."""
        self.directory = Path(directory)
        self.order = order
        self.offsets: dict[str, int] = {}  # file name -> byte offset of its next unread record
        self.dead: set[str] = set()  # files with a corrupt record: not read any further
        self.problems: list[str] = problems if problems is not None else []
        self.first_wall_time: float | None = None
        self.events_read = 0
        self._plugins: dict[str, str] = {}  # tag -> plugin name, from the tag's first tensor summary
        self._problems = ProblemLog(self.problems)

    # -- problems -------------------------------------------------------------------------------

    def report(self, key: str, message: str) -> None:
        self._problems.report(key, message)

    @property
    def problem_counts(self) -> dict[str, int]:
        return self._problems.counts

    # -- reading -------------------------------------------------------------------------------

    def poll_events(self, limit: int | None = None) -> list[tuple[str, event_pb2.Event]]:
        """(file name, Event) of every whole record appended since the last poll, file by file; with
        `limit`, at most that many (the rest waits for the next call)."""
        def event(name: str) -> Callable[[bytes], tuple[str, event_pb2.Event]]:
            def decode(data: bytes) -> tuple[str, event_pb2.Event]:
                ev = event_pb2.Event.FromString(data)
                if self.first_wall_time is None:
                    self.first_wall_time = ev.wall_time
                return name, ev
            return decode

        return self._poll(event, limit)

    def poll_decoded(self, decoder: Callable[[str], Callable[[bytes], Any]], limit: int | None = None) -> list[Any]:
        """`decoder(file name)(record bytes)` of every whole record appended since the last poll, file by
        file; None results are dropped. A record that decode raises on is skipped, reported once per file
        and kind. With `limit`, at most that many results: the rest waits for the next call."""
        return self._poll(decoder, limit)

    def _poll(self, decoder: Callable[[str], Callable[[bytes], Any]], limit: int | None = None) -> list[Any]:
        try:
            names = event_file_names(self.directory, self.order)
        except FileNotFoundError:
            self.report("dir-gone", f"{self.directory}: the directory vanished")
            return []
        except OSError as e:
            self.report("dir-unreadable", f"{self.directory}: unreadable: {e.strerror or e}")
            return []
        out: list[Any] = []
        present = set(names)
        for name in [n for n in self.offsets if n not in present]:
            self.report(f"gone:{name}", f"{self.directory / name}: the file vanished after {self.offsets[name]} bytes")
            del self.offsets[name]
        for name in names:
            if limit is not None and len(out) >= limit:
                break
            if name not in self.dead:
                self._read_file(name, out, decoder(name), limit)
        return out

    def _read_file(self, name: str, out: list[Any], decode: Callable[[bytes], Any], limit: int | None = None) -> None:
        path = self.directory / name
        offset = self.offsets.get(name, 0)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return  # vanished between listing and stat: reported by the next poll if it was known
        except OSError as e:
            self.report(f"stat:{name}", f"{path}: unreadable: {e.strerror or e}")
            return
        if size < offset:
            self.report(f"shrank:{name}", f"{path}: the file shrank from {offset} to {size} bytes (rewritten?); "
                         "reading it again from the start")
            offset = 0
        elif size == offset:
            self.offsets[name] = offset
            return
        try:
            with open(path, "rb") as f:
                # What the stat saw, read in chunks (bytes appended since wait for the next poll); a
                # record cut at a chunk's end is read again with the next chunk.
                # With a limit, about what that many records take (a few hundred bytes each).
                chunk = _CHUNK if limit is None else min(_CHUNK, max(64 << 10, 512 * limit))
                while offset < size and (limit is None or len(out) < limit):
                    f.seek(offset)
                    buf = f.read(min(chunk, size - offset))
                    if not buf:
                        break
                    at = [0, 0]
                    try:
                        self._decode_all(buf, at, decode, out, path, offset, limit)
                    finally:
                        offset += at[0]  # the end of the last whole record, also when one was corrupt
                    if at[0] == 0:  # not one whole record in the chunk
                        # The header (checked by frames, its length bounded) says what the record takes:
                        # read it whole once it is all there, and nothing until then.
                        if len(buf) < 12 or offset + record_size(buf) > size:
                            break  # the writer has not finished it yet
                        chunk = max(chunk, record_size(buf))  # a record larger than a chunk
        except CorruptRecord as e:
            self.dead.add(name)
            self.report(f"corrupt:{name}", f"{path}: corrupt record ({e}); read the records before it, "
                         "skipped the rest of the file")
        except OSError as e:
            self.report(f"read:{name}", f"{path}: unreadable: {e.strerror or e}")
        self.offsets[name] = offset

    def _decode_all(self, buf: bytes, at: list[int], decode: Callable[[bytes], Any], out: list[Any],
                    path: Path, base: int, limit: int | None = None) -> None:
        """decode() of each whole record of `buf` (in C: map over the frames), non-None results to `out`,
        up to `limit` in `out`; at[0] ends up after the last record taken."""
        it = frames(buf, at, base=base)
        n = len(out)
        while True:
            try:
                results = filter(None, map(decode, it))
                # islice asks for no record beyond the last it returns, so at[0] stays exact.
                out.extend(results if limit is None else islice(results, max(0, limit - len(out))))
                break
            except DecodeError:
                self.report(f"proto:{path.name}", f"{path}: a record that is not a TensorBoard event at byte "
                             f"{base + at[1]}; skipped it (and any more such records of this file: counted)")
            except CorruptRecord:
                raise  # the framing itself is damaged: _read_file stops reading the file there
            except Exception as e:  # whatever decoding one record's bytes raises
                # An event that parses but whose values make no record (a NaN presence mask, DDP JSON
                # nested past the recursion limit): at[0] is already past it, so skip it and go on;
                # stopping would meet it again at every later poll. Nothing decoded is ever executed.
                self.report(f"value:{path.name}", f"{path}: an unreadable step event at byte {base + at[1]} "
                             f"({type(e).__name__}: {str(e)[:200]}); skipped it (and any more such events of "
                             "this file: counted)")
        self.events_read += len(out) - n

    def points(self, events: list[tuple[str, event_pb2.Event]],
               keep: Callable[[str], bool] | None = None) -> list[ScalarPoint]:
        """The scalar points of `events`; `keep(tag)` (asked once per tag and call) drops the others early."""
        out: list[ScalarPoint] = []
        append = out.append
        plugins = self._plugins
        kept: dict[str, bool] = {}
        for _, ev in events:
            if not ev.HasField("summary"):
                continue
            step, wall = ev.step, ev.wall_time
            for v in ev.summary.value:
                kind = v.WhichOneof("value")
                if kind == "simple_value":
                    tag = v.tag
                    if keep is not None:
                        k = kept.get(tag)
                        if k is None:
                            k = kept[tag] = keep(tag)
                        if not k:
                            continue
                    append(ScalarPoint(step, wall, tag, v.simple_value))
                elif kind == "tensor":
                    tag = v.tag
                    plugin = v.metadata.plugin_data.plugin_name if v.HasField("metadata") else ""
                    if plugin:
                        plugins[tag] = plugin
                    else:
                        plugin = plugins.get(tag, "")
                    if plugin != "scalars":
                        continue
                    if keep is not None:
                        k = kept.get(tag)
                        if k is None:
                            k = kept[tag] = keep(tag)
                        if not k:
                            continue
                    x = tensor_scalar(v.tensor)
                    if x is not None:
                        append(ScalarPoint(step, wall, tag, x))
        return out

    def poll(self, keep: Callable[[str], bool] | None = None) -> list[ScalarPoint]:
        """Scalar points of the events appended since the last poll, in file order (see `points`)."""
        return self.points(self.poll_events(), keep)

    # -- positions -----------------------------------------------------------------------------

    def _at_record(self, name: str, offset: int) -> bool:
        """Whether a record's header (its length checksum holds) starts at `offset`, or the file ends there
        (it was read whole), or it cannot be looked at now (the poll that reads it reports that)."""
        if offset == 0:
            return True
        try:
            with open(self.directory / name, "rb") as f:
                if offset > os.fstat(f.fileno()).st_size:
                    return False
                f.seek(offset)
                head = f.read(12)
        except OSError:
            return True  # gone or unreadable now: the poll that reads it says so
        if len(head) < 12:
            return True  # the end of the file, or a header the writer has not finished
        try:
            list(frames(head, [0, 0]))  # checks the length's checksum, and stops: the data is not there
        except CorruptRecord:
            return False
        return True

    def state(self) -> dict[str, Any]:
        return {"offsets": dict(self.offsets), "dead": sorted(self.dead), "plugins": dict(self._plugins),
                "first_wall_time": self.first_wall_time}

    def restore(self, state: dict[str, Any]) -> None:
        """Positions saved by `state()`. ValueError when one cannot be where a record begins (negative, or
        not at a record's header in the file as it is now): the caller reads the run again from the start."""
        offsets = {str(k): int(v) for k, v in (state.get("offsets") or {}).items()}
        for name, offset in offsets.items():
            if offset < 0 or not self._at_record(name, offset):
                raise ValueError(f"{name}: byte {offset} is not where a record begins")
        self.offsets = offsets
        self.dead = set(state.get("dead") or [])
        self._plugins = {str(k): str(v) for k, v in (state.get("plugins") or {}).items()}
        self.first_wall_time = state.get("first_wall_time", self.first_wall_time)
