"""Topic layout, parsing and topic/header binding (protocol.topics)."""

from __future__ import annotations

import numpy as np
import pytest
from nacl.signing import SigningKey

from protocol import (
    PROTOCOL_VERSION,
    Abort,
    Announce,
    FieldError,
    Header,
    Kind,
    Leave,
    Partial,
    Share,
    Start,
    decode_message,
    encode_message,
)
from protocol.messages import SignedMessage
from protocol.topics import (
    ParsedTopic,
    announce_filter,
    announce_topic,
    check_topic_binding,
    direct_topic,
    inbox_filter,
    own_topics_filter,
    parse_topic,
)

KEY = SigningKey.generate()
SESSION = bytes(16)


def make(kind: Kind, sender: str, body: object) -> SignedMessage:
    session = b"" if kind in (Kind.ANNOUNCE, Kind.LEAVE) else SESSION
    header = Header(PROTOCOL_VERSION, "net", kind, sender, session, 1)
    return decode_message(encode_message(header, body, lambda b: KEY.sign(b).signature))  # type: ignore[arg-type]


def test_layout() -> None:
    assert announce_topic("net", "alice") == "murmur/net/alice/announce"
    assert direct_topic("net", "alice", "bob") == "murmur/net/alice/to/bob"
    assert announce_filter("net") == "murmur/net/+/announce"
    assert inbox_filter("net", "bob") == "murmur/net/+/to/bob"
    assert own_topics_filter("net", "alice") == "murmur/net/alice/#"


def test_every_published_topic_is_under_the_publishers_prefix() -> None:
    prefix = own_topics_filter("net", "alice").removesuffix("#")
    assert announce_topic("net", "alice").startswith(prefix)
    assert direct_topic("net", "alice", "bob").startswith(prefix)


def test_parse_round_trip() -> None:
    assert parse_topic("net", announce_topic("net", "a-1")) == ParsedTopic("announce", "a-1", None)
    assert parse_topic("net", direct_topic("net", "a_1", "b")) == ParsedTopic("direct", "a_1", "b")


BAD_IDS = ["Alice", "a/b", "+", "#", "", "x" * 65, "a\n", " a"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_builders_reject_bad_ids(bad: str) -> None:
    builders = [
        lambda: announce_topic(bad, "alice"),
        lambda: announce_topic("net", bad),
        lambda: direct_topic("net", bad, "bob"),
        lambda: direct_topic("net", "alice", bad),
        lambda: announce_filter(bad),
        lambda: inbox_filter("net", bad),
        lambda: own_topics_filter("net", bad),
    ]
    for build in builders:
        with pytest.raises(FieldError):
            build()


@pytest.mark.parametrize(
    "topic",
    [
        "murmur/other/alice/announce",  # other network
        "mumur/net/alice/announce",  # wrong root
        "murmur/net/alice/announce/x",  # extra level
        "murmur/net/alice",  # missing level
        "murmur/net//announce",  # empty sender
        "murmur/net/+/announce",  # wildcard is a filter, not a topic
        "murmur/net/Alice/announce",  # invalid id
        "murmur/net/alice/to",  # direct without recipient
        "murmur/net/alice/to/",  # empty recipient
        "murmur/net/alice/to/Bob",  # invalid recipient
        "murmur/net/alice/from/bob",  # unknown level
        "murmur/net/alice/to/bob/x",  # extra level
        "/murmur/net/alice/announce",  # leading slash
        "",
    ],
)
def test_parse_rejects(topic: str) -> None:
    with pytest.raises(FieldError) as info:
        parse_topic("net", topic)
    assert info.value.field == "topic"


def test_parse_rejects_non_str() -> None:
    with pytest.raises(FieldError):
        parse_topic("net", b"murmur/net/alice/announce")  # type: ignore[arg-type]


def test_binding_accepts_matching_topics() -> None:
    check_topic_binding(
        parse_topic("net", "murmur/net/alice/announce"),
        make(Kind.ANNOUNCE, "alice", Announce(b"cert", "m", 10, bytes(16))),
    )
    check_topic_binding(
        parse_topic("net", "murmur/net/alice/announce"),
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
        ("murmur/net/alice/announce", lambda: make(Kind.ABORT, "alice", Abort("x"))),
        (
            "murmur/net/alice/to/bob",
            lambda: make(Kind.ANNOUNCE, "alice", Announce(b"cert", "m", 10, bytes(16))),
        ),
        (
            "murmur/net/alice/announce",
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
