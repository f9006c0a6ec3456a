"""Byte encodings of sparse vectors: index arrays and float32 value arrays.

Index arrays are sorted, strictly increasing (hence unique) unsigned 32-bit integers, stored
in the shortest of three tagged layouts (raw uint32, LEB128 gaps, bitmap: protocol/index_codec.py
and docs/protocol.md section 5.1); an empty array is zero bytes. Value arrays are finite
IEEE-754 float32 stored as raw little-endian bytes.

Security property: the decoders never trust the bytes. They check the length is a multiple of
the element size, the count against :data:`protocol.limits.MAX_VECTOR_LEN` (before any
allocation), ordering, uniqueness, the caller's index bound and finiteness, and raise
:class:`protocol.errors.FieldError` / :class:`protocol.errors.SizeLimitError` naming the field.
Decoded arrays are fresh, writable, native-endian copies that do not alias the input buffer.
"""

from __future__ import annotations

import numpy as np

from protocol.errors import FieldError, SizeLimitError
from protocol.index_codec import decode_layouts, encode_layouts
from protocol.limits import MAX_VECTOR_LEN

INDEX_BYTES = 4
F32_BYTES = 4
_INDEX_WIRE_DTYPE = np.dtype("<u4")
_F32_WIRE_DTYPE = np.dtype("<f4")
_UINT32_LIMIT = 1 << 32


def _as_buffer(data: object, field: str) -> bytes | bytearray | memoryview:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise FieldError(f"expected bytes, got {type(data).__name__}", field)
    return data


def _check_count(byte_len: int, element_bytes: int, field: str) -> int:
    if byte_len % element_bytes:
        raise FieldError(f"length {byte_len} is not a multiple of {element_bytes} bytes", field)
    count = byte_len // element_bytes
    if count > MAX_VECTOR_LEN:
        raise SizeLimitError(f"{count} elements exceed MAX_VECTOR_LEN={MAX_VECTOR_LEN}", field)
    return count


def check_indices(idx: np.ndarray, *, max_index: int | None = None, field: str = "indices") -> None:
    """Raise FieldError unless ``idx`` is a 1-D strictly increasing array of valid indices.

    Every index must be ``>= 0``, ``< 2**32`` and, if ``max_index`` is given, ``< max_index``
    (``max_index`` is an *exclusive* bound: pass the vector length / parameter count).
    """
    if idx.ndim != 1:
        raise FieldError(f"expected a 1-D array, got shape {idx.shape}", field)
    if idx.size > MAX_VECTOR_LEN:
        raise SizeLimitError(f"{idx.size} elements exceed MAX_VECTOR_LEN={MAX_VECTOR_LEN}", field)
    if idx.size == 0:
        return
    first, last = int(idx[0]), int(idx[-1])
    # Strictly increasing means idx[0] is the minimum and idx[-1] the maximum, so the range
    # checks only need the two ends once ordering is established.
    if idx.size > 1 and not bool(np.all(idx[1:] > idx[:-1])):
        bad = int(np.flatnonzero(idx[1:] <= idx[:-1])[0]) + 1
        raise FieldError(f"indices must be strictly increasing (position {bad})", field)
    if first < 0:
        raise FieldError(f"negative index {first}", field)
    if last >= _UINT32_LIMIT:
        raise FieldError(f"index {last} does not fit in uint32", field)
    if max_index is not None and last >= max_index:
        raise FieldError(f"index {last} out of range (must be < {max_index})", field)


def encode_indices(idx: np.ndarray) -> bytes:
    """Encode a sorted, unique index array as raw little-endian uint32 bytes.

    Any integer dtype is accepted; values are range-checked before the cast so nothing wraps.
    Raises FieldError for non-integer arrays, unsorted / duplicate / out-of-range indices.
    """
    arr = np.asarray(idx)
    if arr.dtype.kind not in "iu" and not (arr.size == 0 and arr.dtype.kind == "f"):
        raise FieldError(f"expected an integer array, got dtype {arr.dtype}", "indices")
    check_indices(arr)
    if arr.size == 0:
        return b""
    return encode_layouts(arr)


def decode_indices(b: bytes, *, max_index: int | None = None, field: str = "indices") -> np.ndarray:
    """Decode a tagged index array (or zero bytes: empty) into a sorted unique ``np.uint32``
    array.

    ``max_index`` is an exclusive upper bound (pass the parameter count); ``None`` checks only
    the uint32 range. Raises FieldError / SizeLimitError naming ``field``; nothing else.
    """
    buf = _as_buffer(b, field)
    if len(buf) == 0:
        return np.zeros(0, dtype=np.uint32)
    idx = decode_layouts(buf, field)
    check_indices(idx, max_index=max_index, field=field)
    return idx.astype(np.uint32)


def encode_f32(values: np.ndarray) -> bytes:
    """Encode a 1-D array of finite values as raw little-endian float32 bytes.

    Raises FieldError for non-finite values, values that overflow float32, or non-1-D input.
    """
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise FieldError(f"expected a 1-D array, got shape {arr.shape}", "values")
    if arr.dtype.kind not in "iuf":
        raise FieldError(f"expected a numeric array, got dtype {arr.dtype}", "values")
    if arr.size > MAX_VECTOR_LEN:
        raise SizeLimitError(
            f"{arr.size} elements exceed MAX_VECTOR_LEN={MAX_VECTOR_LEN}", "values"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        wire = arr.astype(_F32_WIRE_DTYPE)
    if not bool(np.all(np.isfinite(wire))):
        raise FieldError("values must be finite float32 (no NaN, no Inf, no overflow)", "values")
    return wire.tobytes()


def decode_f32(b: bytes, *, expected_len: int | None = None, field: str = "values") -> np.ndarray:
    """Decode raw little-endian float32 bytes into a finite ``np.float32`` array.

    ``expected_len`` (if given) is the exact element count required, e.g. the length of the
    matching index array. Raises FieldError / SizeLimitError naming ``field``; nothing else.
    """
    buf = _as_buffer(b, field)
    count = _check_count(len(buf), F32_BYTES, field)
    if expected_len is not None and count != expected_len:
        raise FieldError(f"expected {expected_len} values, got {count}", field)
    values = np.frombuffer(buf, dtype=_F32_WIRE_DTYPE).astype(np.float32)
    if not bool(np.all(np.isfinite(values))):
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise FieldError(f"non-finite value at position {bad}", field)
    return values
