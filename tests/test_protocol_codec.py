"""Round trips, validation rules and tamper detection for protocol.codec."""

from __future__ import annotations

import os
from collections.abc import Callable

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey

from protocol import (
    PROTOCOL_VERSION,
    Abort,
    Accept,
    Announce,
    Confirm,
    Decline,
    DecodeError,
    FieldError,
    Header,
    Invite,
    Keys,
    Kind,
    Leave,
    Masked,
    MaskedAccept,
    MaskedStart,
    Partial,
    ProtocolError,
    Reveal,
    SequenceCounter,
    Share,
    SignedMessage,
    SizeLimitError,
    Start,
    Survivors,
    UnknownKindError,
    VersionError,
    check_survivor_list,
    decode_message,
    encode_message,
)
from protocol.fields import chunk_span
from protocol.inference import (
    Answer,
    Query,
    Serve,
    ServedModel,
    SnapshotDescription,
    SnapshotShare,
    encode_description,
    snapshot_share_bytes,
)
from protocol.limits import (
    MAX_CERTIFICATE_BYTES,
    MAX_MEMBERS,
    MAX_MODEL_ID_LEN,
    MAX_PAYLOAD_BYTES,
    MAX_SEALED_REVEAL_BYTES,
    MAX_STR,
    MIN_CHUNK_DATA_BYTES,
    MIN_SEALED_BYTES,
    MIN_SEALED_MASKED_BYTES,
    MIN_SEALED_REVEAL_BYTES,
    REVEAL_ENTRY_BYTES,
    SEAL_OVERHEAD_BYTES,
    SEALED_KEYS_BYTES,
    SEALED_SESSION_KEY_BYTES,
)
from protocol.messages import Chunk

SIGNING_KEY = SigningKey.generate()
VERIFY_KEY = SIGNING_KEY.verify_key


def sign(data: bytes) -> bytes:
    return SIGNING_KEY.sign(data).signature


SESSION = bytes(range(16))

# --------------------------------------------------------------------------------------------
# hypothesis strategies

ids = st.from_regex(r"\A[a-z0-9][a-z0-9_-]{0,63}\Z")
texts = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=0, max_size=MAX_STR
)
model_ids = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=MAX_MODEL_ID_LEN
)
param_counts = st.integers(1, 1 << 32)
index_arrays = st.sets(st.integers(0, (1 << 32) - 1), max_size=200).map(
    lambda s: np.array(sorted(s), dtype=np.uint32)
)
sealed_blobs = st.binary(min_size=MIN_SEALED_BYTES, max_size=600)
ephemeral_keys = st.binary(min_size=32, max_size=32)
masked_blobs = st.integers(2, 150).flatmap(
    lambda n: st.binary(min_size=SEAL_OVERHEAD_BYTES + 4 * n, max_size=SEAL_OVERHEAD_BYTES + 4 * n)
)
reveal_blobs = st.integers(3, MAX_MEMBERS).flatmap(
    lambda n: st.binary(
        min_size=SEAL_OVERHEAD_BYTES + REVEAL_ENTRY_BYTES * n,
        max_size=SEAL_OVERHEAD_BYTES + REVEAL_ENTRY_BYTES * n,
    )
)
survivor_lists = st.lists(ids, min_size=2, max_size=MAX_MEMBERS, unique=True).map(tuple)


@st.composite
def members_for(draw: st.DrawFn, sender: str) -> tuple[str, ...]:
    others = draw(
        st.lists(
            ids.filter(lambda x: x != sender), min_size=2, max_size=MAX_MEMBERS - 1, unique=True
        )
    )
    return (sender, *others)


@st.composite
def invites(draw: st.DrawFn) -> Invite:
    group_size = draw(st.integers(3, MAX_MEMBERS))
    return Invite(
        group_size=group_size,
        threshold=draw(st.integers(2, group_size)),
        model_id=draw(model_ids),
        param_count=draw(param_counts),
        frac_bits=draw(st.integers(0, 60)),
    )


@st.composite
def messages(draw: st.DrawFn, kind: Kind) -> tuple[Header, object]:
    sender = draw(ids)
    session = (
        b"" if kind in (Kind.ANNOUNCE, Kind.LEAVE) else draw(st.binary(min_size=16, max_size=16))
    )
    header = Header(
        version=PROTOCOL_VERSION,
        network=draw(ids),
        kind=kind,
        sender=sender,
        session=session,
        seq=draw(st.integers(0, (1 << 63) - 1)),
    )
    if kind is Kind.ANNOUNCE:
        body: object = Announce(
            certificate=draw(st.binary(min_size=1, max_size=MAX_CERTIFICATE_BYTES)),
            model_id=draw(model_ids),
            param_count=draw(param_counts),
            connection=draw(st.binary(min_size=16, max_size=16)),
        )
    elif kind is Kind.LEAVE:
        body = Leave(reason=draw(texts), connection=draw(st.binary(min_size=16, max_size=16)))
    elif kind is Kind.INVITE:
        body = draw(invites())
    elif kind is Kind.ACCEPT:
        body = Accept(indices=draw(index_arrays))
    elif kind is Kind.DECLINE:
        body = Decline(reason=draw(texts))
    elif kind is Kind.START:
        members = draw(members_for(sender))
        body = Start(
            members=members,
            threshold=draw(st.integers(2, len(members))),
            coordinates=draw(index_arrays.filter(lambda a: a.size > 0)),
        )
    elif kind is Kind.SHARE:
        body = Share(recipient=draw(ids), sealed=draw(sealed_blobs))
    elif kind is Kind.PARTIAL:
        body = Partial(
            recipient=draw(ids),
            contributors=tuple(draw(st.lists(ids, min_size=1, max_size=MAX_MEMBERS, unique=True))),
            sealed=draw(sealed_blobs),
        )
    elif kind is Kind.ABORT:
        body = Abort(reason=draw(texts))
    elif kind is Kind.CHUNK:
        body = draw(chunks())
    elif kind in INFERENCE_KINDS:
        body = draw(inference_bodies(kind, sender))
    else:
        body = draw(masked_bodies(kind, sender))
    return header, body


INFERENCE_KINDS = (Kind.SNAPSHOT_SHARE, Kind.SERVE, Kind.QUERY, Kind.ANSWER)


@st.composite
def inference_bodies(draw: st.DrawFn, kind: Kind, sender: str) -> object:
    """A valid body of one of the private-prediction kinds (18-21)."""
    if kind in (Kind.QUERY, Kind.ANSWER):
        rows = draw(st.integers(1, 8))
        width = draw(st.integers(1, 40))
        sealed = draw(st.binary(min_size=72 + 4 * rows * width, max_size=72 + 4 * rows * width))
        counter = draw(st.integers(0, (1 << 63) - 1))
        if kind is Kind.ANSWER:
            return Answer(recipient=draw(ids), counter=counter, rows=rows, sealed=sealed)
        return Query(recipient=draw(ids), certificate=draw(st.binary(min_size=1, max_size=300)),
                     counter=counter, rows=rows, sealed=sealed)
    threshold = draw(st.integers(2, 4))
    others = draw(st.lists(ids.filter(lambda x: x != sender), min_size=2 * threshold - 2,
                           max_size=MAX_MEMBERS - 1, unique=True))
    classes, features = draw(st.integers(2, 12)), draw(st.integers(1, 30))
    model = ServedModel(
        servers=(sender, *others), threshold=threshold, classes=classes, features=features,
        frac_w=draw(st.integers(0, 20)), frac_x=draw(st.integers(0, 20)),
        feature_norm_bound=draw(st.integers(1, 2**30 - 1)),
        max_rows_per_client=draw(st.integers(0, 10**6)),
        content_hash=draw(st.binary(min_size=32, max_size=32)))
    owner = sender if kind is Kind.SNAPSHOT_SHARE else draw(ids)
    description = encode_description(SnapshotDescription(
        draw(ids), owner, draw(st.binary(min_size=16, max_size=16)),
        draw(st.integers(0, (1 << 63) - 1)), model))
    signature = draw(st.binary(min_size=64, max_size=64))
    if kind is Kind.SERVE:
        return Serve(certificate=draw(st.binary(min_size=1, max_size=300)),
                     owner_certificate=b"owner-cert", description=description,
                     owner_signature=signature)
    size = snapshot_share_bytes(classes, features)
    return SnapshotShare(recipient=draw(st.sampled_from(others)), certificate=b"cert",
                         description=description, owner_signature=signature,
                         sealed=draw(st.binary(min_size=size, max_size=size)))


@st.composite
def chunks(draw: st.DrawFn) -> Chunk:
    """A valid CHUNK body (protocol/chunks.py): an even split of total_bytes."""
    total = draw(st.integers(MIN_CHUNK_DATA_BYTES + 1, 3 * MIN_CHUNK_DATA_BYTES))
    count = draw(st.integers(2, -(-total // MIN_CHUNK_DATA_BYTES)))
    index = draw(st.integers(0, count - 1))
    start, end = chunk_span(index, count, total)
    fill = draw(st.binary(min_size=1, max_size=8))
    return Chunk(draw(st.binary(min_size=32, max_size=32)), index, count, total,
                 (fill * (end - start))[: end - start])


@st.composite
def masked_bodies(draw: st.DrawFn, kind: Kind, sender: str) -> object:
    """A valid body of one of the masked-session kinds (10-16)."""
    if kind is Kind.MASKED_ACCEPT:
        return MaskedAccept(indices=draw(index_arrays), ephemeral_public=draw(ephemeral_keys))
    if kind is Kind.MASKED_START:
        members = draw(members_for(sender))
        publics = draw(
            st.lists(ephemeral_keys, min_size=len(members), max_size=len(members), unique=True)
        )
        return MaskedStart(
            members=members,
            threshold=draw(st.integers(2, len(members))),
            coordinates=draw(index_arrays.filter(lambda a: a.size > 0)),
            ephemeral_publics=tuple(publics),
            recipient=draw(st.sampled_from(members[1:])),
            session_key=draw(st.binary(min_size=104, max_size=104)),
        )
    if kind is Kind.KEYS:
        return Keys(
            recipient=draw(ids.filter(lambda x: x != sender)),
            sealed=draw(st.binary(min_size=232, max_size=232)),
        )
    if kind is Kind.MASKED:
        return Masked(sealed=draw(masked_blobs))
    if kind is Kind.SURVIVORS:
        return Survivors(survivors=draw(survivor_lists))
    if kind is Kind.CONFIRM:
        return Confirm(survivors=draw(survivor_lists))
    assert kind is Kind.REVEAL
    return Reveal(sealed=draw(reveal_blobs))


# --------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("kind", list(Kind), ids=[k.name for k in Kind])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_round_trip_every_kind(kind: Kind, data: st.DataObject) -> None:
    header, body = data.draw(messages(kind))
    wire = encode_message(header, body, sign)
    decoded = decode_message(wire)
    assert decoded.header == header
    assert decoded.body == body
    assert type(decoded.body) is type(body)
    # The receiver verifies over the bytes exactly as received.
    VERIFY_KEY.verify(decoded.signed_bytes, decoded.signature)
    # Decoding is deterministic and re-encoding reproduces the same wire bytes.
    assert encode_message(decoded.header, decoded.body, sign) == wire


def test_decoded_arrays_are_uint32_and_writable() -> None:
    header = Header(PROTOCOL_VERSION, "net", Kind.ACCEPT, "bob", SESSION, 1)
    msg = decode_message(encode_message(header, Accept(np.array([1, 5, 9])), sign))
    assert isinstance(msg.body, Accept)
    assert msg.body.indices.dtype == np.uint32
    msg.body.indices[0] = 2  # a private copy, not a view of the received buffer
    assert msg.body.indices.tolist() == [2, 5, 9]


def test_decode_accepts_bytearray_and_memoryview() -> None:
    header = Header(PROTOCOL_VERSION, "net", Kind.ABORT, "bob", SESSION, 1)
    wire = encode_message(header, Abort("timeout"), sign)
    assert decode_message(bytearray(wire)).body == Abort("timeout")
    assert decode_message(memoryview(wire)).body == Abort("timeout")


def test_sequence_counter_is_strictly_increasing_from_clock() -> None:
    import time

    before = time.time_ns() // 1000
    counter = SequenceCounter()
    values = [counter.next() for _ in range(100)]
    assert values[0] >= before
    assert values == list(range(values[0], values[0] + 100))
    with pytest.raises(ValueError):
        SequenceCounter(start=1 << 63)


# --------------------------------------------------------------------------------------------
# validation rules: raw wire builder that bypasses encode-side validation

V = PROTOCOL_VERSION
U4 = "<u4"

def raw_idx(values: list[int]) -> bytes:
    """An index array in the raw layout (docs/protocol.md section 5.1): tag 00, then uint32s."""
    return b"\x00" + np.array(values, U4).tobytes()


VALID_SIGNED: dict[Kind, list[object]] = {
    Kind.ANNOUNCE: [V, "net", 1, "alice", b"", 7, [b"certificate", "mlp-v1", 1000, bytes(16)]],
    Kind.LEAVE: [V, "net", 2, "alice", b"", 7, ["shutdown", bytes(16)]],
    Kind.INVITE: [V, "net", 3, "alice", SESSION, 7, [5, 3, "mlp-v1", 1000, 16]],
    Kind.ACCEPT: [V, "net", 4, "bob", SESSION, 7, [raw_idx([1, 2])]],
    Kind.DECLINE: [V, "net", 5, "bob", SESSION, 7, ["busy"]],
    Kind.START: [
        PROTOCOL_VERSION,
        "net",
        6,
        "alice",
        SESSION,
        7,
        [["alice", "bob", "carol"], 2, raw_idx([1, 2, 3])],
    ],
    Kind.SHARE: [V, "net", 7, "alice", SESSION, 7, ["bob", b"s" * 40]],
    Kind.PARTIAL: [V, "net", 8, "bob", SESSION, 7, ["alice", ["alice", "bob"], b"p" * 40]],
    Kind.ABORT: [V, "net", 9, "alice", SESSION, 7, ["timeout"]],
    Kind.MASKED_ACCEPT: [
        V, "net", 10, "bob", SESSION, 7, [raw_idx([1, 2]), b"e" * 32]
    ],
    Kind.MASKED_START: [
        V, "net", 11, "alice", SESSION, 7,
        [
            ["alice", "bob", "carol"], 2, raw_idx([1, 2, 3]),
            [b"a" * 32, b"b" * 32, b"c" * 32], "bob", b"k" * SEALED_SESSION_KEY_BYTES,
        ],
    ],
    Kind.KEYS: [V, "net", 12, "alice", SESSION, 7, ["bob", b"k" * SEALED_KEYS_BYTES]],
    Kind.MASKED: [V, "net", 13, "alice", SESSION, 7, [b"m" * MIN_SEALED_MASKED_BYTES]],
    Kind.SURVIVORS: [V, "net", 14, "alice", SESSION, 7, [["alice", "bob"]]],
    Kind.CONFIRM: [V, "net", 15, "bob", SESSION, 7, [["alice", "bob"]]],
    Kind.REVEAL: [V, "net", 16, "bob", SESSION, 7, [b"r" * MIN_SEALED_REVEAL_BYTES]],
    Kind.CHUNK: [V, "net", 17, "bob", SESSION, 7, [b"d" * 32, 1, 2, 20_001, b"c" * 10_000]],
}  # fmt: skip


def raw_wire(signed: object, signature: object = None) -> bytes:
    signed_bytes = msgpack.packb(signed, use_bin_type=True)
    if signature is None:
        signature = sign(signed_bytes)
    return msgpack.packb([signed_bytes, signature], use_bin_type=True)


def mutated(kind: Kind, position: int, value: object, body_field: int | None = None) -> bytes:
    signed = [list(x) if isinstance(x, list) else x for x in VALID_SIGNED[kind]]
    if body_field is None:
        signed[position] = value
    else:
        body = list(signed[6])  # type: ignore[arg-type]
        body[body_field] = value
        signed[6] = body
    return raw_wire(signed)


def test_valid_raw_examples_decode() -> None:
    for kind, signed in VALID_SIGNED.items():
        msg = decode_message(raw_wire(signed))
        assert isinstance(msg, SignedMessage)
        assert msg.header.kind is kind


ANN, INV, ACC, STA, SHA, PAR = (
    Kind.ANNOUNCE,
    Kind.INVITE,
    Kind.ACCEPT,
    Kind.START,
    Kind.SHARE,
    Kind.PARTIAL,
)

# (case id, kind, header position, value, body field index or None, error type, field)
HEADER_CASES = [
    ("version-str", INV, 0, "1", None, FieldError, "header.version"),
    ("version-bool", INV, 0, True, None, FieldError, "header.version"),
    ("version-1", INV, 0, 1, None, VersionError, "header.version"),
    ("version-2", INV, 0, 2, None, VersionError, "header.version"),
    ("version-4", INV, 0, 4, None, VersionError, "header.version"),
    ("network-upper", INV, 1, "Net", None, FieldError, "header.network"),
    ("network-empty", INV, 1, "", None, FieldError, "header.network"),
    ("network-long", INV, 1, "n" * 65, None, FieldError, "header.network"),
    ("network-slash", INV, 1, "a/b", None, FieldError, "header.network"),
    ("network-newline", INV, 1, "net\n", None, FieldError, "header.network"),
    ("network-bin", INV, 1, b"net", None, FieldError, "header.network"),
    ("kind-zero", INV, 2, 0, None, UnknownKindError, "header.kind"),
    ("kind-twenty-two", INV, 2, 22, None, UnknownKindError, "header.kind"),
    ("kind-2^32", INV, 2, 1 << 32, None, UnknownKindError, "header.kind"),
    ("kind-bool", INV, 2, True, None, FieldError, "header.kind"),
    ("kind-str", INV, 2, "3", None, FieldError, "header.kind"),
    ("sender-dash-first", INV, 3, "-alice", None, FieldError, "header.sender"),
    ("sender-wildcard", INV, 3, "+", None, FieldError, "header.sender"),
    ("session-short", INV, 4, b"x" * 15, None, FieldError, "header.session"),
    ("session-long", INV, 4, b"x" * 17, None, SizeLimitError, "header.session"),
    ("session-empty", INV, 4, b"", None, FieldError, "header.session"),
    ("session-str", INV, 4, "x" * 16, None, FieldError, "header.session"),
    ("session-on-announce", ANN, 4, SESSION, None, SizeLimitError, "header.session"),
    ("seq-negative", INV, 5, -1, None, FieldError, "header.seq"),
    ("seq-2^63", INV, 5, 1 << 63, None, FieldError, "header.seq"),
    ("seq-bool", INV, 5, False, None, FieldError, "header.seq"),
    ("seq-float", INV, 5, 7.0, None, FieldError, "header.seq"),
    ("body-not-array", INV, 6, 5, None, FieldError, "invite"),
    ("body-too-few", INV, 6, [5, 3, "m", 10], None, FieldError, "invite"),
    ("body-too-many", INV, 6, [5, 3, "m", 10, 16, 0], None, FieldError, "invite"),
]

BODY_CASES = [
    ("cert-empty", ANN, 6, b"", 0, FieldError, "announce.certificate"),
    ("cert-str", ANN, 6, "cert", 0, FieldError, "announce.certificate"),
    (
        "cert-huge",
        ANN,
        6,
        b"c" * (MAX_CERTIFICATE_BYTES + 1),
        0,
        SizeLimitError,
        "announce.certificate",
    ),
    ("model-empty", ANN, 6, "", 1, FieldError, "announce.model_id"),
    ("model-control", ANN, 6, "mlp\x1b[2J", 1, FieldError, "announce.model_id"),
    ("model-long", ANN, 6, "m" * (MAX_MODEL_ID_LEN + 1), 1, FieldError, "announce.model_id"),
    ("params-zero", ANN, 6, 0, 2, FieldError, "announce.param_count"),
    ("params-2^32+1", ANN, 6, (1 << 32) + 1, 2, FieldError, "announce.param_count"),
    ("params-bool", ANN, 6, True, 2, FieldError, "announce.param_count"),
    ("group-2", INV, 6, 2, 0, FieldError, "invite.group_size"),
    ("group-17", INV, 6, MAX_MEMBERS + 1, 0, FieldError, "invite.group_size"),
    ("threshold-1", INV, 6, 1, 1, FieldError, "invite.threshold"),
    ("threshold-above-group", INV, 6, 6, 1, FieldError, "invite.threshold"),
    ("frac-negative", INV, 6, -1, 4, FieldError, "invite.frac_bits"),
    ("frac-61", INV, 6, 61, 4, FieldError, "invite.frac_bits"),
    ("indices-odd-length", ACC, 6, b"\x01\x00\x00\x00\x02", 0, FieldError, "accept.indices"),
    ("indices-unsorted", ACC, 6, raw_idx([2, 1]), 0, FieldError, "accept.indices"),
    ("indices-dup", ACC, 6, raw_idx([2, 2]), 0, FieldError, "accept.indices"),
    ("indices-array", ACC, 6, [1, 2], 0, FieldError, "accept.indices"),
    ("members-two", STA, 6, ["alice", "bob"], 0, FieldError, "start.members"),
    (
        "members-17",
        STA,
        6,
        ["alice"] + [f"p{i}" for i in range(MAX_MEMBERS)],
        0,
        FieldError,
        "start.members",
    ),
    ("members-dup", STA, 6, ["alice", "bob", "bob"], 0, FieldError, "start.members"),
    ("members-bad-id", STA, 6, ["alice", "bob", "Carol"], 0, FieldError, "start.members[2]"),
    ("members-int", STA, 6, ["alice", "bob", 3], 0, FieldError, "start.members[2]"),
    ("members-not-sender-first", STA, 6, ["bob", "alice", "carol"], 0, FieldError, "start.members"),
    ("members-bin", STA, 6, b"alice", 0, FieldError, "start.members"),
    ("start-threshold-4", STA, 6, 4, 1, FieldError, "start.threshold"),
    ("start-threshold-1", STA, 6, 1, 1, FieldError, "start.threshold"),
    ("coordinates-empty", STA, 6, b"", 2, FieldError, "start.coordinates"),
    ("coordinates-dup", STA, 6, raw_idx([3, 3]), 2, FieldError, "start.coordinates"),
    ("share-recipient", SHA, 6, "Bob", 0, FieldError, "share.recipient"),
    ("share-sealed-short", SHA, 6, b"s" * (MIN_SEALED_BYTES - 1), 1, FieldError, "share.sealed"),
    ("share-sealed-str", SHA, 6, "s" * 40, 1, FieldError, "share.sealed"),
    ("partial-recipient", PAR, 6, None, 0, FieldError, "partial.recipient"),
    ("contributors-empty", PAR, 6, [], 1, FieldError, "partial.contributors"),
    ("contributors-dup", PAR, 6, ["bob", "bob"], 1, FieldError, "partial.contributors"),
    ("contributors-bad", PAR, 6, ["bob", ""], 1, FieldError, "partial.contributors[1]"),
    (
        "contributors-17",
        PAR,
        6,
        [f"p{i}" for i in range(MAX_MEMBERS + 1)],
        1,
        FieldError,
        "partial.contributors",
    ),
    ("partial-sealed-short", PAR, 6, b"", 2, FieldError, "partial.sealed"),
    ("abort-long", Kind.ABORT, 6, "r" * (MAX_STR + 1), 0, FieldError, "abort.reason"),
    ("abort-newline", Kind.ABORT, 6, "fine\nFAKE LOG LINE", 0, FieldError, "abort.reason"),
    ("abort-int", Kind.ABORT, 6, 3, 0, FieldError, "abort.reason"),
    ("decline-del", Kind.DECLINE, 6, "busy\x7f", 0, FieldError, "decline.reason"),
    ("leave-bin", Kind.LEAVE, 6, b"bye", 0, FieldError, "leave.reason"),
]

MAC, MST, KEY, MSK, SUR, CON, REV = (
    Kind.MASKED_ACCEPT,
    Kind.MASKED_START,
    Kind.KEYS,
    Kind.MASKED,
    Kind.SURVIVORS,
    Kind.CONFIRM,
    Kind.REVEAL,
)
KEYS3 = [b"a" * 32, b"b" * 32, b"c" * 32]

# One case per rule of the masked-session bodies (docs/protocol.md section 4, kinds 10-16).
MASKED_CASES = [
    ("masked-session-empty", MSK, 4, b"", None, FieldError, "header.session"),
    ("macc-indices-unsorted", MAC, 6, raw_idx([2, 1]), 0, FieldError,
     "masked_accept.indices"),
    ("macc-key-31", MAC, 6, b"e" * 31, 1, FieldError, "masked_accept.ephemeral_public"),
    ("macc-key-33", MAC, 6, b"e" * 33, 1, SizeLimitError, "masked_accept.ephemeral_public"),
    ("macc-key-str", MAC, 6, "e" * 32, 1, FieldError, "masked_accept.ephemeral_public"),
    ("mstart-members-two", MST, 6, ["alice", "bob"], 0, FieldError, "masked_start.members"),
    ("mstart-members-dup", MST, 6, ["alice", "bob", "bob"], 0, FieldError,
     "masked_start.members"),
    ("mstart-members-bad-id", MST, 6, ["alice", "bob", "Carol"], 0, FieldError,
     "masked_start.members[2]"),
    ("mstart-not-sender-first", MST, 6, ["bob", "alice", "carol"], 0, FieldError,
     "masked_start.members"),
    ("mstart-threshold-4", MST, 6, 4, 1, FieldError, "masked_start.threshold"),
    ("mstart-threshold-1", MST, 6, 1, 1, FieldError, "masked_start.threshold"),
    ("mstart-coordinates-empty", MST, 6, b"", 2, FieldError, "masked_start.coordinates"),
    ("mstart-keys-too-few", MST, 6, KEYS3[:2], 3, FieldError, "masked_start.ephemeral_publics"),
    ("mstart-keys-too-many", MST, 6, [*KEYS3, b"d" * 32], 3, FieldError,
     "masked_start.ephemeral_publics"),
    ("mstart-keys-dup", MST, 6, [b"a" * 32, b"b" * 32, b"a" * 32], 3, FieldError,
     "masked_start.ephemeral_publics"),
    ("mstart-key-short", MST, 6, [b"a" * 32, b"b" * 31, b"c" * 32], 3, FieldError,
     "masked_start.ephemeral_publics[1]"),
    ("mstart-key-str", MST, 6, [b"a" * 32, b"b" * 32, "c" * 32], 3, FieldError,
     "masked_start.ephemeral_publics[2]"),
    ("mstart-keys-bin", MST, 6, b"a" * 96, 3, FieldError, "masked_start.ephemeral_publics"),
    ("mstart-recipient-stranger", MST, 6, "dave", 4, FieldError, "masked_start.recipient"),
    ("mstart-recipient-initiator", MST, 6, "alice", 4, FieldError, "masked_start.recipient"),
    ("mstart-recipient-bad-id", MST, 6, "Bob", 4, FieldError, "masked_start.recipient"),
    ("mstart-session-key-short", MST, 6, b"k" * (SEALED_SESSION_KEY_BYTES - 1), 5, FieldError,
     "masked_start.session_key"),
    ("mstart-session-key-long", MST, 6, b"k" * (SEALED_SESSION_KEY_BYTES + 1), 5,
     SizeLimitError, "masked_start.session_key"),
    ("keys-to-self", KEY, 6, "alice", 0, FieldError, "keys.recipient"),
    ("keys-recipient-bad-id", KEY, 6, "", 0, FieldError, "keys.recipient"),
    ("keys-sealed-short", KEY, 6, b"k" * (SEALED_KEYS_BYTES - 1), 1, FieldError, "keys.sealed"),
    ("keys-sealed-long", KEY, 6, b"k" * (SEALED_KEYS_BYTES + 1), 1, SizeLimitError,
     "keys.sealed"),
    ("masked-sealed-short", MSK, 6, b"m" * (MIN_SEALED_MASKED_BYTES - 4), 0, FieldError,
     "masked.sealed"),
    ("masked-sealed-partial-element", MSK, 6, b"m" * (MIN_SEALED_MASKED_BYTES + 1), 0,
     FieldError, "masked.sealed"),
    ("masked-sealed-str", MSK, 6, "m" * MIN_SEALED_MASKED_BYTES, 0, FieldError,
     "masked.sealed"),
    ("survivors-one", SUR, 6, ["alice"], 0, FieldError, "survivors.survivors"),
    ("survivors-dup", SUR, 6, ["alice", "alice"], 0, FieldError, "survivors.survivors"),
    ("survivors-bad-id", SUR, 6, ["alice", "b/c"], 0, FieldError, "survivors.survivors[1]"),
    ("survivors-17", SUR, 6, [f"p{i}" for i in range(MAX_MEMBERS + 1)], 0, FieldError,
     "survivors.survivors"),
    ("survivors-bin", SUR, 6, b"alice", 0, FieldError, "survivors.survivors"),
    ("confirm-one", CON, 6, ["bob"], 0, FieldError, "confirm.survivors"),
    ("confirm-dup", CON, 6, ["bob", "bob"], 0, FieldError, "confirm.survivors"),
    ("confirm-bad-id", CON, 6, ["bob", 7], 0, FieldError, "confirm.survivors[1]"),
    ("reveal-two-members", REV, 6, b"r" * (MIN_SEALED_REVEAL_BYTES - REVEAL_ENTRY_BYTES), 0,
     FieldError, "reveal.sealed"),
    ("reveal-17-members", REV, 6, b"r" * (MAX_SEALED_REVEAL_BYTES + REVEAL_ENTRY_BYTES), 0,
     SizeLimitError, "reveal.sealed"),
    ("reveal-partial-entry", REV, 6, b"r" * (MIN_SEALED_REVEAL_BYTES + 1), 0, FieldError,
     "reveal.sealed"),
    ("reveal-body-too-many", REV, 6, [b"r" * MIN_SEALED_REVEAL_BYTES, b""], None, FieldError,
     "reveal"),
]  # fmt: skip
BODY_CASES += MASKED_CASES


@pytest.mark.parametrize(
    ("kind", "position", "value", "body_field", "error", "field"),
    [case[1:] for case in HEADER_CASES + BODY_CASES],
    ids=[case[0] for case in HEADER_CASES + BODY_CASES],
)
def test_validation_rule(
    kind: Kind,
    position: int,
    value: object,
    body_field: int | None,
    error: type[ProtocolError],
    field: str,
) -> None:
    with pytest.raises(error) as info:
        decode_message(mutated(kind, position, value, body_field))
    assert info.value.field == field
    assert field in str(info.value)


def test_version_checked_before_layout() -> None:
    """A future version may change the layout: it must be reported as a version problem."""
    with pytest.raises(VersionError):
        decode_message(raw_wire([PROTOCOL_VERSION + 1, "anything", b"layout of a future version"]))


def test_header_wrong_length() -> None:
    with pytest.raises(FieldError) as info:
        decode_message(raw_wire(VALID_SIGNED[Kind.ABORT][:6]))
    assert info.value.field == "header"


ENVELOPE_CASES: list[tuple[str, Callable[[], object], type[ProtocolError], str]] = [
    ("not-bytes", lambda: "text", DecodeError, "message"),
    ("empty", lambda: b"", DecodeError, "envelope"),
    ("not-msgpack", lambda: b"\xc1", DecodeError, "envelope"),
    ("envelope-map", lambda: msgpack.packb({"a": 1}), DecodeError, "envelope"),
    ("envelope-int", lambda: msgpack.packb(5), DecodeError, "envelope"),
    ("envelope-3", lambda: msgpack.packb([b"a", b"b", b"c"]), DecodeError, "envelope"),
    (
        "trailing-bytes",
        lambda: raw_wire(VALID_SIGNED[Kind.ABORT]) + b"\x00",
        DecodeError,
        "envelope",
    ),
    ("signed-str", lambda: msgpack.packb(["x", b"s" * 64]), DecodeError, "signed_bytes"),
    (
        "signature-short",
        lambda: raw_wire(VALID_SIGNED[Kind.ABORT], b"s" * 63),
        FieldError,
        "signature",
    ),
    (
        "signature-str",
        lambda: raw_wire(VALID_SIGNED[Kind.ABORT], "s" * 64),
        FieldError,
        "signature",
    ),
    (
        "signed-not-msgpack",
        lambda: msgpack.packb([b"\xc1", b"s" * 64], use_bin_type=True),
        DecodeError,
        "signed_bytes",
    ),
    (
        "signed-trailing",
        lambda: msgpack.packb(
            [msgpack.packb(VALID_SIGNED[Kind.ABORT], use_bin_type=True) + b"\x01", b"s" * 64],
            use_bin_type=True,
        ),
        DecodeError,
        "signed_bytes",
    ),
    ("signed-empty-array", lambda: raw_wire([]), DecodeError, "header"),
    ("signed-map", lambda: raw_wire({"version": 1}), DecodeError, "signed_bytes"),
    (
        "body-map",
        lambda: raw_wire([*VALID_SIGNED[Kind.ABORT][:6], {"reason": "x"}]),
        DecodeError,
        "signed_bytes",
    ),
    (
        "ext-type",
        lambda: raw_wire([*VALID_SIGNED[Kind.ABORT][:6], [msgpack.ExtType(5, b"x")]]),
        DecodeError,
        "signed_bytes",
    ),
    (
        "timestamp-ext",
        lambda: msgpack.packb([b"\xd6\xff\x00\x00\x00\x01", b"s" * 64], use_bin_type=True),
        DecodeError,
        "signed_bytes",
    ),
    (
        "invalid-utf8",
        lambda: msgpack.packb([b"\x91\xa2\xff\xfe", b"s" * 64], use_bin_type=True),
        DecodeError,
        "signed_bytes",
    ),
    (
        "deep-nesting",
        lambda: msgpack.packb([b"\x91" * 100_000 + b"\x01", b"s" * 64], use_bin_type=True),
        DecodeError,
        "signed_bytes",
    ),
    (
        "array-header-huge",
        lambda: msgpack.packb([b"\xdd\xff\xff\xff\xff", b"s" * 64], use_bin_type=True),
        DecodeError,
        "signed_bytes",
    ),
    (
        "oversized",
        lambda: b"\x00" * (MAX_PAYLOAD_BYTES + 1),
        SizeLimitError,
        "message",
    ),
]


@pytest.mark.parametrize(
    ("make", "error", "field"),
    [case[1:] for case in ENVELOPE_CASES],
    ids=[case[0] for case in ENVELOPE_CASES],
)
def test_envelope_rule(make: Callable[[], object], error: type[ProtocolError], field: str) -> None:
    with pytest.raises(error) as info:
        decode_message(make())  # type: ignore[arg-type]
    assert info.value.field == field


# --------------------------------------------------------------------------------------------
# encode-side validation


def invite_header(kind: Kind = Kind.INVITE) -> Header:
    return Header(PROTOCOL_VERSION, "net", kind, "alice", SESSION, 1)


@pytest.mark.parametrize(
    ("header", "body", "field"),
    [
        (invite_header(), Invite(5, 6, "m", 10, 16), "invite.threshold"),
        (invite_header(), Invite(True, 2, "m", 10, 16), "invite.group_size"),  # type: ignore[arg-type]
        (invite_header(), Abort("x"), "body"),
        (invite_header(Kind.ACCEPT), Accept(np.array([3, 1])), "accept.indices"),
        (invite_header(Kind.ACCEPT), Accept(np.array([-1, 1])), "accept.indices"),
        (invite_header(Kind.ACCEPT), Accept(np.array([0.5, 1.5])), "accept.indices"),
        (
            invite_header(Kind.START),
            Start(("bob", "alice", "carol"), 2, np.arange(3)),
            "start.members",
        ),
        (
            Header(PROTOCOL_VERSION, "net", Kind.ANNOUNCE, "alice", SESSION, 1),
            Announce(b"c", "m", 10, bytes(16)),
            "header.session",
        ),
        (
            Header(PROTOCOL_VERSION, "net", Kind.ABORT, "alice", SESSION, -5),
            Abort("x"),
            "header.seq",
        ),
        (invite_header(Kind.ABORT), Abort("\ud800"), "abort.reason"),
    ],
)
def test_encode_refuses_what_decode_would_reject(header: Header, body: object, field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        encode_message(header, body, sign)  # type: ignore[arg-type]
    assert info.value.field == field


def masked_header(kind: Kind) -> Header:
    return Header(PROTOCOL_VERSION, "net", kind, "alice", SESSION, 1)


def masked_start(**change: object) -> MaskedStart:
    fields = {
        "members": ("alice", "bob", "carol"),
        "threshold": 2,
        "coordinates": np.array([1, 2, 3], np.uint32),
        "ephemeral_publics": tuple(KEYS3),
        "recipient": "bob",
        "session_key": bytes(SEALED_SESSION_KEY_BYTES),
    } | change
    return MaskedStart(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "body", "field"),
    [
        (MAC, MaskedAccept(np.array([1, 2]), b"e" * 31), "masked_accept.ephemeral_public"),
        (MAC, MaskedAccept(np.array([2, 1]), b"e" * 32), "masked_accept.indices"),
        (MST, masked_start(ephemeral_publics=tuple(KEYS3[:2])), "masked_start.ephemeral_publics"),
        (MST, masked_start(recipient="alice"), "masked_start.recipient"),
        (MST, masked_start(session_key=b"k"), "masked_start.session_key"),
        (MST, masked_start(members=("bob", "alice", "carol")), "masked_start.members"),
        (KEY, Keys("alice", bytes(SEALED_KEYS_BYTES)), "keys.recipient"),
        (KEY, Keys("bob", bytes(SEALED_KEYS_BYTES - 1)), "keys.sealed"),
        (MSK, Masked(bytes(MIN_SEALED_MASKED_BYTES + 2)), "masked.sealed"),
        (SUR, Survivors(("alice",)), "survivors.survivors"),
        (CON, Confirm(("alice", "alice")), "confirm.survivors"),
        (REV, Reveal(bytes(MIN_SEALED_REVEAL_BYTES - 1)), "reveal.sealed"),
        (REV, Masked(bytes(MIN_SEALED_REVEAL_BYTES)), "body"),
        (Kind.START, masked_start(), "body"),
        (MST, Start(("alice", "bob", "carol"), 2, np.arange(3)), "body"),
    ],
)
def test_encode_refuses_bad_masked_bodies(kind: Kind, body: object, field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        encode_message(masked_header(kind), body, sign)  # type: ignore[arg-type]
    assert info.value.field == field


def test_encode_accepts_bytearray_keys_and_lists_in_masked_start() -> None:
    body = masked_start(
        members=["alice", "bob", "carol"],
        coordinates=[1, 2, 3],
        ephemeral_publics=[bytearray(k) for k in KEYS3],
        session_key=bytearray(SEALED_SESSION_KEY_BYTES),
    )
    msg = decode_message(encode_message(masked_header(MST), body, sign))
    assert msg.body == masked_start()
    assert isinstance(msg.body, MaskedStart)
    assert all(type(key) is bytes for key in msg.body.ephemeral_publics)


def test_masked_bodies_compare_arrays_by_value() -> None:
    assert MaskedAccept(np.array([1, 2], np.uint32), b"e" * 32) == MaskedAccept(
        np.array([1, 2], np.uint64), b"e" * 32
    )
    assert MaskedAccept(np.array([1, 2]), b"e" * 32) != MaskedAccept(np.array([1, 2]), b"f" * 32)
    assert masked_start() == masked_start()
    assert masked_start() != masked_start(recipient="carol")
    assert masked_start() != masked_start(coordinates=np.array([1, 2, 4]))


def test_survivor_list_must_be_members_in_member_order() -> None:
    members = ("alice", "bob", "carol", "dave")
    assert check_survivor_list(members, ["alice", "carol", "dave"]) == ("alice", "carol", "dave")
    assert check_survivor_list(members, members) == members
    for bad in (["carol", "alice"], ["alice", "erin"], ["alice", "alice", "bob"]):
        with pytest.raises(FieldError) as info:
            check_survivor_list(members, bad)
        assert info.value.field == "survivors"


def test_encode_accepts_numpy_integers_and_lists() -> None:
    header = Header(PROTOCOL_VERSION, "net", Kind.START, "alice", SESSION, np.int64(9))  # type: ignore[arg-type]
    body = Start(["alice", "bob", "carol"], np.int32(2), [1, 4, 7])  # type: ignore[arg-type]
    msg = decode_message(encode_message(header, body, sign))
    assert msg.header.seq == 9
    assert msg.body == Start(("alice", "bob", "carol"), 2, np.array([1, 4, 7], np.uint32))


def test_encode_checks_signature_length() -> None:
    with pytest.raises(FieldError) as info:
        encode_message(invite_header(Kind.ABORT), Abort("x"), lambda data: b"short")
    assert info.value.field == "signature"


def test_encode_unknown_kind() -> None:
    header = Header(PROTOCOL_VERSION, "net", 42, "alice", SESSION, 1)  # type: ignore[arg-type]
    with pytest.raises(UnknownKindError):
        encode_message(header, Abort("x"), sign)


def test_encode_refuses_bool_kind() -> None:
    header = Header(PROTOCOL_VERSION, "net", True, "alice", b"", 1)  # type: ignore[arg-type]
    with pytest.raises(FieldError) as info:
        encode_message(header, Announce(b"c", "m", 1, bytes(16)), sign)
    assert info.value.field == "header.kind"


def test_encode_refuses_oversized_message() -> None:
    header = invite_header(Kind.SHARE)
    with pytest.raises(SizeLimitError) as info:
        encode_message(header, Share("bob", b"\x00" * MAX_PAYLOAD_BYTES), sign)
    assert info.value.field == "message"


# --------------------------------------------------------------------------------------------
# tampering


def test_any_tampered_byte_is_detected() -> None:
    """Flipping any bit pattern of any byte gives a decode error or a failed signature check."""
    header = Header(PROTOCOL_VERSION, "net", Kind.SHARE, "alice", os.urandom(16), 123456)
    wire = encode_message(header, Share("bob", os.urandom(48)), sign)
    for position in range(len(wire)):
        for flip in (0x01, 0x80, 0xFF):
            tampered = bytearray(wire)
            tampered[position] ^= flip
            try:
                msg = decode_message(bytes(tampered))
            except ProtocolError:
                continue
            with pytest.raises(BadSignatureError):
                VERIFY_KEY.verify(msg.signed_bytes, msg.signature)


def test_worked_example_in_docs_matches_encoder() -> None:
    """docs/protocol.md section 3 shows these exact bytes; keep the spec and code in step."""
    header = Header(
        PROTOCOL_VERSION, "demo", Kind.ABORT, "alice", bytes(range(16)), 1_700_000_000_000_000
    )
    wire = encode_message(header, Abort("timeout"), sign)
    signed = decode_message(wire).signed_bytes
    expected = (
        "97 03 a4 64 65 6d 6f 09 a5 61 6c 69 63 65 c4 10"
        " 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f"
        " cf 00 06 0a 24 18 1e 40 00 91 a7 74 69 6d 65 6f 75 74"
    )
    assert signed == bytes.fromhex(expected)
    assert wire[:3] == bytes.fromhex("92 c4 32")
    assert wire[3 + len(signed) : 5 + len(signed)] == bytes.fromhex("c4 40")
    assert len(wire) == 3 + len(signed) + 2 + 64
