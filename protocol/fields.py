"""Field validators of the codec: one wire value in, one checked Python value out.

Each raises :class:`protocol.errors.FieldError` (or ``SizeLimitError``) naming the field, so a
receiver can count and log a drop by its exact cause. Used by :mod:`protocol.codec` for the
header and every body; :func:`check_survivor_list` is for the session, which knows the
members a SURVIVORS or CONFIRM list must be drawn from. :func:`chunk_span` is the one rule
for which bytes of a message a CHUNK carries (sender, decoder and reassembler share it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from protocol.errors import FieldError, SizeLimitError
from protocol.limits import (
    CHUNK_DIGEST_BYTES,
    CONTROL_CHARS_RE,
    EPHEMERAL_PUBLIC_BYTES,
    MAX_CHUNKS,
    MAX_MEMBERS,
    MAX_PAYLOAD_BYTES,
    MIN_CHUNK_DATA_BYTES,
    MIN_GROUP_SIZE,
    PEER_ID_RE,
    SEAL_OVERHEAD_BYTES,
)
from protocol.sparse import decode_indices


def _int(value: object, field: str, lo: int, hi: int) -> int:
    """An integer with lo <= value <= hi; bool is rejected although it subclasses int."""
    if type(value) is not int:
        raise FieldError(f"expected an integer, got {type(value).__name__}", field)
    if not lo <= value <= hi:
        raise FieldError(f"{value} out of range [{lo}, {hi}]", field)
    return value


def _bytes(value: object, field: str, lo: int, hi: int) -> bytes:
    if type(value) is not bytes:
        raise FieldError(f"expected bin, got {type(value).__name__}", field)
    if not lo <= len(value) <= hi:
        error = SizeLimitError if len(value) > hi else FieldError
        raise error(f"length {len(value)} out of range [{lo}, {hi}]", field)
    return value


def _peer_id(value: object, field: str) -> str:
    if type(value) is not str:
        raise FieldError(f"expected a str id, got {type(value).__name__}", field)
    if PEER_ID_RE.fullmatch(value) is None:
        raise FieldError(f"{value[:80]!r} is not a valid id ([a-z0-9][a-z0-9_-]{{0,63}})", field)
    return value


def _text(value: object, field: str, lo: int, hi: int) -> str:
    """Free text: lo..hi characters, valid UTF-8, no control characters."""
    if type(value) is not str:
        raise FieldError(f"expected a str, got {type(value).__name__}", field)
    if not lo <= len(value) <= hi:
        raise FieldError(f"length {len(value)} out of range [{lo}, {hi}]", field)
    if CONTROL_CHARS_RE.search(value):
        raise FieldError("control characters are not allowed", field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates can exist in a Python str, never on the wire
        raise FieldError("not encodable as UTF-8", field) from None
    return value


def _id_list(value: object, field: str, lo: int, hi: int) -> tuple[str, ...]:
    if type(value) is not list:
        raise FieldError(f"expected an array, got {type(value).__name__}", field)
    if not lo <= len(value) <= hi:
        raise FieldError(f"{len(value)} entries out of range [{lo}, {hi}]", field)
    ids = tuple(_peer_id(item, f"{field}[{i}]") for i, item in enumerate(value))
    if len(set(ids)) != len(ids):
        raise FieldError("entries must be unique", field)
    return ids


def _members(value: object, field: str, sender: str) -> tuple[str, ...]:
    """A session's ordered member list; ``members[0]`` is the initiator, i.e. the sender."""
    members = _id_list(value, field, MIN_GROUP_SIZE, MAX_MEMBERS)
    if members[0] != sender:
        raise FieldError("members[0] must be the initiator (the sender)", field)
    return members


def _key_list(value: object, field: str, count: int) -> tuple[bytes, ...]:
    """Exactly ``count`` distinct X25519 public keys (one per member, in member order)."""
    if type(value) is not list:
        raise FieldError(f"expected an array, got {type(value).__name__}", field)
    if len(value) != count:
        raise FieldError(f"{len(value)} keys for {count} members", field)
    keys = tuple(
        _bytes(item, f"{field}[{i}]", EPHEMERAL_PUBLIC_BYTES, EPHEMERAL_PUBLIC_BYTES)
        for i, item in enumerate(value)
    )
    if len(set(keys)) != len(keys):
        raise FieldError("keys must be unique (each member draws its own)", field)
    return keys


def _sealed_entries(value: object, field: str, lo: int, hi: int, entry: int) -> bytes:
    """A sealed blob of lo..hi bytes whose payload is a whole number of ``entry``-byte items."""
    sealed = _bytes(value, field, lo, hi)
    if (len(sealed) - SEAL_OVERHEAD_BYTES) % entry:
        raise FieldError(
            f"payload of {len(sealed) - SEAL_OVERHEAD_BYTES} bytes is not a whole number of "
            f"{entry}-byte entries",
            field,
        )
    return sealed


def check_survivor_list(
    members: Sequence[str], survivors: Sequence[str], field: str = "survivors"
) -> tuple[str, ...]:
    """SURVIVORS / CONFIRM against the session's START: distinct members, in member order.

    The decoder cannot check this (it holds no session state); the receiver's session does
    (docs/protocol.md section 7, step 12). FieldError otherwise; returns the list as a tuple.
    """
    listed = tuple(survivors)
    chosen = set(listed)
    if len(chosen) != len(listed) or tuple(p for p in members if p in chosen) != listed:
        raise FieldError("not distinct members of the session in member order", field)
    return listed


def _indices(value: object, field: str, min_count: int) -> np.ndarray:
    raw = _bytes(value, field, 0, MAX_PAYLOAD_BYTES)
    idx = decode_indices(raw, max_index=None, field=field)
    if idx.size < min_count:
        raise FieldError(f"at least {min_count} indices required", field)
    return idx


def chunk_span(index: int, count: int, total_bytes: int) -> tuple[int, int]:
    """The byte range ``[start, end)`` of a ``total_bytes`` message that chunk ``index`` of
    ``count`` carries: an even split, the first ``total_bytes % count`` chunks one byte longer.

    Every chunk is non-empty when ``count <= total_bytes``, and no chunk is longer than
    ``ceil(total_bytes / count)``, so a receiver can check each chunk's length exactly.
    """
    base, extra = divmod(total_bytes, count)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def _chunk_fields(
    digest: object, index: object, count: object, total_bytes: object, data: object,
    name: Callable[[str], str],
) -> tuple[bytes, int, int, int, bytes]:
    """CHUNK's fields, each against the others: 2 <= count <= ceil(total / MIN_CHUNK_DATA_BYTES)
    (so also <= MAX_CHUNKS), index < count, len(data) exactly its :func:`chunk_span`."""
    total = _int(total_bytes, name("total_bytes"), MIN_CHUNK_DATA_BYTES + 1, MAX_PAYLOAD_BYTES)
    most = min(MAX_CHUNKS, -(-total // MIN_CHUNK_DATA_BYTES))
    chunks = _int(count, name("count"), 2, most)
    position = _int(index, name("index"), 0, chunks - 1)
    start, end = chunk_span(position, chunks, total)
    return (
        _bytes(digest, name("digest"), CHUNK_DIGEST_BYTES, CHUNK_DIGEST_BYTES),
        position,
        chunks,
        total,
        _bytes(data, name("data"), end - start, end - start),
    )
