"""Encoding and strict decoding of signed Murmur messages.

Wire format (docs/protocol.md is the normative description)::

    wire         = msgpack array [signed_bytes: bin, signature: bin(64)]
    signed_bytes = msgpack array [version, network, kind, sender, session, seq, body]
    body         = msgpack array of the kind's fields in a fixed order

Security properties:

* The signature covers ``signed_bytes`` exactly as they travel, and the receiver verifies it
  over the received bytes (:attr:`SignedMessage.signed_bytes`), so no canonical re-encoding is
  ever needed and a decoder quirk cannot make two parties disagree on what was signed.
* :func:`decode_message` checks the payload size before unpacking, unpacks with hard msgpack
  limits (no maps, no ext types, bounded str/bin/array lengths) and validates every field's
  type and range; only :class:`ProtocolError` subclasses escape, each naming the field.
* :func:`encode_message` runs the same validation on what it is about to send, so a correct
  peer never emits a message another correct peer must reject.

* Masked-session kinds (10-16) are decoded as strictly as the others: fixed-size keys and
  sealed blobs have exact lengths, variable ones their bounds and whole-entry sizes
  (:mod:`protocol.limits`), so a receiver never opens a blob of an impossible size. What needs
  session state (a survivor list against START's members) is
  :func:`protocol.fields.check_survivor_list`.
* CHUNK (kind 17) is checked field against field (count, index, total_bytes and the exact
  length of ``data``); reassembling and checking the digest is :mod:`protocol.chunks`.
* Each kind's body decoder is in :mod:`protocol.body_codec`; this module checks the envelope
  and header, and encodes.

This module never imports crypto: signing is the caller's ``sign`` callback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, NoReturn

import msgpack
import numpy as np

from protocol.body_codec import BODY_FIELDS, decode_body
from protocol.errors import (
    DecodeError,
    FieldError,
    ProtocolError,
    SizeLimitError,
    UnknownKindError,
    VersionError,
)
from protocol.fields import _bytes, _int, _peer_id
from protocol.inference import INFERENCE_FIELDS, body_values
from protocol.limits import (
    MAX_PAYLOAD_BYTES,
    MAX_SEQ_EXCLUSIVE,
    MAX_STR_BYTES,
    MAX_WIRE_ARRAY_LEN,
    SESSION_ID_BYTES,
    SIGNATURE_BYTES,
)
from protocol.messages import (
    BODY_TYPES,
    PROTOCOL_VERSION,
    SESSIONLESS_KINDS,
    Body,
    Header,
    Kind,
    SignedMessage,
)
from protocol.sparse import encode_indices

HEADER_FIELDS: Final = ("version", "network", "kind", "sender", "session", "seq", "body")

# --------------------------------------------------------------------------------------------
# msgpack with hard limits


def _reject_ext(code: int, data: bytes) -> NoReturn:
    raise DecodeError(f"msgpack ext type {code} is not allowed")


def _unpack(data: bytes, field: str) -> object:
    """Unpack exactly one msgpack object under hard limits; DecodeError on anything else."""
    try:
        return msgpack.unpackb(
            data,
            raw=False,  # str must be valid UTF-8; bin stays bytes
            strict_map_key=True,
            use_list=True,
            max_bin_len=MAX_PAYLOAD_BYTES,
            max_str_len=MAX_STR_BYTES,
            max_array_len=MAX_WIRE_ARRAY_LEN,
            max_map_len=0,  # no message contains a map
            max_ext_len=0,
            ext_hook=_reject_ext,
        )
    except DecodeError as exc:
        raise DecodeError(exc.reason, field) from None
    except (
        msgpack.UnpackException,  # OutOfData, FormatError, StackError
        ValueError,  # ExtraData, truncation, limit exceeded, UnicodeDecodeError
        TypeError,
        OverflowError,
        RecursionError,
    ) as exc:
        detail = str(exc) or type(exc).__name__
        raise DecodeError(f"not a valid msgpack object ({detail})", field) from None


# --------------------------------------------------------------------------------------------
# header and envelope


def _decode_kind(value: object) -> Kind:
    if type(value) is not int:
        raise FieldError(f"expected an integer, got {type(value).__name__}", "header.kind")
    try:
        return Kind(value)
    except ValueError:
        raise UnknownKindError(f"unknown message kind {value}", "header.kind") from None


def _decode_signed(signed: object) -> tuple[Header, Body]:
    """Validate the unpacked ``signed_bytes`` array; the version is checked before the layout so
    a future version may change everything after it."""
    if type(signed) is not list or not signed:
        raise DecodeError("signed part must be a non-empty msgpack array", "header")
    version = signed[0]
    if type(version) is not int:
        raise FieldError(f"expected an integer, got {type(version).__name__}", "header.version")
    if version != PROTOCOL_VERSION:
        raise VersionError(f"unsupported protocol version {version}", "header.version")
    if len(signed) != len(HEADER_FIELDS):
        raise FieldError(
            f"expected {len(HEADER_FIELDS)} header fields, got {len(signed)}", "header"
        )
    _, network, kind_value, sender, session, seq, body = signed
    network = _peer_id(network, "header.network")
    kind = _decode_kind(kind_value)
    sender = _peer_id(sender, "header.sender")
    session_len = 0 if kind in SESSIONLESS_KINDS else SESSION_ID_BYTES
    session = _bytes(session, "header.session", session_len, session_len)
    seq = _int(seq, "header.seq", 0, MAX_SEQ_EXCLUSIVE - 1)
    header = Header(
        version=version, network=network, kind=kind, sender=sender, session=session, seq=seq
    )
    return header, decode_body(kind, body, sender)


def decode_message(data: bytes) -> SignedMessage:
    """Decode and validate one wire message from an untrusted source.

    Checks, in order: payload type and size, envelope framing, signature length, the signed
    part's framing, version, header fields, kind, and every body field. Raises only
    :class:`ProtocolError` subclasses. The result is well-formed but *not yet authenticated*:
    the caller must still verify ``signature`` over ``signed_bytes`` with the sender's
    certified key and run its replay window on ``(sender, seq)``.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"expected bytes, got {type(data).__name__}", "message")
    size = memoryview(data).nbytes
    if size > MAX_PAYLOAD_BYTES:
        raise SizeLimitError(
            f"{size} bytes exceed MAX_PAYLOAD_BYTES={MAX_PAYLOAD_BYTES}", "message"
        )
    envelope = _unpack(data, "envelope")
    if type(envelope) is not list or len(envelope) != 2:
        raise DecodeError("envelope must be a 2-element msgpack array", "envelope")
    signed_bytes, signature = envelope
    if type(signed_bytes) is not bytes:
        raise DecodeError("signed part must be bin", "signed_bytes")
    signature = _bytes(signature, "signature", SIGNATURE_BYTES, SIGNATURE_BYTES)
    header, body = _decode_signed(_unpack(signed_bytes, "signed_bytes"))
    return SignedMessage(header=header, body=body, signed_bytes=signed_bytes, signature=signature)


# --------------------------------------------------------------------------------------------
# encoding


def _to_wire(value: object) -> object:
    """Convert one body attribute to its msgpack representation (validated afterwards)."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, tuple | list):
        return [_to_wire(item) for item in value]
    return value


def _body_to_wire(kind: Kind, body: Body) -> list[object]:
    expected = BODY_TYPES[kind]
    if type(body) is not expected:
        raise FieldError(
            f"kind {kind.name} needs a {expected.__name__} body, got {type(body).__name__}",
            "body",
        )
    if type(body) in INFERENCE_FIELDS:
        return [_to_wire(value) for value in body_values(body)]
    wire: list[object] = []
    for field in BODY_FIELDS[kind]:
        value = getattr(body, field)
        if field in ("indices", "coordinates"):
            if not isinstance(value, np.ndarray | list | tuple):
                raise FieldError("expected an index array", f"{kind.name.lower()}.{field}")
            value = np.asarray(value)
            # Re-raise with the full field name so the caller sees which array is wrong.
            try:
                wire.append(encode_indices(value))
            except ProtocolError as exc:
                raise type(exc)(exc.reason, f"{kind.name.lower()}.{field}") from None
            continue
        wire.append(_to_wire(value))
    return wire


def encode_message(header: Header, body: Body, sign: Callable[[bytes], bytes]) -> bytes:
    """Validate, encode and sign one message; returns the wire bytes.

    ``sign`` receives the exact ``signed_bytes`` and must return a 64-byte Ed25519 signature
    (e.g. ``Identity.sign``). Raises FieldError / VersionError / UnknownKindError /
    SizeLimitError if the message would not pass :func:`decode_message`.
    """
    if isinstance(header.kind, bool):  # Kind(True) would silently mean ANNOUNCE
        raise FieldError("expected an integer kind, got bool", "header.kind")
    try:
        kind = Kind(header.kind)
    except (ValueError, TypeError):
        raise UnknownKindError(f"unknown message kind {header.kind!r}", "header.kind") from None
    signed = [
        _to_wire(header.version),
        header.network,
        int(kind),
        header.sender,
        _to_wire(header.session),
        _to_wire(header.seq),
        _body_to_wire(kind, body),
    ]
    _decode_signed(signed)  # the receiver's rules, applied before anything leaves
    signed_bytes = msgpack.packb(signed, use_bin_type=True)
    signature = sign(signed_bytes)
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise FieldError(f"sign() must return {SIGNATURE_BYTES} bytes", "signature")
    wire = msgpack.packb([signed_bytes, signature], use_bin_type=True)
    if len(wire) > MAX_PAYLOAD_BYTES:
        raise SizeLimitError(
            f"{len(wire)} bytes exceed MAX_PAYLOAD_BYTES={MAX_PAYLOAD_BYTES}", "message"
        )
    return wire
