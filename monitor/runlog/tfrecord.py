"""TFRecord framing of TensorBoard event files: writing, and incremental reading.

A record is: uint64 length, uint32 masked crc32c(length), data, uint32 masked
crc32c(data), little-endian. The reader keeps its byte offset and stops at an
incomplete trailing record, so a file that is still being written (or was cut
short by a crash) is read up to its last whole record and can be resumed.

A length beyond MAX_RECORD_BYTES is corruption (CorruptRecord), not a record still being written:
otherwise a damaged header whose checksum happens to hold (or a crafted one) claiming a terabyte would
have the reader wait for it forever, reading the rest of the file again on every poll.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

try:  # the C implementation (the pure-Python fallback is two orders of magnitude slower)
    from google_crc32c import value as _crc32c

    def masked_crc32c(data: bytes) -> int:
        crc = _crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
except ImportError:  # pragma: no cover - the dependency is declared; this keeps odd installs working
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
FRAMING_BYTES = _HEADER.size + _FOOTER.size  # what a record takes besides its data

# The largest record data taken as real. A trainmon step event is kilobytes (its per-parameter vector
# 4 bytes a parameter tensor: 4 MB for a million tensors); other writers' events (images, histograms,
# tensors) stay far below protobuf's own 2 GiB message limit, which TensorBoard's readers cannot go past
# either. 256 MiB leaves room for any of them and bounds what a reader holds for one record.
MAX_RECORD_BYTES = 256 << 20


class CorruptRecord(ValueError):
    """A record whose checksum does not match, or whose length no writer produces: the file is corrupt at
    this offset."""


def _too_long(length: int, offset: int) -> CorruptRecord:
    return CorruptRecord(f"impossible record length {length} at byte {offset} (more than "
                         f"{MAX_RECORD_BYTES >> 20} MiB)")


def record_size(buf: bytes, offset: int = 0) -> int:
    """The bytes the record whose header starts at `offset` of `buf` takes, framing included (the header
    must be whole; `frames` has checked it when it stopped before this record as incomplete)."""
    return FRAMING_BYTES + _HEADER.unpack_from(buf, offset)[0]


def encode_record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def read_records(f: BinaryIO, offset: int = 0, *, check_crc: bool = True) -> Iterator[tuple[int, bytes]]:
    """Yield (offset after the record, data) for each whole record from `offset` on."""
    f.seek(offset)
    while True:
        header = f.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        length, length_crc = _HEADER.unpack(header)
        if check_crc and masked_crc32c(header[:8]) != length_crc:
            raise CorruptRecord(f"bad length checksum at byte {offset}")
        if length > MAX_RECORD_BYTES:
            raise _too_long(length, offset)
        body = f.read(length + _FOOTER.size)
        if len(body) < length + _FOOTER.size:
            return  # incomplete: the writer has not finished this record yet
        data = body[:length]
        if check_crc and masked_crc32c(data) != _FOOTER.unpack(body[length:])[0]:
            raise CorruptRecord(f"bad data checksum at byte {offset}")
        offset += _HEADER.size + length + _FOOTER.size
        yield offset, data


def frames(buf: bytes, at: list[int], *, check_crc: bool = True, base: int = 0) -> Iterator[bytes]:
    """The data of each whole record in `buf` from offset at[0] on; after each, at[0] is the offset
    that follows it and at[1] where it began. The daemon reads a file's new bytes in one call and
    frames them here, which costs a third of a read() per record. Raises CorruptRecord at a bad
    checksum or an impossible length (at[0] is then the end of the last good record; its message gives
    the file offset, `base` being where `buf` starts in the file); stops before an incomplete one."""
    unpack_header, unpack_footer = _HEADER.unpack_from, _FOOTER.unpack_from
    crc = masked_crc32c
    offset = at[0]
    end = len(buf)
    while offset + 12 <= end:
        length, length_crc = unpack_header(buf, offset)
        if check_crc and crc(buf[offset:offset + 8]) != length_crc:
            raise CorruptRecord(f"bad length checksum at byte {base + offset}")
        if length > MAX_RECORD_BYTES:
            raise _too_long(length, base + offset)
        start = offset + 12
        stop = start + length
        if stop + 4 > end:
            return  # incomplete: the writer has not finished this record yet
        data = buf[start:stop]
        if check_crc and crc(data) != unpack_footer(buf, stop)[0]:
            raise CorruptRecord(f"bad data checksum at byte {base + offset}")
        at[1] = offset
        offset = at[0] = stop + 4
        yield data
