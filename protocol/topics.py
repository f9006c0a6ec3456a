"""MQTT topic layout of a Murmur network.

::

    murmur/{network}/{peer}/announce/{bb}     retained, signed ANNOUNCE / LEAVE; empty = gone
                                              (bb: the peer's bucket, protocol/buckets.py)
    murmur/{network}/{sender}/to/{recipient}  direct messages from sender to recipient
    murmur/{network}/{sender}/session/{hex}   MASKED / CONFIRM / REVEAL of one masked session
                                              (32 lower-case hex digits of the session id)
    murmur/{network}/{server}/serve/{hex}     retained SERVE of one snapshot (its id in hex;
                                              docs/inference.md)

Every topic a peer publishes to starts with ``murmur/{network}/{peer}/``, so a plain broker
ACL such as Mosquitto's ``pattern write murmur/NET/%u/#`` confines each peer to its own topics.
Only standard MQTT 3.1.1 features are used (retained messages, last will, ``+`` wildcards).
A peer follows every announcement (:func:`announce_filter`), a few buckets of them
(:func:`bucket_filter`) or one peer's (:func:`announce_topic`, the lookup of a sender it has
not heard of; docs/design/partial-view.md).

Security property: the topic is *routing*, not authentication. :func:`parse_topic` checks the
layout and ids strictly, and :func:`check_topic_binding` checks that the signed header agrees
with the topic (same sender; a direct message is for the subscriber; the kind belongs on that
topic), so a message cannot be replayed under another peer's topic or redirected to another
recipient without the receiver noticing. An announce topic's bucket level must be its
sender's bucket, so each peer has exactly one announce topic and a lookup of that topic finds
every announcement the peer made. A session topic names its session, and only the
three masked-session broadcast kinds of that very session belong on it, so a MASKED or REVEAL
cannot be moved into another session's stream, and no direct message is ever broadcast there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

from protocol.buckets import bucket_level, bucket_of, parse_bucket_level
from protocol.errors import FieldError
from protocol.limits import SESSION_ID_BYTES, is_valid_id
from protocol.messages import (
    SESSION_TOPIC_KINDS,
    SESSIONLESS_KINDS,
    Answer,
    Keys,
    Kind,
    MaskedStart,
    Partial,
    Query,
    Share,
    SignedMessage,
    SnapshotShare,
)

TOPIC_ROOT: Final = "murmur"
ANNOUNCE_LEVEL: Final = "announce"
DIRECT_LEVEL: Final = "to"
SESSION_LEVEL: Final = "session"
SERVE_LEVEL: Final = "serve"

#: Kinds that travel on a peer's announce topic. SESSION_TOPIC_KINDS (MASKED, CONFIRM,
#: REVEAL) travel on its session topics; every other kind travels on direct topics.
ANNOUNCE_TOPIC_KINDS: Final = SESSIONLESS_KINDS

#: The session level: exactly the session id in lower-case hex (one topic per session).
_SESSION_HEX_RE: Final = re.compile(rf"[0-9a-f]{{{2 * SESSION_ID_BYTES}}}")


def _checked_id(value: object, what: str) -> str:
    if not is_valid_id(value):
        shown = value[:80] if isinstance(value, str) else type(value).__name__
        raise FieldError(f"{shown!r} is not a valid id", what)
    return value


def announce_topic(network: str, peer: str) -> str:
    """The peer's retained announce topic (also its last-will topic), in its bucket."""
    network = _checked_id(network, "network")
    peer = _checked_id(peer, "peer")
    level = bucket_level(bucket_of(network, peer))
    return f"{TOPIC_ROOT}/{network}/{peer}/{ANNOUNCE_LEVEL}/{level}"


def direct_topic(network: str, sender: str, recipient: str) -> str:
    """The topic ``sender`` publishes on to reach ``recipient``."""
    return (
        f"{TOPIC_ROOT}/{_checked_id(network, 'network')}/{_checked_id(sender, 'sender')}"
        f"/{DIRECT_LEVEL}/{_checked_id(recipient, 'recipient')}"
    )


def _session_hex(session_id: object) -> str:
    if type(session_id) is not bytes or len(session_id) != SESSION_ID_BYTES:
        raise FieldError(f"expected {SESSION_ID_BYTES} bytes", "session_id")
    return session_id.hex()


def session_topic(network: str, sender: str, session_id: bytes) -> str:
    """The topic ``sender`` publishes its MASKED, CONFIRM and REVEAL of one session on."""
    return (
        f"{TOPIC_ROOT}/{_checked_id(network, 'network')}/{_checked_id(sender, 'sender')}"
        f"/{SESSION_LEVEL}/{_session_hex(session_id)}"
    )


def session_filter(network: str, session_id: bytes) -> str:
    """Subscription filter matching every member's session topic of one session."""
    return (
        f"{TOPIC_ROOT}/{_checked_id(network, 'network')}/+/{SESSION_LEVEL}"
        f"/{_session_hex(session_id)}"
    )


def announce_filter(network: str) -> str:
    """Subscription filter matching every peer's announce topic in ``network`` (every bucket)."""
    return f"{TOPIC_ROOT}/{_checked_id(network, 'network')}/+/{ANNOUNCE_LEVEL}/+"


def bucket_filter(network: str, bucket: int) -> str:
    """Subscription filter matching the announce topics of the peers in one bucket."""
    network = _checked_id(network, "network")
    return f"{TOPIC_ROOT}/{network}/+/{ANNOUNCE_LEVEL}/{bucket_level(bucket)}"


def serve_topic(network: str, server: str, snapshot_id: bytes) -> str:
    """The retained topic a serving peer announces one snapshot on."""
    return (
        f"{TOPIC_ROOT}/{_checked_id(network, 'network')}/{_checked_id(server, 'server')}"
        f"/{SERVE_LEVEL}/{_session_hex(snapshot_id)}"
    )


def serve_filter(network: str) -> str:
    """Subscription filter matching every serve announcement of ``network``."""
    return f"{TOPIC_ROOT}/{_checked_id(network, 'network')}/+/{SERVE_LEVEL}/+"


def inbox_filter(network: str, me: str) -> str:
    """Subscription filter matching every direct message addressed to ``me``."""
    network_level = _checked_id(network, "network")
    return f"{TOPIC_ROOT}/{network_level}/+/{DIRECT_LEVEL}/{_checked_id(me, 'me')}"


def own_topics_filter(network: str, peer: str) -> str:
    """The filter covering every topic ``peer`` may publish on (for broker ACLs)."""
    return f"{TOPIC_ROOT}/{_checked_id(network, 'network')}/{_checked_id(peer, 'peer')}/#"


@dataclass(frozen=True)
class ParsedTopic:
    """A topic that matched the layout.

    ``recipient`` is set for direct topics only, ``session`` (16 bytes) for session topics only.
    """

    kind: Literal["announce", "direct", "session", "serve"]
    sender: str
    recipient: str | None
    session: bytes | None = None


def parse_topic(network: str, topic: str) -> ParsedTopic:
    """Parse a topic of ``network``; FieldError (field ``"topic"``) for anything else.

    Rejects other networks, wrong roots, extra or missing levels, empty levels, wildcards,
    ids that do not match the id rule, session levels that are not exactly 32 lower-case
    hex digits (so one session has exactly one topic per sender) and announce topics whose
    bucket level is not the sender's bucket (so one peer has exactly one announce topic).
    """
    if not isinstance(topic, str):
        raise FieldError(f"expected a str, got {type(topic).__name__}", "topic")
    levels = topic.split("/")
    if len(levels) != 5 or levels[0] != TOPIC_ROOT:
        raise FieldError(f"not a murmur topic: {topic[:200]!r}", "topic")
    if levels[1] != network:
        raise FieldError(f"topic of another network: {topic[:200]!r}", "topic")
    sender = levels[2]
    if not is_valid_id(sender):
        raise FieldError(f"invalid sender id in topic {topic[:200]!r}", "topic")
    if levels[3] == ANNOUNCE_LEVEL:
        bucket = parse_bucket_level(levels[4])
        if bucket is None or bucket != bucket_of(network, sender):
            raise FieldError(f"not the sender's announce bucket: {topic[:200]!r}", "topic")
        return ParsedTopic(kind="announce", sender=sender, recipient=None)
    if levels[3] == DIRECT_LEVEL:
        recipient = levels[4]
        if not is_valid_id(recipient):
            raise FieldError(f"invalid recipient id in topic {topic[:200]!r}", "topic")
        return ParsedTopic(kind="direct", sender=sender, recipient=recipient)
    if levels[3] in (SESSION_LEVEL, SERVE_LEVEL):
        if _SESSION_HEX_RE.fullmatch(levels[4]) is None:
            raise FieldError(f"invalid {levels[3]} level in topic {topic[:200]!r}", "topic")
        kind: Literal["session", "serve"] = (
            "session" if levels[3] == SESSION_LEVEL else "serve")
        return ParsedTopic(
            kind=kind, sender=sender, recipient=None, session=bytes.fromhex(levels[4])
        )
    raise FieldError(f"not a murmur topic: {topic[:200]!r}", "topic")


def check_topic_binding(parsed: ParsedTopic, message: SignedMessage) -> None:
    """Raise FieldError (field ``"topic"``) unless the signed message belongs on this topic.

    * the header sender equals the topic's sender level;
    * ANNOUNCE / LEAVE arrive on announce topics; MASKED / CONFIRM / REVEAL on session topics,
      with the header session equal to the topic's; CHUNK on the direct or session topic of
      the message it carries (which is checked against the same topic once reassembled);
      every other kind on direct topics;
    * a SHARE, PARTIAL, KEYS or MASKED_START names the topic's recipient as its recipient.

    The caller must additionally check that ``parsed.recipient`` is itself for direct topics
    (its subscription filter normally guarantees that) and that ``header.network`` is its
    network (the topic's network level was checked by :func:`parse_topic`).
    """
    header = message.header
    if header.sender != parsed.sender:
        raise FieldError(
            f"header sender {header.sender!r} differs from topic sender {parsed.sender!r}",
            "topic",
        )
    if header.kind in ANNOUNCE_TOPIC_KINDS:
        expected = "announce"
    elif header.kind in SESSION_TOPIC_KINDS:
        expected = "session"
    elif header.kind is Kind.CHUNK and parsed.kind == "session":
        expected = "session"  # a piece of a MASKED / CONFIRM / REVEAL
    elif header.kind is Kind.SERVE:
        expected = "serve"
    else:
        expected = "direct"
    if parsed.kind != expected:
        kind_name = Kind(header.kind).name
        raise FieldError(f"{kind_name} does not belong on a {parsed.kind} topic", "topic")
    if parsed.kind in ("session", "serve") and header.session != parsed.session:
        raise FieldError(f"header session differs from the {parsed.kind} topic's", "topic")
    body = message.body
    addressed = Share | Partial | Keys | MaskedStart | SnapshotShare | Query | Answer
    if isinstance(body, addressed) and body.recipient != parsed.recipient:
        raise FieldError(
            f"body recipient {body.recipient!r} differs from topic recipient {parsed.recipient!r}",
            "topic",
        )
