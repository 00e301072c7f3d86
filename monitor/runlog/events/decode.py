"""Step event bytes -> StepRecord, with protobuf (see `tags` for the layout).

Every field comes from the step vector (and the per-parameter vector when the step has one); the
chart scalars after them are not read. Events without a step vector (another writer's files) are
read scalar by scalar. The only other values read are the extras at the end of an event that
`HAS_MORE` announces: attention statistics, mon.log() scalars, sampled per-parameter scalars and
rank 0's DDP comparison.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping
from typing import Any

from tensorboard.compat.proto import event_pb2, tensor_pb2, types_pb2

from monitor import jsontext
from monitor.runlog.events.tags import (
    ATTENTION_TAGS,
    AUTOCAST_NAMES,
    AUTOCAST_TAG,
    BOOL_FIELDS,
    DDP_TAG,
    EXTRA_PREFIXES,
    HAS_MORE,
    INT_FIELDS,
    LR_PREFIX,
    NO_GRAD,
    NO_GRAD_BYTES,
    PARAM_TAGS,
    PARAM_VECTOR_TAG,
    READ_PREFIXES,
    SCALAR_TAG,
    STEP_VECTOR_TAG,
    TAG_FIELDS,
    VECTOR_FIELDS,
    f32_shortest,
)
from monitor.schema import StepRecord


class ParamNorms(Mapping):
    """Per-parameter norms, unpacked from the stored float32 vector on first use: most records'
    vectors are never looked at (rules read them on sampled steps or when they alert)."""

    __slots__ = ("_names", "_raw", "_dict")

    def __init__(self, names: list[str], raw: bytes) -> None:
        self._names, self._raw, self._dict = names, raw, None

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

    # The dict's own methods: Mapping's generic ones would go through __iter__/__getitem__ per key.
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

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    __hash__ = None  # a mapping, like dict

    def __repr__(self) -> str:
        return repr(self._d())


class _Layout:
    """Where the fields of a step vector with one presence mask lie (a run writes the same few masks)."""

    __slots__ = ("names", "end", "ints", "bools", "autocast")

    def __init__(self, mask: int) -> None:
        self.names = tuple(f for bit, f in enumerate(VECTOR_FIELDS) if mask >> bit & 1)
        self.end = len(self.names) + 1  # the LRs follow the fields
        self.ints = tuple(f for f in self.names if f in INT_FIELDS)
        self.bools = tuple(f for f in self.names if f in BOOL_FIELDS)
        self.autocast = "autocast" in self.names


_KNOWN_BITS = (1 << len(VECTOR_FIELDS)) - 1 | HAS_MORE
_MASKS: set[float] = set()  # presence masks seen valid (a run writes a handful)


def _mask(vec: tuple[float, ...]) -> int:
    """The presence mask leading a step vector, checked: a whole number whose bits are fields this version
    knows (a newer writer's field, or damage, would shift every value after it)."""
    m = vec[0] if vec else math.nan
    if not (0 <= m < 2 * HAS_MORE and m == int(m)) or int(m) & ~_KNOWN_BITS:
        raise ValueError(f"a step vector whose presence mask ({m!r}) is not one this version of trainmon writes")
    if len(_MASKS) < 1024:
        _MASKS.add(m)
    return int(m)


def _after(tag: str, prefixes: tuple[str, ...]) -> str | None:
    """The rest of `tag` after the first of `prefixes` it starts with (the current tag, then the old one)."""
    for prefix in prefixes:
        if tag.startswith(prefix):
            return tag[len(prefix):]
    return None


def _take_extra(tag: str, value: float, params: dict, attention: dict, scalars: dict) -> bool:
    """Sampled per-parameter scalars, attention statistics and mon.log() scalars, under their current
    tags or those of earlier versions (`tags.OLD_*`); False for other tags."""
    if (name := _after(tag, PARAM_TAGS)) is not None:
        params[name] = value
    elif (rest := _after(tag, ATTENTION_TAGS)) is not None:
        stat, _, layer = rest.partition("/")
        attention.setdefault(layer, {})[stat] = value
    elif tag.startswith(SCALAR_TAG):
        scalars[tag[len(SCALAR_TAG):]] = value
    else:
        return False
    return True


def _whole(x: Any) -> bool:
    return type(x) is int and x >= 0


def _seconds(x: Any) -> bool:
    return type(x) in (int, float) and math.isfinite(x) and x >= 0


def _by_rank(d: Any) -> bool:
    return isinstance(d, dict) and all(k.isascii() and k.isdigit() and _seconds(v) for k, v in d.items())


def _desync(d: Any) -> bool:
    return (isinstance(d, dict) and _whole(d.get("rank")) and type(d.get("count")) is int and d["count"] >= -1
            and isinstance(d.get("params"), list) and all(map(_whole, d["params"])))


def rank_comparison(raw: Any) -> dict | None:
    """Rank 0's comparison of the ranks (the DDP tag's JSON), checked against the shape `hooks.ddp.compare`
    writes: the rules read it as it is, and a damaged or crafted one must not reach them. ValueError names
    what is wrong (the reader then skips the event and reports it)."""
    if not raw:
        return None
    ex = jsontext.loads(raw[0])
    checks = {"step": _whole, "world": _whole, "reported": lambda v: isinstance(v, list) and all(map(_whole, v)),
              "busy": _by_rank, "phases": lambda v: isinstance(v, dict) and all(map(_by_rank, v.values())),
              "desync": lambda v: isinstance(v, list) and all(map(_desync, v))}
    if not isinstance(ex, dict):
        raise ValueError(f"its rank comparison ({DDP_TAG}) is a {type(ex).__name__}, not an object")
    for key, ok in checks.items():
        if key in ex and not ok(ex[key]):
            raise ValueError(f"its rank comparison ({DDP_TAG}) has a {key!r} of the wrong shape: {str(ex[key])[:80]}")
    return ex


class StepDecoder:
    """Event bytes (or parsed Events) of one rank -> StepRecords (values are as stored: float64 in the
    vectors, float32 in scalars). `param_names` is run.json's model.param_names."""

    _MAX_LAYOUTS = 4096

    def __init__(self, rank: int = 0, param_names: list[str] | None = None, attempt: int = 1) -> None:
        self.rank = rank
        self.attempt = attempt
        self.param_names = param_names if param_names is not None else []
        self._layouts: dict[int, _Layout] = {}

    def decode(self, data: bytes) -> StepRecord | None:
        """The record of one serialized event; None for events that hold no step. Raises protobuf's
        DecodeError for bytes that are not an Event."""
        return self.from_event(event_pb2.Event.FromString(data))

    def from_event(self, ev: event_pb2.Event) -> StepRecord | None:
        if not ev.HasField("summary"):
            return None
        values = ev.summary.value
        if ev.step < 0:  # never written: taken as a step, it would supersede the run as a restart
            raise ValueError(f"step {ev.step}: steps are never negative")
        if values and values[0].tag == STEP_VECTOR_TAG:
            return self._from_vectors(ev, values)
        return self._from_scalars(ev, values)

    def _param_vector(self, t: tensor_pb2.TensorProto) -> ParamNorms | None:
        raw = t.tensor_content  # each access copies the bytes: once
        if t.dtype != types_pb2.DT_FLOAT or len(raw) != 4 * len(self.param_names):
            return None  # written for another parameter list: the sampled scalars, if any, stand in
        return ParamNorms(self.param_names, raw)

    def _layout(self, mask: int) -> _Layout:
        layout = self._layouts.get(mask)
        if layout is None:
            layout = _Layout(mask)
            if len(self._layouts) < self._MAX_LAYOUTS:
                self._layouts[mask] = layout
        return layout

    def _from_vectors(self, ev: event_pb2.Event, values) -> StepRecord:
        content = values[0].tensor.tensor_content
        vec = struct.unpack(f"<{len(content) // 8}d", content)
        mask = int(vec[0]) if vec and vec[0] in _MASKS else _mask(vec)
        layout = self._layout(mask)
        if len(vec) < layout.end:
            raise ValueError(f"a step vector of {len(vec)} values, fewer than the {layout.end} its mask announces")
        fields = dict(zip(layout.names, vec[1:layout.end]))
        for f in layout.ints:
            v = fields[f]
            fields[f] = int(v) if math.isfinite(v) else None
        for f in layout.bools:
            fields[f] = fields[f] != 0.0
        if layout.autocast:
            fields["autocast"] = AUTOCAST_NAMES.get(fields["autocast"])
        rest = 1
        if len(values) > 1 and values[1].tag == PARAM_VECTOR_TAG:
            fields["param_norms"] = self._param_vector(values[1].tensor)
            rest = 2
        if mask & HAS_MORE:
            self._extras(values, rest, fields)
        return StepRecord(step=ev.step, rank=self.rank, attempt=self.attempt, time=ev.wall_time,
                          lr=list(vec[layout.end:]), **fields)

    @staticmethod
    def _extras(values, rest: int, fields: dict) -> None:
        """The extras at the end of the event (after the chart scalars): read back from the end up to
        the first chart scalar instead of looking at every value."""
        tail = []
        for v in reversed(values[rest:]):
            tag = v.tag
            if tag == DDP_TAG or tag.startswith(EXTRA_PREFIXES):
                tail.append(v)
            else:
                break
        attention: dict = {}
        scalars: dict = {}
        params: dict = {}
        for v in reversed(tail):
            if v.tag == DDP_TAG:
                fields["ddp"] = rank_comparison(v.tensor.string_val)
            else:
                _take_extra(v.tag, v.simple_value, params, attention, scalars)
        fields["attention"] = attention or None
        fields["scalars"] = scalars
        if params and fields.get("param_norms") is None:
            fields["param_norms"] = params

    def _from_scalars(self, ev: event_pb2.Event, values) -> StepRecord | None:
        """A step event without vectors: every value by its tag."""
        fields: dict = {}
        lrs: dict[int, float] = {}
        params: dict[str, float] = {}
        params_full: ParamNorms | None = None
        attention: dict[str, dict[str, float]] = {}
        scalars: dict[str, float] = {}
        seen = False
        for v in values:
            tag = v.tag
            field = TAG_FIELDS.get(tag)
            if field is not None:
                seen = True
                x = v.simple_value
                if field in BOOL_FIELDS:
                    fields[field] = x != 0.0
                elif field in INT_FIELDS:
                    fields[field] = int(x) if math.isfinite(x) else None
                else:
                    fields[field] = x
                continue
            if not tag.startswith(READ_PREFIXES):
                continue
            if tag.startswith(LR_PREFIX):
                lrs[int(tag[len(LR_PREFIX):])] = f32_shortest(v.simple_value)
            elif tag == PARAM_VECTOR_TAG:
                params_full = self._param_vector(v.tensor)
            elif tag == AUTOCAST_TAG:
                fields["autocast"] = AUTOCAST_NAMES.get(v.simple_value)
            elif tag == DDP_TAG:
                fields["ddp"] = rank_comparison(v.tensor.string_val)
            elif not _take_extra(tag, v.simple_value, params, attention, scalars):
                continue
            seen = True
        if not seen:
            return None
        return StepRecord(step=ev.step, rank=self.rank, attempt=self.attempt, time=ev.wall_time,
                          lr=[lrs[i] for i in sorted(lrs)],
                          param_norms=params_full if params_full is not None else (params or None),
                          attention=attention or None, scalars=scalars, **fields)


def decode_records(datas: Iterable[bytes], rank: int = 0, param_names: list[str] | None = None) -> list[StepRecord]:
    dec = StepDecoder(rank, param_names)
    return [r for r in map(dec.decode, datas) if r is not None]

