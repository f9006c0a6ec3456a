"""Murmur wire protocol: message kinds, the signed msgpack envelope, strict decoding with hard
limits, sparse-vector encodings and the MQTT topic layout.

Pure: depends only on msgpack, numpy and the standard library (never on crypto, peer, sim,
torch or asyncio). docs/protocol.md is the normative specification.
"""

from protocol.codec import decode_message, encode_message
from protocol.errors import (
    DecodeError,
    FieldError,
    ProtocolError,
    SizeLimitError,
    UnknownKindError,
    VersionError,
)
from protocol.messages import (
    PROTOCOL_VERSION,
    Abort,
    Accept,
    Announce,
    Body,
    Decline,
    Header,
    Invite,
    Kind,
    Leave,
    Partial,
    SequenceCounter,
    Share,
    SignedMessage,
    Start,
)
from protocol.sparse import decode_f32, decode_indices, encode_f32, encode_indices
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

__all__ = [
    "PROTOCOL_VERSION",
    "Abort",
    "Accept",
    "Announce",
    "Body",
    "Decline",
    "DecodeError",
    "FieldError",
    "Header",
    "Invite",
    "Kind",
    "Leave",
    "ParsedTopic",
    "Partial",
    "ProtocolError",
    "SequenceCounter",
    "Share",
    "SignedMessage",
    "SizeLimitError",
    "Start",
    "UnknownKindError",
    "VersionError",
    "announce_filter",
    "announce_topic",
    "check_topic_binding",
    "decode_f32",
    "decode_indices",
    "decode_message",
    "direct_topic",
    "encode_f32",
    "encode_indices",
    "encode_message",
    "inbox_filter",
    "own_topics_filter",
    "parse_topic",
]
