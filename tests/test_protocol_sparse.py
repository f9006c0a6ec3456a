"""Index and float32 byte encodings (protocol.sparse)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import FieldError, SizeLimitError
from protocol.limits import MAX_VECTOR_LEN
from protocol.sparse import decode_f32, decode_indices, encode_f32, encode_indices

index_sets = st.sets(st.integers(0, (1 << 32) - 1), max_size=300)
finite_f32 = st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), max_size=300)


@settings(max_examples=150, deadline=None)
@given(index_sets)
def test_indices_round_trip(values: set[int]) -> None:
    idx = np.array(sorted(values), dtype=np.uint64)
    wire = encode_indices(idx)
    assert len(wire) <= 1 + 4 * len(values)  # never longer than raw uint32 plus the tag
    decoded = decode_indices(wire, max_index=None)
    assert decoded.dtype == np.uint32
    assert decoded.tolist() == sorted(values)


@settings(max_examples=150, deadline=None)
@given(finite_f32)
def test_f32_round_trip(values: list[float]) -> None:
    arr = np.array(values, dtype=np.float32)
    decoded = decode_f32(encode_f32(arr), expected_len=len(values))
    assert decoded.dtype == np.float32
    assert np.array_equal(decoded, arr)


def raw(values: list[int]) -> bytes:
    """The raw layout (tag 0x00, little-endian uint32 each)."""
    return b"\x00" + np.array(values, "<u4").tobytes()


def test_wire_is_little_endian_regardless_of_input_byte_order() -> None:
    big = np.array([70000, 3_000_000_000], dtype=">u4")  # raw is the shortest layout here
    assert encode_indices(big) == raw([70000, 3_000_000_000])
    assert encode_f32(np.array([1.0], dtype=">f4")) == b"\x00\x00\x80\x3f"
    assert decode_indices(b"\x00\x00\x01\x00\x00").tolist() == [256]


def test_each_layout_and_the_sender_picks_the_shortest() -> None:
    # gaps: 3, then +67, +69930 as LEB128 (docs/protocol.md section 5.1)
    assert encode_indices(np.array([3, 70, 70000])) == bytes.fromhex("01 03 43 aa a2 04")
    # bitmap: indices 0..15 but 9, little-endian bit order
    dense = np.array([i for i in range(16) if i != 9])
    assert encode_indices(dense) == bytes.fromhex("02 ff fd")
    for wire, expected in [(bytes.fromhex("01 03 43 aa a2 04"), [3, 70, 70000]),
                           (bytes.fromhex("02 ff fd"), dense.tolist()),
                           (raw([5, 6]), [5, 6])]:
        assert decode_indices(wire).tolist() == expected
    rng = np.random.default_rng(0)
    top_k = np.sort(rng.choice(100_000, 1000, replace=False))
    union = np.sort(rng.choice(100_000, 75_000, replace=False))
    assert len(encode_indices(top_k)) < 1.6 * top_k.size  # gaps: ~1.5 bytes per index
    assert len(encode_indices(union)) <= 1 + 100_000 // 8  # bitmap: 1/8 byte per param


def test_decoded_arrays_do_not_alias_the_input() -> None:
    buf = bytearray(raw([1, 2, 3]))
    idx = decode_indices(buf)
    buf[0] = 9
    assert idx.tolist() == [1, 2, 3]
    idx[0] = 0  # writable


def test_empty_arrays() -> None:
    assert encode_indices(np.array([], dtype=np.uint32)) == b""
    assert encode_indices(np.array([])) == b""
    assert decode_indices(b"").size == 0
    assert decode_f32(b"").size == 0


@pytest.mark.parametrize(
    ("data", "max_index", "message"),
    [
        (b"\x00\x01\x00\x00", None, "multiple of 4"),
        (raw([5, 3]), None, "strictly increasing"),
        (raw([3, 3]), None, "strictly increasing"),
        (raw([1, 10]), 10, "out of range"),
        (raw([0]), 0, "out of range"),
        (b"\x01\x05\x00", None, "zero gap"),
        (b"\x01\x05\x80", None, "truncated"),
        (b"\x01\x85\x00", None, "non-canonical"),
        (b"\x01\xff\xff\xff\xff\xff\x01", None, "longer than 5"),
        (b"\x01\xff\xff\xff\xff\x0f\x01", None, "uint32"),
        (b"\x02\x01\x00", None, "trailing zero"),
        (b"\x02\x00\x04", 10, "out of range"),
        (b"\x07\x00", None, "unknown index layout"),
    ],
)
def test_decode_indices_rejects(data: bytes, max_index: int | None, message: str) -> None:
    with pytest.raises(FieldError, match=message) as info:
        decode_indices(data, max_index=max_index, field="accept.indices")
    assert info.value.field == "accept.indices"


def test_decode_indices_max_index_is_exclusive_bound() -> None:
    data = raw([0, 9])
    assert decode_indices(data, max_index=10).tolist() == [0, 9]


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(FieldError):
        decode_indices("abcd")  # type: ignore[arg-type]
    with pytest.raises(FieldError):
        decode_f32([1.0])  # type: ignore[arg-type]


def test_decode_rejects_too_many_elements_before_allocating() -> None:
    data = bytes(4 * (MAX_VECTOR_LEN + 1))
    with pytest.raises(SizeLimitError):
        decode_indices(b"\x00" + data)
    with pytest.raises(SizeLimitError):
        decode_indices(b"\x01" + bytes(MAX_VECTOR_LEN + 1))  # that many one-byte varints
    with pytest.raises(SizeLimitError):
        decode_indices(b"\x02" + bytes(MAX_VECTOR_LEN // 8) + b"\x01\x01")
    with pytest.raises(SizeLimitError):
        decode_f32(data)


@pytest.mark.parametrize(
    "bad",
    [np.float32(np.nan), np.float32(np.inf), np.float32(-np.inf)],
)
def test_decode_f32_rejects_non_finite(bad: np.float32) -> None:
    data = np.array([1.0, bad, 2.0], "<f4").tobytes()
    with pytest.raises(FieldError, match="position 1") as info:
        decode_f32(data, field="values")
    assert info.value.field == "values"


def test_decode_f32_checks_length() -> None:
    with pytest.raises(FieldError, match="multiple of 4"):
        decode_f32(b"\x00" * 6)
    with pytest.raises(FieldError, match="expected 3 values"):
        decode_f32(np.zeros(2, "<f4").tobytes(), expected_len=3)


@pytest.mark.parametrize(
    "idx",
    [
        np.array([-1, 2]),
        np.array([1 << 32], dtype=np.int64),
        np.array([2, 1]),
        np.array([1, 1]),
        np.array([0.0, 1.0]),
        np.array([[1, 2]]),
        np.array(["a"]),
    ],
)
def test_encode_indices_rejects(idx: np.ndarray) -> None:
    with pytest.raises(FieldError):
        encode_indices(idx)


@pytest.mark.parametrize(
    "values",
    [
        np.array([np.nan]),
        np.array([np.inf]),
        np.array([1e39]),  # finite float64 that overflows float32
        np.array([[1.0]]),
        np.array(["x"]),
    ],
)
def test_encode_f32_rejects(values: np.ndarray) -> None:
    with pytest.raises(FieldError):
        encode_f32(values)
