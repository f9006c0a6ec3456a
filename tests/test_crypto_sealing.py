"""Sealing: confidentiality/integrity via Box, and binding to the full context."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.errors import SealError
from crypto.field import field_from_bytes, field_to_bytes, field_view
from crypto.identity import Identity
from crypto.sealing import SEAL_OVERHEAD, SealContext, open_sealed, seal

ALICE = Identity.generate("alice")
BOB = Identity.generate("bob")
CAROL = Identity.generate("carol")
SESSION = os.urandom(16)
CONTEXT = SealContext("lab", SESSION, "alice", "bob", 12345)


def test_round_trip_and_overhead() -> None:
    sealed = seal(ALICE, BOB.public.box_key, CONTEXT, b"share bytes")
    assert len(sealed) == len(b"share bytes") + SEAL_OVERHEAD
    assert b"share bytes" not in sealed
    assert open_sealed(BOB, ALICE.public.box_key, CONTEXT, sealed) == b"share bytes"


def test_empty_plaintext_and_buffer_input() -> None:
    assert open_sealed(BOB, ALICE.public.box_key, CONTEXT,
                       seal(ALICE, BOB.public.box_key, CONTEXT, b"")) == b""
    values = np.arange(1000, dtype=np.uint32)
    sealed = seal(ALICE, BOB.public.box_key, CONTEXT, field_view(values))
    opened = open_sealed(BOB, ALICE.public.box_key, CONTEXT, sealed)
    assert opened == field_to_bytes(values)
    np.testing.assert_array_equal(field_from_bytes(opened), values)


def test_nonces_are_fresh() -> None:
    first = seal(ALICE, BOB.public.box_key, CONTEXT, b"same")
    second = seal(ALICE, BOB.public.box_key, CONTEXT, b"same")
    assert first[:24] != second[:24] and first != second


@settings(max_examples=150, deadline=None)
@given(
    plaintext=st.binary(max_size=300),
    position=st.integers(0, 10_000),
    flip=st.integers(1, 255),
)
def test_any_tampered_byte_is_detected(plaintext: bytes, position: int, flip: int) -> None:
    sealed = bytearray(seal(ALICE, BOB.public.box_key, CONTEXT, plaintext))
    sealed[position % len(sealed)] ^= flip
    with pytest.raises(SealError):
        open_sealed(BOB, ALICE.public.box_key, CONTEXT, bytes(sealed))


def test_truncated_or_extended_is_detected() -> None:
    sealed = seal(ALICE, BOB.public.box_key, CONTEXT, b"payload")
    for bad in (sealed[:-1], sealed + b"\x00", sealed[:10], b""):
        with pytest.raises(SealError):
            open_sealed(BOB, ALICE.public.box_key, CONTEXT, bad)


@pytest.mark.parametrize(
    "change",
    [
        {"session_id": os.urandom(16)},
        {"seq": 12346},
        {"network_id": "other"},
        {"sender": "carol"},
    ],
)
def test_wrong_context_is_rejected(change: dict) -> None:
    sealed = seal(ALICE, BOB.public.box_key, CONTEXT, b"payload")
    with pytest.raises(SealError, match="different context"):
        open_sealed(BOB, ALICE.public.box_key, dataclasses.replace(CONTEXT, **change), sealed)


def test_redirected_to_another_recipient_is_rejected() -> None:
    sealed = seal(ALICE, BOB.public.box_key, CONTEXT, b"payload")
    carol_context = dataclasses.replace(CONTEXT, recipient="carol")
    # carol cannot open a box made for bob's key
    with pytest.raises(SealError):
        open_sealed(CAROL, ALICE.public.box_key, carol_context, sealed)
    # bob refuses to use a context naming someone else as recipient
    with pytest.raises(SealError, match="recipient"):
        open_sealed(BOB, ALICE.public.box_key, carol_context, sealed)


def test_reflection_back_to_the_sender_is_rejected() -> None:
    """Box's shared key is the same both ways; the bound sender/recipient names stop reflection."""
    from_bob = SealContext("lab", SESSION, "bob", "alice", 7)
    sealed = seal(BOB, ALICE.public.box_key, from_bob, b"payload")
    as_if_from_alice = SealContext("lab", SESSION, "alice", "bob", 7)
    with pytest.raises(SealError, match="different context"):
        open_sealed(BOB, ALICE.public.box_key, as_if_from_alice, sealed)


def test_wrong_sender_key_is_rejected() -> None:
    sealed = seal(ALICE, BOB.public.box_key, CONTEXT, b"payload")
    with pytest.raises(SealError):
        open_sealed(BOB, CAROL.public.box_key, CONTEXT, sealed)


def test_bad_keys_raise_seal_error() -> None:
    sealed = seal(ALICE, BOB.public.box_key, CONTEXT, b"payload")
    with pytest.raises(SealError, match="32 bytes"):
        open_sealed(BOB, b"short", CONTEXT, sealed)
    with pytest.raises(SealError):
        open_sealed(BOB, bytes(32), CONTEXT, sealed)  # low-order point
    with pytest.raises(SealError):
        seal(ALICE, b"\x01" * 31, CONTEXT, b"x")


def test_seal_requires_matching_sender() -> None:
    with pytest.raises(ValueError, match="sender"):
        seal(CAROL, BOB.public.box_key, CONTEXT, b"x")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"session_id": b"short"},
        {"seq": -1},
        {"seq": 2**63},
        {"seq": True},
        {"sender": "Bad Name"},
        {"network_id": ""},
    ],
)
def test_context_validation(kwargs: dict) -> None:
    fields = {"network_id": "lab", "session_id": SESSION, "sender": "alice",
              "recipient": "bob", "seq": 1, **kwargs}
    with pytest.raises(ValueError):
        SealContext(**fields)


def test_canonical_encoding_is_unambiguous() -> None:
    # names are length-prefixed, so shifting a character between fields changes the encoding
    a = SealContext("ab", SESSION, "c", "d", 1)
    b = SealContext("a", SESSION, "bc", "d", 1)
    assert a.canonical() != b.canonical() and a.digest() != b.digest()
