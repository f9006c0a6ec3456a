"""Typed errors raised by the protocol layer.

Security property: decoding untrusted bytes (:func:`protocol.codec.decode_message`,
:func:`protocol.topics.parse_topic`, the :mod:`protocol.sparse` decoders) raises only
subclasses of :class:`ProtocolError`. A caller can therefore drop a bad message with a single
``except ProtocolError`` and count it by :attr:`ProtocolError.code`, and no malformed input
can crash it with an unexpected exception type.
"""

from __future__ import annotations

from typing import ClassVar


class ProtocolError(Exception):
    """A message, topic or encoded vector that violates the wire specification.

    ``field`` names the offending part of the message (for example ``"header.seq"`` or
    ``"start.members[2]"``) or is ``None`` when no single field is to blame. ``code`` is a
    short, stable, low-cardinality label suitable as a drop-counter key.
    """

    code: ClassVar[str] = "protocol"

    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        self.reason = message
        super().__init__(f"{field}: {message}" if field else message)


class DecodeError(ProtocolError):
    """The bytes are not msgpack, or not the expected framing (envelope shape, ext types...)."""

    code = "decode"


class SizeLimitError(ProtocolError):
    """A payload, vector or blob is larger than the limits in :mod:`protocol.limits`."""

    code = "size"


class FieldError(ProtocolError):
    """A field is missing, has the wrong type, or holds a value outside its allowed range."""

    code = "field"


class VersionError(ProtocolError):
    """The envelope carries a protocol version this implementation does not speak."""

    code = "version"


class UnknownKindError(ProtocolError):
    """The envelope carries a message kind this implementation does not know."""

    code = "kind"
