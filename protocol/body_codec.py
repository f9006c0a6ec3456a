"""Strict decoding of message bodies: one decoder per kind, each checking its fields in wire
order (types, ranges, exact and bounded lengths, :mod:`protocol.limits`) and naming the bad
one as ``kind.field``. :func:`protocol.codec.decode_message` calls :func:`decode_body` once the
header is valid; ``encode_message`` runs the same rules on what it sends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields as dataclass_fields
from typing import Final

from protocol.errors import FieldError, UnknownKindError
from protocol.fields import (
    _bytes,
    _chunk_fields,
    _id_list,
    _indices,
    _int,
    _key_list,
    _members,
    _peer_id,
    _sealed_entries,
    _text,
)
from protocol.inference import (
    INFERENCE_FIELDS,
    decode_answer,
    decode_query,
    decode_serve,
    decode_snapshot_share,
)
from protocol.limits import (
    CONNECTION_ID_BYTES,
    EPHEMERAL_PUBLIC_BYTES,
    FIELD_ELEMENT_BYTES,
    MAX_CERTIFICATE_BYTES,
    MAX_FRAC_BITS,
    MAX_MEMBERS,
    MAX_MODEL_ID_LEN,
    MAX_PARAM_COUNT,
    MAX_SEALED_BYTES,
    MAX_SEALED_MASKED_BYTES,
    MAX_SEALED_REVEAL_BYTES,
    MAX_STR,
    MIN_GROUP_SIZE,
    MIN_SEALED_BYTES,
    MIN_SEALED_MASKED_BYTES,
    MIN_SEALED_REVEAL_BYTES,
    MIN_THRESHOLD,
    REVEAL_ENTRY_BYTES,
    SEALED_KEYS_BYTES,
    SEALED_SESSION_KEY_BYTES,
)
from protocol.messages import (
    BODY_TYPES,
    Abort,
    Accept,
    Announce,
    Body,
    Chunk,
    Confirm,
    Decline,
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
)

#: Field names of each kind's body, in wire order (the dataclass field order; an inference
#: body's ServedModel is flattened in place, protocol.inference.INFERENCE_FIELDS).
BODY_FIELDS: Final[dict[Kind, tuple[str, ...]]] = {
    kind: INFERENCE_FIELDS.get(cls, tuple(f.name for f in dataclass_fields(cls)))
    for kind, cls in BODY_TYPES.items()
}

#: A body's fields by name, the header's sender, and the "kind.field" namer for errors.
Fields = dict[str, object]
Namer = Callable[[str], str]


def decode_body(kind: Kind, raw: object, sender: str) -> Body:
    """Validate the unpacked body array of a ``kind`` message sent by ``sender``."""
    prefix = kind.name.lower()
    names = BODY_FIELDS[kind]
    if type(raw) is not list:
        raise FieldError(f"body must be an array, got {type(raw).__name__}", prefix)
    if len(raw) != len(names):
        raise FieldError(f"body must have exactly {len(names)} fields, got {len(raw)}", prefix)
    v = dict(zip(names, raw, strict=True))

    def name(field: str) -> str:
        return f"{prefix}.{field}"

    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise UnknownKindError(f"no body decoder for kind {int(kind)}", "header.kind")
    return decoder(v, sender, name)


def _connection(v: Fields, name: Namer) -> bytes:
    return _bytes(v["connection"], name("connection"), CONNECTION_ID_BYTES, CONNECTION_ID_BYTES)


def _announce(v: Fields, sender: str, name: Namer) -> Body:
    return Announce(
        certificate=_bytes(v["certificate"], name("certificate"), 1, MAX_CERTIFICATE_BYTES),
        model_id=_text(v["model_id"], name("model_id"), 1, MAX_MODEL_ID_LEN),
        param_count=_int(v["param_count"], name("param_count"), 1, MAX_PARAM_COUNT),
        connection=_connection(v, name),
    )


def _leave(v: Fields, sender: str, name: Namer) -> Body:
    return Leave(reason=_text(v["reason"], name("reason"), 0, MAX_STR),
                 connection=_connection(v, name))


def _invite(v: Fields, sender: str, name: Namer) -> Body:
    group_size = _int(v["group_size"], name("group_size"), MIN_GROUP_SIZE, MAX_MEMBERS)
    return Invite(
        group_size=group_size,
        threshold=_int(v["threshold"], name("threshold"), MIN_THRESHOLD, group_size),
        model_id=_text(v["model_id"], name("model_id"), 1, MAX_MODEL_ID_LEN),
        param_count=_int(v["param_count"], name("param_count"), 1, MAX_PARAM_COUNT),
        frac_bits=_int(v["frac_bits"], name("frac_bits"), 0, MAX_FRAC_BITS),
    )


def _accept(v: Fields, sender: str, name: Namer) -> Body:
    return Accept(indices=_indices(v["indices"], name("indices"), 0))


def _decline(v: Fields, sender: str, name: Namer) -> Body:
    return Decline(reason=_text(v["reason"], name("reason"), 0, MAX_STR))


def _start(v: Fields, sender: str, name: Namer) -> Body:
    members = _members(v["members"], name("members"), sender)
    return Start(
        members=members,
        threshold=_int(v["threshold"], name("threshold"), MIN_THRESHOLD, len(members)),
        coordinates=_indices(v["coordinates"], name("coordinates"), 1),
    )


def _share(v: Fields, sender: str, name: Namer) -> Body:
    return Share(
        recipient=_peer_id(v["recipient"], name("recipient")),
        sealed=_bytes(v["sealed"], name("sealed"), MIN_SEALED_BYTES, MAX_SEALED_BYTES),
    )


def _partial(v: Fields, sender: str, name: Namer) -> Body:
    return Partial(
        recipient=_peer_id(v["recipient"], name("recipient")),
        contributors=_id_list(v["contributors"], name("contributors"), 1, MAX_MEMBERS),
        sealed=_bytes(v["sealed"], name("sealed"), MIN_SEALED_BYTES, MAX_SEALED_BYTES),
    )


def _abort(v: Fields, sender: str, name: Namer) -> Body:
    return Abort(reason=_text(v["reason"], name("reason"), 0, MAX_STR))


def _chunk(v: Fields, sender: str, name: Namer) -> Body:
    return Chunk(*_chunk_fields(v["digest"], v["index"], v["count"], v["total_bytes"],
                                v["data"], name))


# -- the masked session's bodies (kinds 10-16, docs/protocol.md section 4) ---------------------


def _masked_accept(v: Fields, sender: str, name: Namer) -> Body:
    return MaskedAccept(
        indices=_indices(v["indices"], name("indices"), 0),
        ephemeral_public=_bytes(
            v["ephemeral_public"], name("ephemeral_public"), EPHEMERAL_PUBLIC_BYTES,
            EPHEMERAL_PUBLIC_BYTES,
        ),
    )


def _masked_start(v: Fields, sender: str, name: Namer) -> Body:
    members = _members(v["members"], name("members"), sender)
    threshold = _int(v["threshold"], name("threshold"), MIN_THRESHOLD, len(members))
    coordinates = _indices(v["coordinates"], name("coordinates"), 1)
    publics = _key_list(v["ephemeral_publics"], name("ephemeral_publics"), len(members))
    recipient = _peer_id(v["recipient"], name("recipient"))
    if recipient not in members[1:]:
        raise FieldError("must be a member other than the initiator", name("recipient"))
    return MaskedStart(
        members=members,
        threshold=threshold,
        coordinates=coordinates,
        ephemeral_publics=publics,
        recipient=recipient,
        session_key=_bytes(
            v["session_key"], name("session_key"), SEALED_SESSION_KEY_BYTES,
            SEALED_SESSION_KEY_BYTES,
        ),
    )


def _keys(v: Fields, sender: str, name: Namer) -> Body:
    recipient = _peer_id(v["recipient"], name("recipient"))
    if recipient == sender:
        raise FieldError("a member sends KEYS only to the other members", name("recipient"))
    return Keys(
        recipient=recipient,
        sealed=_bytes(v["sealed"], name("sealed"), SEALED_KEYS_BYTES, SEALED_KEYS_BYTES),
    )


def _masked(v: Fields, sender: str, name: Namer) -> Body:
    return Masked(
        sealed=_sealed_entries(
            v["sealed"], name("sealed"), MIN_SEALED_MASKED_BYTES, MAX_SEALED_MASKED_BYTES,
            FIELD_ELEMENT_BYTES,
        )
    )


def _survivors(v: Fields, sender: str, name: Namer) -> Body:
    return Survivors(
        survivors=_id_list(v["survivors"], name("survivors"), MIN_THRESHOLD, MAX_MEMBERS)
    )


def _confirm(v: Fields, sender: str, name: Namer) -> Body:
    return Confirm(
        survivors=_id_list(v["survivors"], name("survivors"), MIN_THRESHOLD, MAX_MEMBERS)
    )


def _reveal(v: Fields, sender: str, name: Namer) -> Body:
    return Reveal(
        sealed=_sealed_entries(
            v["sealed"], name("sealed"), MIN_SEALED_REVEAL_BYTES, MAX_SEALED_REVEAL_BYTES,
            REVEAL_ENTRY_BYTES,
        )
    )


_DECODERS: Final[dict[Kind, Callable[[Fields, str, Namer], Body]]] = {
    Kind.ANNOUNCE: _announce,
    Kind.LEAVE: _leave,
    Kind.INVITE: _invite,
    Kind.ACCEPT: _accept,
    Kind.DECLINE: _decline,
    Kind.START: _start,
    Kind.SHARE: _share,
    Kind.PARTIAL: _partial,
    Kind.ABORT: _abort,
    Kind.CHUNK: _chunk,
    Kind.MASKED_ACCEPT: _masked_accept,
    Kind.MASKED_START: _masked_start,
    Kind.KEYS: _keys,
    Kind.MASKED: _masked,
    Kind.SURVIVORS: _survivors,
    Kind.CONFIRM: _confirm,
    Kind.REVEAL: _reveal,
    Kind.SNAPSHOT_SHARE: decode_snapshot_share,
    Kind.SERVE: decode_serve,
    Kind.QUERY: decode_query,
    Kind.ANSWER: decode_answer,
}
