"""The protocol-buffer bytes of the few TensorBoard messages trainmon writes, made directly.

Building an Event through the protobuf runtime costs about a microsecond per value (a message object
each, then serialisation): half of the publisher's work per step. Here the bytes come from a cached
prefix per tag and `struct`: the same bytes SerializeToString gives for the same message (fields in
number order, proto3 defaults left out, a oneof member written even when zero), which
tests/test_runlog.py checks against the runtime, and TensorBoard's own reader reads.

Messages (tensorboard/compat/proto): Event {double wall_time = 1; int64 step = 2; string file_version
= 3; Summary summary = 5}; Summary {repeated Value value = 1}; Summary.Value {string tag = 1; oneof:
float simple_value = 2, TensorProto tensor = 8}; TensorProto {DataType dtype = 1; TensorShapeProto
tensor_shape = 2; bytes tensor_content = 4; repeated bytes string_val = 8}; TensorShapeProto {repeated
Dim dim = 2}; Dim {int64 size = 1}.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from functools import lru_cache

_F32 = struct.Struct("<f").pack
_F64 = struct.Struct("<d").pack
_ZERO64 = bytes(8)


_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def varint(n: int) -> bytes:
    """Base-128 varint; a negative int64 as its 64-bit two's complement (ten bytes), as protobuf does."""
    if n < 0x4000:  # one or two bytes: tags, lengths and steps, nearly always
        if n >= 0x80:
            return bytes(((n & 0x7F) | 0x80, n >> 7))
        if n >= 0:
            return _ONE_BYTE[n]
        n += 1 << 64
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (a string, bytes or a message)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def f32(v: float) -> bytes:
    """A float field's four bytes: a double out of float32's range becomes an infinity, as a C cast does."""
    try:
        return _F32(v)
    except OverflowError:
        return _F32(math.copysign(math.inf, v))


@lru_cache(maxsize=8192)
def _scalar_prefix(tag: str) -> bytes:
    """Summary.value's field header, the Value's tag and simple_value's header: all but the float."""
    tag_field = _field(1, tag.encode())
    return b"\x0a" + varint(len(tag_field) + 5) + tag_field + b"\x15"


@lru_cache(maxsize=64)
def _scalars_packer(tags: tuple[str, ...]) -> tuple[struct.Struct, list]:
    """One struct for a run of scalar values with these tags (a step's tags repeat from step to step):
    each value's prefix then its float, and the argument list with the prefixes in place."""
    prefixes = [_scalar_prefix(t) for t in tags]
    args: list = [None] * (2 * len(prefixes))
    args[0::2] = prefixes
    return struct.Struct("<" + "".join(f"{len(p)}sf" for p in prefixes)), args


def scalar_values(tags: tuple[str, ...], values: Sequence[float]) -> bytes:
    """Summary.value entries {tag, simple_value} (Summary's field 1, repeated), one per tag and value."""
    if not tags:
        return b""
    packer, template = _scalars_packer(tags)
    args = template.copy()
    args[1::2] = values
    try:
        return packer.pack(*args)
    except OverflowError:  # a value beyond float32: an infinity, value by value
        prefix = _scalar_prefix
        return b"".join([prefix(t) + f32(v) for t, v in zip(tags, values)])


_DT_FLOAT, _DT_DOUBLE, _DT_STRING = 1, 2, 7  # tensorflow DataType (types.proto)


def _shape(n: int | None) -> bytes:
    """A TensorShapeProto field: scalar (None) or one dimension of `n`."""
    return _field(2, b"" if n is None else _field(2, b"\x08" + varint(n) if n else b""))


def _tensor_value(tag: str, tensor: bytes) -> bytes:
    """A Summary.value entry {tag, tensor}."""
    return _field(1, _field(1, tag.encode()) + _field(8, tensor))


@lru_cache(maxsize=1024)
def _vector_prefix(tag: str, double: bool, n: int) -> bytes:
    """A vector value's bytes before its content (the content's length is known from `n`)."""
    dtype = _DT_DOUBLE if double else _DT_FLOAT
    content = n * (8 if double else 4)
    head = b"\x08" + varint(dtype) + _shape(n) + (varint(4 << 3 | 2) + varint(content) if content else b"")
    return _tensor_value(tag, head + bytes(content))[:-content or None]


@lru_cache(maxsize=64)
def _packer(fmt: str) -> struct.Struct:
    return struct.Struct(fmt)


def vector_value(tag: str, values: list[float], *, double: bool) -> bytes:
    """A Summary.value entry holding a float64 (`double`) or float32 vector, packed little-endian."""
    n = len(values)
    if double:
        content = _packer(f"<{n}d").pack(*values)
    else:
        try:
            content = _packer(f"<{n}f").pack(*values)
        except OverflowError:  # some value beyond float32: an infinity, value by value
            content = b"".join(map(f32, values))
    return _vector_prefix(tag, double, n) + content


def string_value(tag: str, data: bytes) -> bytes:
    """A Summary.value entry holding a scalar string tensor."""
    return _tensor_value(tag, b"\x08" + varint(_DT_STRING) + _shape(None) + _field(8, data))


def event(wall_time: float, step: int = 0, *, summary: bytes | None = None, file_version: str | None = None) -> bytes:
    """An Event: `summary` the Summary's bytes (its values, concatenated), or a `file_version` header."""
    parts = []
    wt = _F64(wall_time)
    if wt != _ZERO64:
        parts += (b"\x09", wt)
    if step:
        parts += (b"\x10", varint(step))
    if file_version is not None:
        parts.append(_field(3, file_version.encode()))
    if summary is not None:
        parts += (b"\x2a", varint(len(summary)), summary)  # field 5, length-delimited
    return b"".join(parts)
