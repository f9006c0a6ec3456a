"""Compact byte layouts of a strictly increasing index array (docs/protocol.md section 5.1).

An index array on the wire is one layout byte and a body; the sender picks whichever layout
is shortest for its array, the receiver accepts all three:

* ``0x00`` raw: little-endian uint32 per index (4 bytes each; best for a few scattered indices);
* ``0x01`` gaps: the first index, then each difference to the previous one, as unsigned
  LEB128 varints (1 byte per index while gaps stay under 128: top-k sets and their unions);
* ``0x02`` bitmap: bit ``i`` (little-endian bit order within each byte) set for each index
  ``i``, as many bytes as the largest index needs (dense sets: an eighth of a byte each).

Why: START carries the union of the members' index sets to every member, and at top-k 25 %
that union covers most of the model, so raw uint32 indices cost about as much as the masked
vector itself.

Security property: decoding never trusts the bytes. Before anything is allocated from them,
the layout byte is checked, the varint count and the bitmap's bit count are bounded by
:data:`protocol.limits.MAX_VECTOR_LEN`, every varint is canonical (no padding bytes) and at
most 5 bytes, and the result must fit in uint32 and be strictly increasing. Every failure is a
:class:`protocol.errors.FieldError` or :class:`protocol.errors.SizeLimitError` naming the field.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from protocol.errors import FieldError, SizeLimitError
from protocol.limits import MAX_VECTOR_LEN

RAW: Final = 0x00
GAPS: Final = 0x01
BITMAP: Final = 0x02

_MAX_VARINT_BYTES: Final = 5  # 35 bits hold any uint32
_UINT32_LIMIT: Final = 1 << 32
#: A bitmap may name indices up to MAX_VECTOR_LEN: no more bytes than that needs.
MAX_BITMAP_BYTES: Final = (MAX_VECTOR_LEN + 7) // 8


def _varints(values: np.ndarray) -> bytes:
    """Unsigned LEB128 of each value (< 2**35), vectorised: 7 bits a byte, low bits first."""
    values = values.astype(np.uint64)
    lengths = np.ones(values.size, dtype=np.int64)
    for bits in (7, 14, 21, 28):
        lengths += values >= (1 << bits)
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for k in range(_MAX_VARINT_BYTES):
        here = lengths > k
        chunk = ((values[here] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        more = (lengths[here] > k + 1).astype(np.uint8) << 7
        out[starts[here] + k] = chunk | more
    return out.tobytes()


def _gaps(idx: np.ndarray) -> np.ndarray:
    values = idx.astype(np.int64)
    if values.size:
        values[1:] = np.diff(values)
    return values


def encode_layouts(idx: np.ndarray) -> bytes:
    """The shortest layout of a checked (sorted, unique, uint32-range) index array."""
    idx = np.asarray(idx)
    raw = bytes([RAW]) + idx.astype("<u4", copy=False).tobytes()
    if idx.size == 0:
        return raw
    candidates = [raw, bytes([GAPS]) + _varints(_gaps(idx))]
    top = int(idx[-1])
    if top < MAX_VECTOR_LEN:
        bits = np.zeros(top + 1, dtype=np.uint8)
        bits[idx.astype(np.int64)] = 1
        candidates.append(bytes([BITMAP]) + np.packbits(bits, bitorder="little").tobytes())
    return min(candidates, key=len)


def _decode_varints(body: np.ndarray, field: str) -> np.ndarray:
    if body.size == 0:
        return np.zeros(0, dtype=np.uint64)
    ends = np.flatnonzero(body < 0x80)
    if ends.size == 0 or ends[-1] != body.size - 1:
        raise FieldError("truncated varint", field)
    if ends.size > MAX_VECTOR_LEN:
        raise SizeLimitError(f"{ends.size} elements exceed MAX_VECTOR_LEN={MAX_VECTOR_LEN}",
                             field)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if int(lengths.max()) > _MAX_VARINT_BYTES:
        raise FieldError("varint longer than 5 bytes", field)
    if np.any((lengths > 1) & (body[ends] == 0)):
        raise FieldError("non-canonical varint (padding byte)", field)
    position = np.arange(body.size) - np.repeat(starts, lengths)
    parts = (body & 0x7F).astype(np.uint64) << (7 * position).astype(np.uint64)
    return np.add.reduceat(parts, starts)


def decode_layouts(buf: bytes | bytearray | memoryview, field: str) -> np.ndarray:
    """Indices as int64 from a tagged layout (not yet checked for order or range)."""
    if len(buf) == 0:
        raise FieldError("empty index array: the layout byte is missing", field)
    layout, body = buf[0], np.frombuffer(buf, dtype=np.uint8, offset=1)
    if layout == RAW:
        if body.size % 4:
            raise FieldError(f"raw indices of {body.size} bytes: not a multiple of 4", field)
        if body.size // 4 > MAX_VECTOR_LEN:
            raise SizeLimitError(
                f"{body.size // 4} elements exceed MAX_VECTOR_LEN={MAX_VECTOR_LEN}", field)
        return np.frombuffer(buf, dtype="<u4", offset=1).astype(np.int64)
    if layout == GAPS:
        gaps = _decode_varints(body, field)
        if gaps.size > 1 and np.any(gaps[1:] == 0):
            raise FieldError("indices must be strictly increasing (a zero gap)", field)
        if gaps.size and int(gaps.max()) >= _UINT32_LIMIT:
            raise FieldError("a gap does not fit in uint32", field)
        total = np.cumsum(gaps.astype(np.int64))
        if total.size and int(total[-1]) >= _UINT32_LIMIT:
            raise FieldError(f"index {int(total[-1])} does not fit in uint32", field)
        return total
    if layout == BITMAP:
        if body.size > MAX_BITMAP_BYTES:
            raise SizeLimitError(f"bitmap of {body.size} bytes exceeds {MAX_BITMAP_BYTES}",
                                 field)
        if body.size and body[-1] == 0:
            raise FieldError("non-canonical bitmap (trailing zero byte)", field)
        return np.flatnonzero(np.unpackbits(body, bitorder="little")).astype(np.int64)
    raise FieldError(f"unknown index layout {layout:#04x}", field)
