"""StepRecord -> a step event, and the writer that appends them to a rank's event file (see `tags`)."""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import time
from functools import lru_cache
from pathlib import Path

from monitor.runlog.events import wire
from monitor.runlog.events.tags import (
    ATTENTION_TAG,
    AUTOCAST_CODES,
    AUTOCAST_TAG,
    DDP_TAG,
    FIELD_TAGS,
    HAS_MORE,
    LR_TAG,
    NO_GRAD,
    PARAM_TAG,
    PARAM_VECTOR_TAG,
    SCALAR_TAG,
    STEP_VECTOR_TAG,
    VECTOR_FIELDS,
    WHEN_TRUE,
)
from monitor.runlog.tfrecord import encode_record
from monitor.schema import StepRecord

_file_seq = itertools.count()


def event_file_name(rank: int, attempt: int = 1) -> str:
    # TensorBoard's own shape (events.out.tfevents.<unix seconds>.<host>...): names sort by creation
    # time; pid, a per-process sequence and the rank keep writers apart; the attempt (run.json
    # `attempts`) tells a reader which process's records these are (monitor.runlog.attempts).
    return (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.{next(_file_seq)}"
            f".rank{rank}.attempt{attempt}")


# VECTOR_FIELDS as (mask bit, field, scalar tag): every plain field is both in the step vector and a
# scalar value, in the same order; autocast (no tag here) is a code in the vector and a scalar after the LRs.
_PLAIN = tuple((1 << bit, field, FIELD_TAGS.get(field)) for bit, field in enumerate(VECTOR_FIELDS))
if [f for _, f, tag in _PLAIN if tag is not None] != list(FIELD_TAGS):
    raise ImportError("FIELD_TAGS and VECTOR_FIELDS list the plain fields in different orders")


def _plain(r: StepRecord) -> tuple[int, list[float]]:
    """One pass over the plain fields: (presence mask, their vector values in VECTOR_FIELDS order)."""
    mask = 0
    vector: list[float] = []
    for bit, field, tag in _PLAIN:
        v = getattr(r, field)
        if v is None:
            continue
        if tag is None:  # autocast: a code, when it has one
            code = AUTOCAST_CODES.get(v)
            if code is not None:
                mask |= bit
                vector.append(code)
            continue
        if not v and field in WHEN_TRUE:
            continue
        mask |= bit
        vector.append(float(v))
    return mask, vector


@lru_cache(maxsize=256)
def _plain_scalars(mask: int, quiet_skip: bool) -> tuple[tuple[str, ...], tuple[bool, ...]]:
    """The scalar tags of the plain fields a record of this mask has, and which of its vector values they
    take (not autocast's, whose scalar comes after the LRs; not `skipped` when `quiet_skip`: a run
    without a GradScaler has no skipped series). A handful of masks in a run."""
    tags: list[str] = []
    take: list[bool] = []
    for bit, field, tag in _PLAIN:
        if mask & bit:
            keep = tag is not None and not (quiet_skip and field == "skipped")
            take.append(keep)
            if keep:
                tags.append(tag)
    return tuple(tags), tuple(take)


@lru_cache(maxsize=16)
def _lr_tags(groups: int) -> tuple[str, ...]:
    return tuple(LR_TAG.format(i) for i in range(groups))


def _scalars(r: StepRecord, mask: int, vector: list[float], param_norms: bool) -> tuple[tuple[str, ...], list[float]]:
    """The step's scalar values as (tags, values): the plain fields, LRs, autocast, sampled per-parameter
    norms, attention, mon.log() scalars."""
    tags, take = _plain_scalars(mask, not r.skipped and r.loss_scale is None)
    values = list(itertools.compress(vector, take))
    if r.lr:
        tags += _lr_tags(len(r.lr))
        values += r.lr
    if r.autocast in AUTOCAST_CODES:
        tags += (AUTOCAST_TAG,)
        values.append(AUTOCAST_CODES[r.autocast])
    extra: list[tuple[str, float]] = []
    if param_norms and r.param_norms:
        extra.extend(zip(map(PARAM_TAG.__add__, r.param_norms), r.param_norms.values()))
    if r.attention:
        for layer, stats in r.attention.items():
            extra.extend((f"{ATTENTION_TAG}{stat}/{layer}", v) for stat, v in stats.items())
    if r.scalars:
        extra.extend((SCALAR_TAG + k, v) for k, v in r.scalars.items())
    if extra:
        more_tags, more_values = zip(*extra)
        tags += more_tags
        values += more_values
    return tags, values


def record_values(r: StepRecord, *, param_norms: bool = True) -> list[tuple[str, float]]:
    """The step's scalar values (tag, value), for TensorBoard's charts."""
    return list(zip(*_scalars(r, *_plain(r), param_norms)))


def _vector(r: StepRecord, mask: int, values: list[float], more: bool) -> list[float]:
    if more or r.attention or r.scalars or r.ddp:
        mask |= HAS_MORE
    return [float(mask), *values, *r.lr]


def step_vector(r: StepRecord, more: bool = False) -> list[float]:
    """[presence mask, present fields in VECTOR_FIELDS order..., LRs...] as float64: exact values."""
    return _vector(r, *_plain(r), more)


def encode_step(r: StepRecord, *, param_norms: bool = True, param_names: list[str] | None = None) -> bytes:
    # The two vectors come first: readers take everything from them without touching the scalar
    # values, which are there for TensorBoard's charts.
    vector = bool(r.param_norms and param_names)
    mask, values = _plain(r)
    # Sampled per-parameter scalars without the vector must be read back from the scalar values.
    parts = [wire.vector_value(STEP_VECTOR_TAG, _vector(r, mask, values, bool(r.param_norms and param_norms
                                                                              and not vector)), double=True)]
    if vector:
        parts.append(wire.vector_value(PARAM_VECTOR_TAG, list(map(r.param_norms.get, param_names, itertools.repeat(NO_GRAD))),
                                       double=False))
    parts.append(wire.scalar_values(*_scalars(r, mask, values, param_norms)))
    if r.ddp:
        parts.append(wire.string_value(DDP_TAG, json.dumps(r.ddp).encode()))
    return wire.event(r.time, r.step, summary=b"".join(parts))


# Bytes waiting in memory before write() writes them without waiting for the flush interval.
FLUSH_BYTES = 256 * 1024
# Unwritten bytes held at most while writes fail (a full disk): past it, new records are dropped
# (the error says so) until the file takes bytes again. Records are held whole, so the file stays
# readable, and what was held lands in order once there is room.
MAX_PENDING_BYTES = 16 * 1024 * 1024


class EventWriter:
    """Appends step events to one event file; called from the publisher thread (`flush` and `close`
    also from others: a lock keeps them apart).

    Records are buffered in memory and written whole, every `flush_secs`. A failed write (a full
    disk, a file size limit) raises to the caller, which counts it; the bytes stay buffered (up to
    MAX_PENDING_BYTES) and go out with the next flush. Bytes are written only by the process that
    buffered them: a child made with os.fork that flushes or closes this writer writes nothing.
    """

    def __init__(self, directory: Path, rank: int, *, flush_secs: float = 2.0, param_norms_every: int = 50,
                 param_names: list[str] | None = None, attempt: int = 1) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / event_file_name(rank, attempt)
        self._f = open(self.path, "ab", buffering=0)  # noqa: SIM115 (kept open for the run; unbuffered: _buf is the buffer)
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._flush_secs = flush_secs
        self._param_norms_every = param_norms_every
        self._param_names = param_names
        self._last_flush = time.monotonic()
        self.dropped = 0  # records not kept because MAX_PENDING_BYTES were waiting for room
        self._write(wire.event(time.time(), file_version="brain.Event:2"))
        try:
            self.flush()
        except BaseException:
            self._f.close()
            raise

    def _write(self, data: bytes, step: int | None = None) -> None:
        with self._lock:
            if self._f.closed:
                raise ValueError(f"event file closed: {self.path}")
            if len(self._buf) >= MAX_PENDING_BYTES:
                self.dropped += 1
                raise OSError(f"{len(self._buf)} bytes wait to be written to {self.path}: the record of step {step} "
                              f"is dropped ({self.dropped} so far)")
            self._buf += encode_record(data)

    def write(self, r: StepRecord) -> None:
        every = self._param_norms_every
        self._write(encode_step(r, param_norms=bool(every) and r.step % every == 0, param_names=self._param_names),
                    r.step)
        if len(self._buf) >= FLUSH_BYTES or time.monotonic() - self._last_flush >= self._flush_secs:
            self.flush()

    def maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= self._flush_secs:
            self.flush()

    def flush(self) -> None:
        """Write what is buffered; on an error what was not written stays buffered, and it raises."""
        with self._lock:
            self._last_flush = time.monotonic()  # a failing disk is tried again at the next interval
            if self._f.closed or os.getpid() != self._pid:
                return
            self._drain()
            self._check_linked()

    def _drain(self) -> None:
        buf = self._buf
        while buf:
            n = self._f.write(buf)
            del buf[:n or 0]
            if not n:
                raise OSError(f"no bytes could be written to {self.path}")

    def _check_linked(self) -> None:
        if os.fstat(self._f.fileno()).st_nlink == 0:  # written, but to nowhere anyone can read
            raise FileNotFoundError(f"the event file was deleted (its run directory removed?): {self.path}")

    def close(self) -> None:
        """Flush, sync to the disk and close; the file is closed even when the last bytes cannot be written."""
        with self._lock:
            if self._f.closed:
                return
            try:
                if os.getpid() == self._pid:
                    self._drain()
                    os.fsync(self._f.fileno())
                    self._check_linked()
            finally:
                self._buf.clear()
                self._f.close()
