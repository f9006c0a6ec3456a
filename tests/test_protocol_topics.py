"""Topic layout, parsing and topic/header binding (protocol.topics)."""

from __future__ import annotations

import numpy as np
import pytest
from nacl.signing import SigningKey

from protocol import (
    PROTOCOL_VERSION,
    Abort,
    Announce,
    Confirm,
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
    Reveal,
    Share,
    Start,
    Survivors,
    decode_message,
    encode_message,
)
from protocol.limits import (
    MIN_SEALED_MASKED_BYTES,
    MIN_SEALED_REVEAL_BYTES,
    SEALED_KEYS_BYTES,
    SEALED_SESSION_KEY_BYTES,
)
from protocol.messages import SESSION_TOPIC_KINDS, SignedMessage
from protocol.topics import (
    ParsedTopic,
    announce_filter,
    announce_topic,
    bucket_filter,
    check_topic_binding,
    direct_topic,
    inbox_filter,
    own_topics_filter,
    parse_topic,
    session_filter,
    session_topic,
)

KEY = SigningKey.generate()
SESSION = bytes(16)


def make(kind: Kind, sender: str, body: object, session: bytes = SESSION) -> SignedMessage:
    session = b"" if kind in (Kind.ANNOUNCE, Kind.LEAVE) else session
    header = Header(PROTOCOL_VERSION, "net", kind, sender, session, 1)
    return decode_message(encode_message(header, body, lambda b: KEY.sign(b).signature))  # type: ignore[arg-type]


def test_layout() -> None:
    assert announce_topic("net", "alice") == "murmur/net/alice/announce/3c"  # its bucket
    assert direct_topic("net", "alice", "bob") == "murmur/net/alice/to/bob"
    assert announce_filter("net") == "murmur/net/+/announce/+"
    assert bucket_filter("net", 10) == "murmur/net/+/announce/0a"
    assert inbox_filter("net", "bob") == "murmur/net/+/to/bob"
    assert own_topics_filter("net", "alice") == "murmur/net/alice/#"
    sid, sid_hex = bytes(range(16)), "000102030405060708090a0b0c0d0e0f"
    assert session_topic("net", "alice", sid) == f"murmur/net/alice/session/{sid_hex}"
    assert session_filter("net", sid) == f"murmur/net/+/session/{sid_hex}"


def test_every_published_topic_is_under_the_publishers_prefix() -> None:
    prefix = own_topics_filter("net", "alice").removesuffix("#")
    assert announce_topic("net", "alice").startswith(prefix)
    assert direct_topic("net", "alice", "bob").startswith(prefix)
    assert session_topic("net", "alice", SESSION).startswith(prefix)


def test_parse_round_trip() -> None:
    assert parse_topic("net", announce_topic("net", "a-1")) == ParsedTopic("announce", "a-1", None)
    assert parse_topic("net", direct_topic("net", "a_1", "b")) == ParsedTopic("direct", "a_1", "b")
    sid = bytes(range(200, 216))
    assert parse_topic("net", session_topic("net", "a-1", sid)) == ParsedTopic(
        "session", "a-1", None, sid
    )


BAD_IDS = ["Alice", "a/b", "+", "#", "", "x" * 65, "a\n", " a"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_builders_reject_bad_ids(bad: str) -> None:
    builders = [
        lambda: announce_topic(bad, "alice"),
        lambda: announce_topic("net", bad),
        lambda: direct_topic("net", bad, "bob"),
        lambda: direct_topic("net", "alice", bad),
        lambda: announce_filter(bad),
        lambda: bucket_filter(bad, 0),
        lambda: inbox_filter("net", bad),
        lambda: own_topics_filter("net", bad),
        lambda: session_topic(bad, "alice", SESSION),
        lambda: session_topic("net", bad, SESSION),
        lambda: session_filter(bad, SESSION),
    ]
    for build in builders:
        with pytest.raises(FieldError):
            build()


@pytest.mark.parametrize(
    "topic",
    [
        "murmur/other/alice/announce/3c",  # other network
        "mumur/net/alice/announce/3c",  # wrong root
        "murmur/net/alice/announce",  # no bucket level (the layout before issue 14)
        "murmur/net/alice/announce/3c/x",  # extra level
        "murmur/net/alice/announce/3d",  # another bucket than alice's
        "murmur/net/alice/announce/3C",  # upper case
        "murmur/net/alice/announce/40",  # past the last bucket
        "murmur/net/alice/announce/+",  # wildcard is a filter, not a topic
        "murmur/net/alice",  # missing level
        "murmur/net//announce/3c",  # empty sender
        "murmur/net/+/announce/3c",  # wildcard is a filter, not a topic
        "murmur/net/Alice/announce/3c",  # invalid id
        "murmur/net/alice/to",  # direct without recipient
        "murmur/net/alice/to/",  # empty recipient
        "murmur/net/alice/to/Bob",  # invalid recipient
        "murmur/net/alice/from/bob",  # unknown level
        "murmur/net/alice/to/bob/x",  # extra level
        "/murmur/net/alice/announce/3c",  # leading slash
        "",
    ],
)
def test_parse_rejects(topic: str) -> None:
    with pytest.raises(FieldError) as info:
        parse_topic("net", topic)
    assert info.value.field == "topic"


@pytest.mark.parametrize("session", [b"", bytes(15), bytes(17), "00" * 16, bytearray(16), None])
def test_session_builders_reject_bad_session_ids(session: object) -> None:
    for build in (lambda: session_topic("net", "alice", session),  # type: ignore[arg-type]
                  lambda: session_filter("net", session)):  # type: ignore[arg-type]
        with pytest.raises(FieldError) as info:
            build()
        assert info.value.field == "session_id"


HEX = "00" * 16


@pytest.mark.parametrize(
    "topic",
    [
        f"murmur/net/alice/session/{HEX[:-1]}",  # 31 hex digits
        f"murmur/net/alice/session/{HEX}0",  # 33 hex digits
        f"murmur/net/alice/session/{HEX.upper()[:-1]}A",  # upper case: a second topic per session
        f"murmur/net/alice/session/{HEX[:-2]}g0",  # not hex
        f"murmur/net/alice/session/{HEX[:-2]} 0",  # whitespace bytes.fromhex would accept
        "murmur/net/alice/session/+",  # wildcard
        "murmur/net/alice/session/",  # empty
        "murmur/net/alice/session",  # missing level
        f"murmur/net/alice/session/{HEX}/x",  # extra level
        f"murmur/net/Alice/session/{HEX}",  # invalid sender
        f"murmur/other/alice/session/{HEX}",  # other network
    ],
)
def test_parse_rejects_bad_session_topics(topic: str) -> None:
    with pytest.raises(FieldError) as info:
        parse_topic("net", topic)
    assert info.value.field == "topic"


def test_parse_rejects_non_str() -> None:
    with pytest.raises(FieldError):
        parse_topic("net", b"murmur/net/alice/announce/3c")  # type: ignore[arg-type]


def test_binding_accepts_matching_topics() -> None:
    check_topic_binding(
        parse_topic("net", "murmur/net/alice/announce/3c"),
        make(Kind.ANNOUNCE, "alice", Announce(b"cert", "m", 10, bytes(16))),
    )
    check_topic_binding(
        parse_topic("net", "murmur/net/alice/announce/3c"),
        make(Kind.LEAVE, "alice", Leave("bye", bytes(16))),
    )
    check_topic_binding(
        parse_topic("net", "murmur/net/alice/to/bob"),
        make(Kind.SHARE, "alice", Share("bob", b"s" * 40)),
    )
    check_topic_binding(
        parse_topic("net", "murmur/net/alice/to/bob"), make(Kind.ABORT, "alice", Abort("x"))
    )


@pytest.mark.parametrize(
    ("topic", "message"),
    [
        # a share replayed under another sender's topic
        ("murmur/net/mallory/to/bob", lambda: make(Kind.SHARE, "alice", Share("bob", b"s" * 40))),
        # a share redirected to another recipient
        ("murmur/net/alice/to/carol", lambda: make(Kind.SHARE, "alice", Share("bob", b"s" * 40))),
        (
            "murmur/net/bob/to/carol",
            lambda: make(Kind.PARTIAL, "bob", Partial("alice", ("alice",), b"p" * 40)),
        ),
        # session traffic on the announce topic, announcements on a direct topic
        ("murmur/net/alice/announce/3c", lambda: make(Kind.ABORT, "alice", Abort("x"))),
        (
            "murmur/net/alice/to/bob",
            lambda: make(Kind.ANNOUNCE, "alice", Announce(b"cert", "m", 10, bytes(16))),
        ),
        (
            "murmur/net/alice/announce/3c",
            lambda: make(
                Kind.START, "alice", Start(("alice", "bob", "carol"), 2, np.array([1], np.uint32))
            ),
        ),
    ],
)
def test_binding_rejects(topic: str, message: object) -> None:
    with pytest.raises(FieldError) as info:
        check_topic_binding(parse_topic("net", topic), message())  # type: ignore[operator]
    assert info.value.field == "topic"


# --------------------------------------------------------------------------------------------
# masked session (kinds 10-16)

MEMBERS = ("alice", "bob", "carol")
OTHER_SESSION = bytes(range(1, 17))


def masked(sender: str = "alice", session: bytes = SESSION) -> SignedMessage:
    return make(Kind.MASKED, sender, Masked(bytes(MIN_SEALED_MASKED_BYTES)), session)


def confirm(sender: str = "alice", session: bytes = SESSION) -> SignedMessage:
    return make(Kind.CONFIRM, sender, Confirm(MEMBERS), session)


def reveal(sender: str = "alice", session: bytes = SESSION) -> SignedMessage:
    return make(Kind.REVEAL, sender, Reveal(bytes(MIN_SEALED_REVEAL_BYTES)), session)


def masked_start(recipient: str = "bob") -> SignedMessage:
    body = MaskedStart(MEMBERS, 2, np.array([1], np.uint32), (b"a" * 32, b"b" * 32, b"c" * 32),
                       recipient, bytes(SEALED_SESSION_KEY_BYTES))
    return make(Kind.MASKED_START, "alice", body)


def keys(recipient: str = "bob") -> SignedMessage:
    return make(Kind.KEYS, "alice", Keys(recipient, bytes(SEALED_KEYS_BYTES)))


DIRECT_MASKED_KINDS = {
    Kind.MASKED_ACCEPT: lambda: make(
        Kind.MASKED_ACCEPT, "alice", MaskedAccept(np.array([1], np.uint32), b"e" * 32)),
    Kind.MASKED_START: masked_start,
    Kind.KEYS: keys,
    Kind.SURVIVORS: lambda: make(Kind.SURVIVORS, "alice", Survivors(MEMBERS)),
}
TOPIC_MASKED_KINDS = {Kind.MASKED: masked, Kind.CONFIRM: confirm, Kind.REVEAL: reveal}
OTHER_KINDS = {
    Kind.INVITE: lambda: make(Kind.INVITE, "alice", Invite(3, 2, "m", 10, 16)),
    Kind.SHARE: lambda: make(Kind.SHARE, "alice", Share("bob", b"s" * 40)),
    Kind.ABORT: lambda: make(Kind.ABORT, "alice", Abort("x")),
    Kind.ANNOUNCE: lambda: make(Kind.ANNOUNCE, "alice", Announce(b"cert", "m", 10, bytes(16))),
    **DIRECT_MASKED_KINDS,
}


def test_every_masked_kind_is_covered_here() -> None:
    """The tables below cover every masked kind once, as session or direct: a new kind added
    to Kind without a topic decision fails here."""
    assert set(TOPIC_MASKED_KINDS) == SESSION_TOPIC_KINDS
    assert set(TOPIC_MASKED_KINDS).isdisjoint(DIRECT_MASKED_KINDS)
    # CHUNK travels on the topic of the message it carries (tests/test_chunks.py).
    # kinds 18-21 (private predictions) are tests/test_protocol_inference.py's.
    masked_kinds = {k for k in Kind if 10 <= k < 18} - {Kind.CHUNK}
    assert set(TOPIC_MASKED_KINDS) | set(DIRECT_MASKED_KINDS) == masked_kinds


@pytest.mark.parametrize("kind", list(TOPIC_MASKED_KINDS), ids=lambda k: k.name)
def test_binding_accepts_session_kinds_on_their_session_topic(kind: Kind) -> None:
    message = TOPIC_MASKED_KINDS[kind]()
    check_topic_binding(parse_topic("net", session_topic("net", "alice", SESSION)), message)


@pytest.mark.parametrize("kind", list(TOPIC_MASKED_KINDS), ids=lambda k: k.name)
def test_binding_rejects_session_kinds_elsewhere(kind: Kind) -> None:
    make_message = TOPIC_MASKED_KINDS[kind]
    wrong = [
        # another session's topic: a masked vector moved into another session's stream
        (session_topic("net", "alice", OTHER_SESSION), make_message()),
        # another member's session topic
        (session_topic("net", "bob", SESSION), make_message()),
        # the direct and announce topics
        (direct_topic("net", "alice", "bob"), make_message()),
        (announce_topic("net", "alice"), make_message()),
    ]
    for topic, message in wrong:
        with pytest.raises(FieldError) as info:
            check_topic_binding(parse_topic("net", topic), message)
        assert info.value.field == "topic"


@pytest.mark.parametrize("kind", list(OTHER_KINDS), ids=lambda k: k.name)
def test_binding_keeps_every_other_kind_off_session_topics(kind: Kind) -> None:
    with pytest.raises(FieldError) as info:
        check_topic_binding(
            parse_topic("net", session_topic("net", "alice", SESSION)), OTHER_KINDS[kind]()
        )
    assert info.value.field == "topic"


@pytest.mark.parametrize("kind", list(DIRECT_MASKED_KINDS), ids=lambda k: k.name)
def test_binding_accepts_direct_masked_kinds_on_direct_topics(kind: Kind) -> None:
    check_topic_binding(
        parse_topic("net", direct_topic("net", "alice", "bob")), DIRECT_MASKED_KINDS[kind]()
    )


@pytest.mark.parametrize("message", [keys, masked_start], ids=["KEYS", "MASKED_START"])
def test_binding_rejects_redirected_keys_and_start(message: object) -> None:
    with pytest.raises(FieldError) as info:
        check_topic_binding(parse_topic("net", direct_topic("net", "alice", "carol")),
                            message())  # type: ignore[operator]
    assert info.value.field == "topic"
    assert "recipient" in str(info.value)
