"""StepRecord -> a step event, and the writer that appends them to a rank's event file (see `tags`)."""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
import threading
import time
from pathlib import Path

from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

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


def record_values(r: StepRecord, *, param_norms: bool = True) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for field, tag in FIELD_TAGS.items():
        v = getattr(r, field)
        if v is None or (not v and (field in WHEN_TRUE or field == "skipped" and r.loss_scale is None)):
            continue
        out.append((tag, float(v)))
    out.extend((LR_TAG.format(i), lr) for i, lr in enumerate(r.lr))
    if r.autocast in AUTOCAST_CODES:
        out.append((AUTOCAST_TAG, AUTOCAST_CODES[r.autocast]))
    if param_norms and r.param_norms:
        out.extend((PARAM_TAG + name, v) for name, v in r.param_norms.items())
    if r.attention:
        for layer, stats in r.attention.items():
            out.extend((f"{ATTENTION_TAG}{stat}/{layer}", v) for stat, v in stats.items())
    out.extend((SCALAR_TAG + k, v) for k, v in r.scalars.items())
    return out


def _vector(tag: str, values: list[float], dtype: int, fmt: str) -> summary_pb2.Summary.Value:
    tensor = tensor_pb2.TensorProto(
        dtype=dtype,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(values))]),
        tensor_content=struct.pack(f"<{len(values)}{fmt}", *values),
    )
    return summary_pb2.Summary.Value(tag=tag, tensor=tensor)


def step_vector(r: StepRecord, more: bool = False) -> list[float]:
    """[presence mask, present fields in VECTOR_FIELDS order..., LRs...] as float64: exact values."""
    mask = 0
    out = [0.0]
    for bit, field in enumerate(VECTOR_FIELDS):
        v = getattr(r, field)
        if v is None or (field in WHEN_TRUE and not v):
            continue
        if field == "autocast":
            if v not in AUTOCAST_CODES:
                continue
            v = AUTOCAST_CODES[v]
        mask |= 1 << bit
        out.append(float(v))
    if more or r.attention or r.scalars or r.ddp:
        mask |= HAS_MORE
    out[0] = float(mask)
    out.extend(r.lr)
    return out


def encode_step(r: StepRecord, *, param_norms: bool = True, param_names: list[str] | None = None) -> bytes:
    # The two vectors come first: readers take everything from them without touching the scalar
    # values, which are there for TensorBoard's charts.
    vector = bool(r.param_norms and param_names)
    # Sampled per-parameter scalars without the vector must be read back from the scalar values.
    values = [_vector(STEP_VECTOR_TAG, step_vector(r, more=bool(r.param_norms and param_norms and not vector)),
                      types_pb2.DT_DOUBLE, "d")]
    if vector:
        values.append(_vector(PARAM_VECTOR_TAG, [r.param_norms.get(n, NO_GRAD) for n in param_names],
                              types_pb2.DT_FLOAT, "f"))
    values += [summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in record_values(r, param_norms=param_norms)]
    if r.ddp:
        values.append(summary_pb2.Summary.Value(tag=DDP_TAG, tensor=tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING, tensor_shape=tensor_shape_pb2.TensorShapeProto(),
            string_val=[json.dumps(r.ddp).encode()])))
    summary = summary_pb2.Summary(value=values)
    return event_pb2.Event(wall_time=r.time, step=r.step, summary=summary).SerializeToString()


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
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
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
