"""Wire rules of private predictions (protocol/inference.py): sizes checked before opening, the
snapshot id in the signed header, SERVE only on its serve topic."""

from __future__ import annotations

import os

import pytest
from nacl.signing import SigningKey

from protocol import Header, Kind, decode_message, encode_message
from protocol.errors import FieldError, SizeLimitError
from protocol.inference import (
    Answer,
    Query,
    Serve,
    ServedModel,
    SnapshotDescription,
    SnapshotShare,
    decode_description,
    encode_description,
    snapshot_share_bytes,
)
from protocol.limits import SEAL_OVERHEAD_BYTES
from protocol.messages import PROTOCOL_VERSION
from protocol.topics import check_topic_binding, direct_topic, parse_topic, serve_topic

KEY = SigningKey.generate()
SNAPSHOT = bytes(range(16))
MODEL = ServedModel(("bob", "carol", "dave"), 2, 10, 40, 14, 8, 700, 1000, b"h" * 32)
DESC = encode_description(SnapshotDescription("net", "alice", SNAPSHOT, 5, MODEL))
SIG = bytes(64)


def described(model: ServedModel) -> bytes:
    return encode_description(SnapshotDescription("net", "alice", SNAPSHOT, 5, model))


def wire(kind: Kind, sender: str, body: object) -> bytes:
    header = Header(PROTOCOL_VERSION, "net", kind, sender, SNAPSHOT, 1)
    return encode_message(header, body, lambda b: KEY.sign(b).signature)  # type: ignore[arg-type]


def test_each_kind_round_trips_with_the_snapshot_id_in_the_header():
    sealed_share = os.urandom(snapshot_share_bytes(10, 40))
    bodies = [
        (Kind.SNAPSHOT_SHARE, "alice", SnapshotShare("carol", b"cert", DESC, SIG, sealed_share)),
        (Kind.SERVE, "carol", Serve(b"cert", b"owner", DESC, SIG)),
        (Kind.QUERY, "erin", Query("carol", b"cert", 3, 2, bytes(SEAL_OVERHEAD_BYTES + 320))),
        (Kind.ANSWER, "carol", Answer("erin", 3, 2, bytes(SEAL_OVERHEAD_BYTES + 80))),
    ]
    for kind, sender, body in bodies:
        message = decode_message(wire(kind, sender, body))
        assert message.body == body
        assert message.header.session == SNAPSHOT


@pytest.mark.parametrize(("kind", "sender", "body", "field"), [
    (Kind.SNAPSHOT_SHARE, "alice", SnapshotShare("carol", b"cert", DESC, SIG, bytes(100)),
     "snapshot_share.sealed"),
    (Kind.SNAPSHOT_SHARE, "alice", SnapshotShare("zed", b"cert", DESC, SIG, bytes(
        snapshot_share_bytes(10, 40))), "snapshot_share.recipient"),
    (Kind.SNAPSHOT_SHARE, "bob", SnapshotShare("carol", b"cert", DESC, SIG, bytes(
        snapshot_share_bytes(10, 40))), "snapshot_share.description"),
    (Kind.SERVE, "carol", Serve(b"cert", b"owner", DESC, bytes(63)), "serve.owner_signature"),
    (Kind.SERVE, "carol", Serve(b"cert", b"owner", DESC[:-1], SIG), "serve.description"),
    (Kind.SERVE, "carol", Serve(b"cert", b"owner", DESC + b"\x00", SIG), "serve.description"),
    (Kind.SERVE, "zed", Serve(b"cert", b"owner", DESC, SIG), "serve.servers"),
    (Kind.SERVE, "carol", Serve(b"cert", b"owner", bytes(DESC).replace(
        b"\x02\x0a", b"\x03\x0a", 1), SIG), "serve.description.servers"),
    (Kind.QUERY, "erin", Query("carol", b"cert", 3, 3, bytes(SEAL_OVERHEAD_BYTES + 320)),
     "query.sealed"),
    (Kind.QUERY, "erin", Query("carol", b"cert", 3, 0, bytes(SEAL_OVERHEAD_BYTES)),
     "query.rows"),
    (Kind.ANSWER, "carol", Answer("erin", 3, 2, bytes(SEAL_OVERHEAD_BYTES + 81)),
     "answer.sealed"),
], ids=["share-size", "share-recipient", "share-not-owner", "serve-short-signature",
        "serve-truncated-description", "serve-trailing-byte", "serve-sender", "serve-too-few",
        "query-rows-split",
        "query-no-rows", "answer-partial-element"])
def test_malformed_bodies_are_refused_by_field(kind, sender, body, field):
    with pytest.raises(FieldError) as caught:
        wire(kind, sender, body)
    assert caught.value.field == field


def test_serve_belongs_on_its_own_serve_topic_only():
    message = decode_message(wire(Kind.SERVE, "carol", Serve(b"cert", b"owner", DESC, SIG)))
    check_topic_binding(parse_topic("net", serve_topic("net", "carol", SNAPSHOT)), message)
    with pytest.raises(FieldError, match="serve"):
        check_topic_binding(parse_topic("net", serve_topic("net", "carol", bytes(16))), message)
    with pytest.raises(FieldError, match="direct topic"):
        check_topic_binding(parse_topic("net", direct_topic("net", "carol", "erin")), message)


def test_a_query_is_bound_to_its_recipient_topic():
    message = decode_message(wire(Kind.QUERY, "erin", Query(
        "carol", b"cert", 3, 2, bytes(SEAL_OVERHEAD_BYTES + 320))))
    check_topic_binding(parse_topic("net", direct_topic("net", "erin", "carol")), message)
    with pytest.raises(FieldError, match="recipient"):
        check_topic_binding(parse_topic("net", direct_topic("net", "erin", "dave")), message)


def test_a_description_is_strictly_decoded_and_domain_separated():
    assert decode_description(DESC) == SnapshotDescription("net", "alice", SNAPSHOT, 5, MODEL)
    # an envelope's signed part is an array starting with an integer: never a description
    signed = decode_message(wire(Kind.SERVE, "carol", Serve(b"cert", b"owner", DESC, SIG)))
    with pytest.raises(FieldError, match="description"):
        decode_description(signed.signed_bytes)
    as_array = DESC.replace(b"\xbbmurmur/snapshot-description", b"\xbbmurmur/snapshot-descriptioN")
    with pytest.raises(FieldError, match="snapshot description"):
        decode_description(as_array)
    with pytest.raises(SizeLimitError):
        decode_description(bytes(2000))  # over MAX_DESCRIPTION_BYTES
