"""StepRecords <-> TensorBoard events.

One Event per optimizer step holds every scalar of that step as simple_value
summaries (what TensorBoard's scalar dashboard and EventAccumulator read).
Tags are namespaced `trainmon/...` so they never collide with a user's own.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

from monitor.runlog.tfrecord import encode_record
from monitor.schema import _STEP_PLAIN_DEFAULTS, StepRecord

PREFIX = "trainmon/"
# StepRecord field -> tag, for the plain scalar fields.
FIELD_TAGS = {
    "loss": "trainmon/loss",
    "grad_norm": "trainmon/grad_norm",
    "grad_norm_clipped": "trainmon/grad_norm_clipped",
    "clip_coef": "trainmon/clip_coef",
    "max_norm": "trainmon/max_norm",
    "loss_scale": "trainmon/loss_scale",
    "skipped": "trainmon/skipped",
    "step_time": "trainmon/step_time",
    "tokens": "trainmon/tokens",
    "micro_batches": "trainmon/micro_batches",
    "scheduler_steps": "trainmon/scheduler_steps",
    "busy_time": "trainmon/busy_time",
    "local_grad_norm": "trainmon/local_grad_norm",
    "memory": "trainmon/memory_bytes",
    "grad_norm_unknown": "trainmon/grad_norm_unknown",
    "input_time": "trainmon/phase/input",
    "compute_time": "trainmon/phase/compute",
    "collective_wait_time": "trainmon/phase/collective_wait",
}
TAG_FIELDS = {v: k for k, v in FIELD_TAGS.items()}
AUTOCAST_TAG = "trainmon/autocast"
AUTOCAST_CODES = {"float16": 1.0, "bfloat16": 2.0}  # a scalar series, like everything else in the file
AUTOCAST_NAMES = {v: k for k, v in AUTOCAST_CODES.items()}
LR_PREFIX = "trainmon/lr/group"
LR_TAG = LR_PREFIX + "{}"
PARAM_TAG = "trainmon/param_grad_norm/"  # sampled scalar series, for TensorBoard's charts
# Every per-parameter norm of a step as one float32 vector in run.json's model.param_names order
# (-1: the parameter had no gradient), so readers see exactly what the in-process rules saw.
PARAM_VECTOR_TAG = "trainmon/param_grad_norms"
NO_GRAD = -1.0
NO_GRAD_BYTES = struct.pack("<f", NO_GRAD)
# Every field of a step as one float64 vector (exact, and ~5x faster to read than the scalars).
STEP_VECTOR_TAG = "trainmon/step"
VECTOR_FIELDS = ("loss", "grad_norm", "grad_norm_clipped", "clip_coef", "max_norm", "loss_scale", "skipped",
                 "step_time", "tokens", "micro_batches", "scheduler_steps", "autocast",
                 # appended later: bit positions are the file format, new fields go at the end
                 "busy_time", "local_grad_norm", "memory", "grad_norm_unknown",
                 "input_time", "compute_time", "collective_wait_time")  # bits 16-18 (HAS_MORE is bit 20)
_BOOL_FIELDS = frozenset({"skipped", "grad_norm_unknown"})
_WHEN_TRUE = frozenset({"grad_norm_unknown"})  # flags stored only when set (absent reads back as False)
DDP_TAG = "trainmon/ddp"  # rank 0's comparison of the ranks, JSON in a string tensor
HAS_MORE = 1 << 20  # attention statistics or extra scalars follow as scalar values
ATTENTION_TAG = "trainmon/attention/"  # trainmon/attention/<stat>/<layer>
SCALAR_TAG = "trainmon/scalars/"
_INT_FIELDS = {"tokens", "micro_batches", "scheduler_steps"}
_EXTRA_PREFIXES = (PARAM_TAG, ATTENTION_TAG, SCALAR_TAG)  # scalar values read back besides the vectors


_file_seq = itertools.count()


def event_file_name(rank: int) -> str:
    # TensorBoard's own shape (events.out.tfevents.<unix seconds>.<host>...): names sort by creation
    # time; pid, a per-process sequence and the rank keep concurrent writers and restarts apart.
    return f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.{next(_file_seq)}.rank{rank}"


def f32_shortest(x: float) -> float:
    """The shortest decimal that is the same float32: stored LRs read back as 0.001, not 0.0010000000474974513."""
    packed = struct.pack("<f", x)
    for digits in (6, 7, 8):
        y = float(f"{x:.{digits}g}")
        if struct.pack("<f", y) == packed:
            return y
    return x


def record_values(r: StepRecord, *, param_norms: bool = True) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for field, tag in FIELD_TAGS.items():
        v = getattr(r, field)
        if v is None or (not v and (field in _WHEN_TRUE or field == "skipped" and r.loss_scale is None)):
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
        if v is None or (field in _WHEN_TRUE and not v):
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


class EventWriter:
    """Appends step events to one event file; synchronous, called from the publisher thread only."""

    def __init__(self, directory: Path, rank: int, *, flush_secs: float = 2.0, param_norms_every: int = 50,
                 param_names: list[str] | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / event_file_name(rank)
        self._f = open(self.path, "ab")  # noqa: SIM115 (kept open for the run)
        self._flush_secs = flush_secs
        self._param_norms_every = param_norms_every
        self._param_names = param_names
        self._last_flush = time.monotonic()
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        self.flush()

    def _write(self, data: bytes) -> None:
        self._f.write(encode_record(data))

    def write(self, r: StepRecord) -> None:
        every = self._param_norms_every
        self._write(encode_step(r, param_norms=bool(every) and r.step % every == 0, param_names=self._param_names))
        if time.monotonic() - self._last_flush >= self._flush_secs:
            self.flush()

    def maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= self._flush_secs:
            self.flush()

    def flush(self) -> None:
        if not self._f.closed:
            self._f.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            self._f.close()


def _take_extra(tag: str, value: float, params: dict, attention: dict, scalars: dict) -> bool:
    """Sampled per-parameter scalars, attention statistics and mon.log() scalars; False for other tags."""
    if tag.startswith(PARAM_TAG):
        params[tag[len(PARAM_TAG):]] = value
    elif tag.startswith(ATTENTION_TAG):
        stat, _, layer = tag[len(ATTENTION_TAG):].partition("/")
        attention.setdefault(layer, {})[stat] = value
    elif tag.startswith(SCALAR_TAG):
        scalars[tag[len(SCALAR_TAG):]] = value
    else:
        return False
    return True


class ParamNorms(Mapping):
    """Per-parameter norms decoded on first use: most records' vectors are never looked at (rules
    read them on sampled steps or when they alert), and decoding dozens of names per record would
    be a large share of the daemon's ingest time."""

    __slots__ = ("_names", "_raw", "_dict", "fold")

    def __init__(self, names: list[str], raw: bytes) -> None:
        self._names, self._raw, self._dict = names, raw, None
        # The rules' last parameter-baseline fold of this vector (monitor.rules.stats.ParamBaseline).
        self.fold: tuple | None = None

    def _d(self) -> dict[str, float]:
        if self._dict is None:
            values = struct.unpack(f"<{len(self._names)}f", self._raw)
            out = dict(zip(self._names, values))
            if NO_GRAD in values:  # parameters without a gradient that step
                out = {k: v for k, v in out.items() if v != NO_GRAD}
            self._dict = out
        return self._dict

    def __getitem__(self, key: str) -> float:
        return self._d()[key]

    # The dict's own methods: Mapping's generic ones go through __iter__/__getitem__ per key, a
    # large share of the rules' time on records whose vectors they read.
    def get(self, key: str, default=None):
        return self._d().get(key, default)

    def items(self):
        return self._d().items()

    def values(self):
        return self._d().values()

    def keys(self):
        return self._d().keys()

    def __contains__(self, key: object) -> bool:
        return key in self._d()

    def __iter__(self):
        return iter(self._d())

    def __len__(self) -> int:
        return len(self._d()) if self._dict is not None or NO_GRAD_BYTES in self._raw else len(self._names)

    def __bool__(self) -> bool:
        return bool(self._names)

    def __repr__(self) -> str:
        return repr(self._d())


_LAYOUTS: dict[int, Callable[..., dict]] = {}  # a run writes the same few masks over and over


def _layout(mask: int) -> Callable[..., dict]:
    """make(vec, step, rank, wall_time) -> a StepRecord's __dict__ from a step vector with this presence
    mask. Generated per mask (as namedtuple and dataclasses generate code): one dict display with the
    fields at fixed positions costs a third of filling a dict field by field, on the daemon's hot path."""
    pos = {f: i + 1 for i, f in enumerate(f for bit, f in enumerate(VECTOR_FIELDS) if mask >> bit & 1)}
    n = len(pos) + 1
    fixed = {"step": "step", "rank": "rank", "time": "wall_time", "lr": "lr", "scalars": "{}"}
    items = []
    for field in StepRecord.model_fields:
        if field in fixed:
            expr = fixed[field]
        elif field in pos:
            v = f"vec[{pos[field]}]"
            if field in _INT_FIELDS:
                expr = f"(int({v}) if _isfinite({v}) else None)"
            elif field in _BOOL_FIELDS:
                expr = f"{v} != 0.0"
            elif field == "autocast":
                expr = f"_autocast({v})"
            else:
                expr = v
        else:
            default = _STEP_PLAIN_DEFAULTS[field]
            expr = repr(default) if default is None or isinstance(default, bool) else f"_defaults[{field!r}]"
        items.append(f"{field!r}: {expr}")
    items.append("'max_lr': max(lr) if lr else None")  # StepRecord.max_lr, asked by half the rules
    src = f"def make(vec, step, rank, wall_time):\n    lr = list(vec[{n}:])\n    return {{{', '.join(items)}}}\n"
    namespace = {"_isfinite": math.isfinite, "_autocast": AUTOCAST_NAMES.get, "_defaults": _STEP_PLAIN_DEFAULTS}
    exec(src, namespace)  # noqa: S102 - the source is built above from field names only
    make = namespace["make"]
    if len(_LAYOUTS) < 4096:
        _LAYOUTS[mask] = make
    return make


class StepAssembler:
    """Rebuilds StepRecords from decoded events (values are float32 as stored)."""

    def __init__(self, rank: int = 0, param_names: list[str] | None = None) -> None:
        self.rank = rank
        self.param_names = param_names if param_names is not None else []

    def _param_vector(self, t: tensor_pb2.TensorProto) -> ParamNorms | None:
        raw = t.tensor_content  # each access copies the bytes: once
        if t.dtype != types_pb2.DT_FLOAT or len(raw) != 4 * len(self.param_names):
            return None  # written for another parameter list: fall back to the sampled scalars
        return ParamNorms(self.param_names, raw)

    def _from_vectors(self, ev: event_pb2.Event, values) -> StepRecord | None:
        content = values[0].tensor.tensor_content
        vec = struct.unpack(f"<{len(content) // 8}d", content)
        return self._build(ev.step, ev.wall_time, vec, values)

    def _build(self, step: int, wall_time: float, vec: tuple[float, ...], values=None,
               param_raw: bytes | None = None, extras: tuple | None = None) -> StepRecord:
        """The record of a step vector; the per-parameter vector comes as `param_raw` (the template
        path) or from `values`, the event's summary values, which also hold any extras."""
        mask = int(vec[0])
        d = (_LAYOUTS.get(mask) or _layout(mask))(vec, step, self.rank, wall_time)
        has_vector = False
        if param_raw is not None:
            has_vector = True
            d["param_norms"] = (ParamNorms(self.param_names, param_raw)
                                if len(param_raw) == 4 * len(self.param_names) else None)
        rest = 1
        if values is not None and len(values) > 1 and values[1].tag == PARAM_VECTOR_TAG:
            has_vector = True
            d["param_norms"] = self._param_vector(values[1].tensor)
            rest = 2
        if mask & HAS_MORE and extras is not None:  # gathered by the template path
            attention, scalars, params = extras
            d["attention"] = attention or None
            d["scalars"] = scalars
            if params and not has_vector:
                d["param_norms"] = params
        elif mask & HAS_MORE and values is not None:
            attention = {}
            scalars = {}
            params = {}
            # The extras follow the chart scalars (record_values' order, then the DDP comparison): read
            # back from the end up to the first chart scalar instead of looking at every value.
            tail = []
            for v in reversed(values[rest:]):
                tag = v.tag
                if tag == DDP_TAG or tag.startswith(_EXTRA_PREFIXES):
                    tail.append(v)
                else:
                    break
            tail.reverse()
            for v in tail:
                if v.tag == DDP_TAG:
                    d["ddp"] = json.loads(v.tensor.string_val[0]) if v.tensor.string_val else None
                else:
                    _take_extra(v.tag, v.simple_value, params, attention, scalars)
            d["attention"] = attention or None
            d["scalars"] = scalars
            if params and not has_vector:
                d["param_norms"] = params
        return StepRecord.from_trusted(d)

    def from_event(self, ev: event_pb2.Event) -> StepRecord | None:
        # The daemon's hot path (tens of thousands of records a second): the step vector when there
        # is one; otherwise (other writers, older files) the scalar values one by one.
        if not ev.HasField("summary"):
            return None
        values = ev.summary.value
        if values and values[0].tag == STEP_VECTOR_TAG:
            return self._from_vectors(ev, values)
        fields: dict = {}
        lrs: dict[int, float] = {}
        params: dict[str, float] = {}
        params_full: dict[str, float] | None = None
        attention: dict[str, dict[str, float]] = {}
        scalars: dict[str, float] = {}
        seen = False
        for v in ev.summary.value:
            tag = v.tag
            field = TAG_FIELDS.get(tag)
            if field is not None:
                seen = True
                x = v.simple_value
                if field in _BOOL_FIELDS:
                    fields[field] = x != 0.0
                elif field in _INT_FIELDS:
                    fields[field] = int(x) if math.isfinite(x) else None
                else:
                    fields[field] = x
                continue
            if not tag.startswith(PREFIX):
                continue
            if tag.startswith(LR_PREFIX):
                lrs[int(tag[len(LR_PREFIX):])] = f32_shortest(v.simple_value)
            elif tag == PARAM_VECTOR_TAG:
                params_full = self._param_vector(v.tensor)
            elif tag == AUTOCAST_TAG:
                fields["autocast"] = AUTOCAST_NAMES.get(v.simple_value)
            elif not _take_extra(tag, v.simple_value, params, attention, scalars):
                continue
            seen = True
        if not seen:
            return None
        # Not validated: the values come from our own writer, and validation would cost ~10x.
        return StepRecord.fast(
            step=ev.step, rank=self.rank, time=ev.wall_time, lr=[lrs[i] for i in sorted(lrs)],
            param_norms=params_full if params_full is not None else (params or None),
            attention=attention or None, scalars=scalars, **fields,
        )


class _Template(NamedTuple):
    """Where the payloads lie in the serialized events of one shape (see StepDecoder)."""

    head: bytes  # from after the step varint up to the step vector's payload
    vector_at: int  # len(head)
    vector: struct.Struct  # the step vector payload
    mid: bytes  # after it: the per-parameter vector's header, or the next value's header up to its tag
    mid_len: int
    param_len: int  # bytes of the per-parameter payload that follows `mid` (0: none)
    # Events with extras (attention statistics, mon.log() scalars): everything after the vectors as
    # alternating framing bytes and float32 values, the framing to compare, and a function (generated
    # per shape) that makes (attention, scalars, params) from the unpacked values. None otherwise.
    rest: struct.Struct | None = None
    framing: tuple[bytes, ...] = ()
    extras: Callable[[tuple], tuple] | None = None


class StepDecoder(StepAssembler):
    """Event bytes -> StepRecord, reading trainmon's own step events without protobuf.

    Every step event of a run has the same bytes apart from the wall time, the step, the two vectors'
    payloads and the chart scalars' values: the protobuf framing (tags, lengths, dtypes, shapes) only
    changes when the set of fields or tags does. So the first event of each shape is parsed with
    protobuf and its framing remembered as a template; a later event of the same length whose framing
    bytes are identical has its payloads at the same offsets and is unpacked directly, ~4x faster.
    The chart scalars after the vectors are not looked at, as in `from_event` (the vectors hold every
    value). Anything else (no template yet, extras such as attention statistics, another writer's
    events) takes the protobuf path, and a record that is not an Event raises DecodeError as before.
    """

    _MAX_TEMPLATES = 64  # a run has a handful of shapes (sampled per-parameter scalars, ...)

    def __init__(self, rank: int = 0, param_names: list[str] | None = None) -> None:
        super().__init__(rank, param_names)
        self._templates: dict[int, _Template | None] = {}  # by length after the step varint

    def decode(self, data: bytes) -> StepRecord | None:
        r = self._fast(data)
        if r is not _MISS:
            return r
        ev = event_pb2.Event.FromString(data)
        r = self.from_event(ev)
        if r is not None and len(self._templates) < self._MAX_TEMPLATES:
            self._learn(data, ev)
        return r

    def _fast(self, data: bytes):
        """The record by the template of its shape, or _MISS."""
        # Event: wall_time (field 1, fixed64: 0x09), step (field 2, varint: 0x10), summary (field 5).
        # Zero values are not serialized (proto3): those events take the protobuf path.
        size = len(data)
        if size < 16 or data[0] != 0x09 or data[9] != 0x10:
            return _MISS
        step = data[10]
        p = 11
        if step >= 0x80:  # a step of more than 7 bits
            step &= 0x7F
            shift = 7
            while True:
                if p >= size or shift > 63:
                    return _MISS
                b = data[p]
                step |= (b & 0x7F) << shift
                p += 1
                if b < 0x80:
                    break
                shift += 7
            if step >= 1 << 63:
                step -= 1 << 64  # a negative int64
        t = self._templates.get(size - p)
        if t is None or not data.startswith(t.head, p):
            return _MISS
        at = p + t.vector_at
        vec = t.vector.unpack_from(data, at)
        at += t.vector.size
        if not data.startswith(t.mid, at):
            return _MISS
        at += t.mid_len
        raw = data[at:at + t.param_len] if t.param_len else None
        extras = None
        if int(vec[0]) & HAS_MORE:
            if t.rest is None:
                return _MISS
            parts = t.rest.unpack_from(data, at + t.param_len)
            if parts[0::2] != t.framing:
                return _MISS
            extras = t.extras(parts)
        return self._build(step, _WALL.unpack_from(data, 1)[0], vec, param_raw=raw, extras=extras)

    def _learn(self, data: bytes, ev: event_pb2.Event) -> None:
        """Remember the framing of `data` when it is a step event the template path can read."""
        values = ev.summary.value
        if not ev.step or not ev.wall_time or values[0].tag != STEP_VECTOR_TAG:
            return
        content = values[0].tensor.tensor_content
        if not content or len(content) % 8:
            return
        more = bool(int(struct.unpack_from("<d", content)[0]) & HAS_MORE)
        # The end of the step varint: after the 0x09 wall time and the 0x10 tag.
        p = 10
        while data[p] & 0x80:
            p += 1
        p += 1
        key = len(data) - p
        if key in self._templates:
            self._templates[key] = None  # two shapes of one length: leave that length to protobuf
            return
        at = data.find(content, p)
        if at < 0 or data.find(content, at + 1) >= 0:
            return  # not found once exactly: no template
        end = at + len(content)
        param_len = 0
        if len(values) > 1 and values[1].tag == PARAM_VECTOR_TAG:
            raw = values[1].tensor.tensor_content
            param_at = data.find(raw, end) if raw else -1
            if param_at < 0:
                return
            mid_end, param_len = param_at, len(raw)
        elif len(values) > 1 and not more:  # the next value's framing up to and including its tag
            tag = values[1].tag.encode()
            tag_at = data.find(tag, end)
            if tag_at < 0:
                return
            mid_end = tag_at + len(tag)
        else:
            mid_end = end
        t = _Template(data[p:at], at - p, struct.Struct(f"<{len(content) // 8}d"), data[end:mid_end], mid_end - end,
                      param_len)
        if more:
            rest = _scalar_values(data, mid_end + param_len)
            if rest is None:
                return  # not scalar values only (the DDP comparison's JSON): protobuf reads these
            t = t._replace(**rest)
        # Accept it only if it reads this very event back the same way protobuf did.
        self._templates[key] = t
        if not _same(self._fast(data), self.from_event(ev)):
            self._templates[key] = None


_WALL = struct.Struct("<d")
_MISS = object()


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[i]
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value, i
        shift += 7


def _scalar_values(data: bytes, start: int) -> dict | None:
    """The layout of `data[start:]` when it is only Summary.Values of a tag and a simple_value (chart
    scalars and extras): a Struct alternating framing bytes and float32 values, the framing, and the
    function that turns the unpacked parts into (attention, scalars, params). None for anything else."""
    floats: list[tuple[int, str]] = []  # (offset of the float, tag)
    q = start
    try:
        while q < len(data):
            if data[q] != 0x0A:  # Summary.value (field 1, length-delimited)
                return None
            size, r = _varint(data, q + 1)
            end = r + size
            if data[r] != 0x0A:  # Value.tag (field 1)
                return None
            tag_len, t = _varint(data, r + 1)
            at = t + tag_len
            if at + 5 != end or data[at] != 0x15:  # then Value.simple_value (field 2, fixed32), and nothing else
                return None
            floats.append((at + 1, data[t:at].decode()))
            q = end
    except (IndexError, UnicodeDecodeError):
        return None
    fmt, framing, prev = ["<"], [], start
    for at, _ in floats:
        fmt += [f"{at - prev}s", "f"]
        framing.append(data[prev:at])
        prev = at + 4
    fmt.append(f"{len(data) - prev}s")
    framing.append(data[prev:])
    return {"rest": struct.Struct("".join(fmt)), "framing": tuple(framing), "extras": _extras_maker(floats)}


def _extras_maker(floats: list[tuple[int, str]]) -> Callable[[tuple], tuple]:
    """make(parts) -> (attention, scalars, params) for values at these positions, as _take_extra would
    gather them one by one; generated per shape (dict displays; a repeated key keeps its place, the
    later value wins, as with repeated assignment)."""
    attention: dict[str, list[str]] = {}
    scalars, params = [], []
    for k, (_, tag) in enumerate(floats):
        v = f"parts[{2 * k + 1}]"
        if tag.startswith(PARAM_TAG):
            params.append(f"{tag[len(PARAM_TAG):]!r}: {v}")
        elif tag.startswith(ATTENTION_TAG):
            stat, _, layer = tag[len(ATTENTION_TAG):].partition("/")
            attention.setdefault(layer, []).append(f"{stat!r}: {v}")
        elif tag.startswith(SCALAR_TAG):
            scalars.append(f"{tag[len(SCALAR_TAG):]!r}: {v}")
    att = ", ".join(f"{layer!r}: {{{', '.join(stats)}}}" for layer, stats in attention.items())
    src = f"def make(parts):\n    return {{{att}}}, {{{', '.join(scalars)}}}, {{{', '.join(params)}}}\n"
    namespace: dict = {}
    exec(src, namespace)  # noqa: S102 - built above from the event's own tags, as repr() literals
    return namespace["make"]


def _same(a, b: StepRecord | None) -> bool:
    if not isinstance(a, StepRecord) or b is None:
        return False
    fields = StepRecord.model_fields
    da, db = ({k: v for k, v in r.__dict__.items() if k in fields} for r in (a, b))
    pa, pb = da.pop("param_norms", None), db.pop("param_norms", None)
    same_params = (pa is None and pb is None) or (pa is not None and pb is not None and dict(pa) == dict(pb))
    return same_params and repr(da) == repr(db)  # repr: NaN == NaN


def decode_records(datas: Iterable[bytes], rank: int = 0, param_names: list[str] | None = None) -> list[StepRecord]:
    dec = StepDecoder(rank, param_names)
    out = []
    for data in datas:
        r = dec.decode(data)
        if r is not None:
            out.append(r)
    return out
