"""MQTT topic layout of a Murmur network.

::

    murmur/{network}/{peer}/announce          retained, signed ANNOUNCE / LEAVE; empty = gone
    murmur/{network}/{sender}/to/{recipient}  direct messages from sender to recipient

Every topic a peer publishes to starts with ``murmur/{network}/{peer}/``, so a plain broker
ACL such as Mosquitto's ``pattern write murmur/NET/%u/#`` confines each peer to its own topics.
Only standard MQTT 3.1.1 features are used (retained messages, last will, ``+`` wildcards).

Security property: the topic is *routing*, not authentication. :func:`parse_topic` checks the
layout and ids strictly, and :func:`check_topic_binding` checks that the signed header agrees
with the topic (same sender; a direct message is for the subscriber; the kind belongs on that
topic), so a message cannot be replayed under another peer's topic or redirected to another
recipient without the receiver noticing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from protocol.errors import FieldError
from protocol.limits import is_valid_id
from protocol.messages import SESSIONLESS_KINDS, Kind, Partial, Share, SignedMessage

TOPIC_ROOT: Final = "murmur"
ANNOUNCE_LEVEL: Final = "announce"
DIRECT_LEVEL: Final = "to"

#: Kinds that travel on a peer's announce topic; every other kind travels on direct topics.
ANNOUNCE_TOPIC_KINDS: Final = SESSIONLESS_KINDS


def _checked_id(value: object, what: str) -> str:
    if not is_valid_id(value):
        shown = value[:80] if isinstance(value, str) else type(value).__name__
        raise FieldError(f"{shown!r} is not a valid id", what)
    return value


def announce_topic(network: str, peer: str) -> str:
    """The peer's retained announce topic (also its last-will topic)."""
    return f"{TOPIC_ROOT}/{_checked_id(network, 'network')}/{_checked_id(peer, 'peer')}/announce"


def direct_topic(network: str, sender: str, recipient: str) -> str:
    """The topic ``sender`` publishes on to reach ``recipient``."""
    return (
        f"{TOPIC_ROOT}/{_checked_id(network, 'network')}/{_checked_id(sender, 'sender')}"
        f"/{DIRECT_LEVEL}/{_checked_id(recipient, 'recipient')}"
    )


def announce_filter(network: str) -> str:
    """Subscription filter matching every peer's announce topic in ``network``."""
    return f"{TOPIC_ROOT}/{_checked_id(network, 'network')}/+/{ANNOUNCE_LEVEL}"


def inbox_filter(network: str, me: str) -> str:
    """Subscription filter matching every direct message addressed to ``me``."""
    network_level = _checked_id(network, "network")
    return f"{TOPIC_ROOT}/{network_level}/+/{DIRECT_LEVEL}/{_checked_id(me, 'me')}"


def own_topics_filter(network: str, peer: str) -> str:
    """The filter covering every topic ``peer`` may publish on (for broker ACLs)."""
    return f"{TOPIC_ROOT}/{_checked_id(network, 'network')}/{_checked_id(peer, 'peer')}/#"


@dataclass(frozen=True)
class ParsedTopic:
    """A topic that matched the layout. ``recipient`` is None for announce topics."""

    kind: Literal["announce", "direct"]
    sender: str
    recipient: str | None


def parse_topic(network: str, topic: str) -> ParsedTopic:
    """Parse a topic of ``network``; FieldError (field ``"topic"``) for anything else.

    Rejects other networks, wrong roots, extra or missing levels, empty levels, wildcards and
    ids that do not match the id rule.
    """
    if not isinstance(topic, str):
        raise FieldError(f"expected a str, got {type(topic).__name__}", "topic")
    levels = topic.split("/")
    if len(levels) not in (4, 5) or levels[0] != TOPIC_ROOT:
        raise FieldError(f"not a murmur topic: {topic[:200]!r}", "topic")
    if levels[1] != network:
        raise FieldError(f"topic of another network: {topic[:200]!r}", "topic")
    sender = levels[2]
    if not is_valid_id(sender):
        raise FieldError(f"invalid sender id in topic {topic[:200]!r}", "topic")
    if len(levels) == 4 and levels[3] == ANNOUNCE_LEVEL:
        return ParsedTopic(kind="announce", sender=sender, recipient=None)
    if len(levels) == 5 and levels[3] == DIRECT_LEVEL:
        recipient = levels[4]
        if not is_valid_id(recipient):
            raise FieldError(f"invalid recipient id in topic {topic[:200]!r}", "topic")
        return ParsedTopic(kind="direct", sender=sender, recipient=recipient)
    raise FieldError(f"not a murmur topic: {topic[:200]!r}", "topic")


def check_topic_binding(parsed: ParsedTopic, message: SignedMessage) -> None:
    """Raise FieldError (field ``"topic"``) unless the signed message belongs on this topic.

    * the header sender equals the topic's sender level;
    * ANNOUNCE / LEAVE arrive on announce topics, every other kind on direct topics;
    * a SHARE or PARTIAL names the topic's recipient as its recipient.

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
    on_announce = parsed.kind == "announce"
    if (header.kind in ANNOUNCE_TOPIC_KINDS) != on_announce:
        kind_name = Kind(header.kind).name
        raise FieldError(f"{kind_name} does not belong on a {parsed.kind} topic", "topic")
    body = message.body
    if isinstance(body, Share | Partial) and body.recipient != parsed.recipient:
        raise FieldError(
            f"body recipient {body.recipient!r} differs from topic recipient {parsed.recipient!r}",
            "topic",
        )
