"""Typed Murmur messages: the envelope header, one body dataclass per kind, and the result of
decoding (:class:`SignedMessage`).

The dataclasses are plain data; all validation lives in :mod:`protocol.codec`, which checks
every field both when encoding (so a peer never emits what another peer must reject) and when
decoding untrusted bytes. docs/protocol.md gives each body's fields in wire order.

Kinds 1-9 are the Shamir session, the Python peer's default. Kinds 10-16 are the masked
session (docs/design/masked-sessions.md), added within wire version 2: specified and
decodable, sent by the node only in masked mode (``[session] kind = "masked"``). A receiver
that does not speak them drops them as an unknown kind, so adding them breaks no peer.

Kind 17, CHUNK, carries one numbered piece of a larger signed wire message, so that
every payload fits a broker's packet limit (protocol/chunks.py; docs/protocol.md section 11).

Kinds 18-21 are private predictions (docs/inference.md); their bodies and decoders are in
protocol/inference.py. A training peer never subscribes to their topics from a client and
drops them from an unknown sender like any other message.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

import numpy as np

from protocol.inference import Answer, Query, Serve, SnapshotShare

# 2: ANNOUNCE and LEAVE carry the connection id that binds a leave (or a last will) to the
# connection it announced (docs/protocol.md, "Leaving"). Version 1 peers are not understood.
PROTOCOL_VERSION: Final = 3


class Kind(IntEnum):
    """Message kinds; the integer value is what travels on the wire."""

    ANNOUNCE = 1
    LEAVE = 2
    INVITE = 3
    ACCEPT = 4
    DECLINE = 5
    START = 6
    SHARE = 7
    PARTIAL = 8
    ABORT = 9
    # masked session: sent only with [session] kind = "masked"
    MASKED_ACCEPT = 10
    MASKED_START = 11
    KEYS = 12
    MASKED = 13
    SURVIVORS = 14
    CONFIRM = 15
    REVEAL = 16
    # chunked messages: a piece of a message larger than the sender's maximum
    CHUNK = 17
    # private predictions (docs/inference.md): header session = the snapshot id
    SNAPSHOT_SHARE = 18
    SERVE = 19
    QUERY = 20
    ANSWER = 21


#: Kinds that belong to no aggregation session: their header carries an empty session id.
SESSIONLESS_KINDS: Final = frozenset({Kind.ANNOUNCE, Kind.LEAVE})

#: Kinds published on the sender's session topic (every member reads them); every other
#: session kind is a direct message to one peer.
SESSION_TOPIC_KINDS: Final = frozenset({Kind.MASKED, Kind.CONFIRM, Kind.REVEAL})


@dataclass(frozen=True)
class Header:
    """Envelope fields shared by every kind; all are covered by the signature.

    ``session`` is ``b""`` for ANNOUNCE and LEAVE and 16 random bytes otherwise. ``seq`` is the
    sender's strictly increasing message counter (see :class:`SequenceCounter`).
    """

    version: int
    network: str
    kind: Kind
    sender: str
    session: bytes
    seq: int


@dataclass(frozen=True)
class Announce:
    """A peer's signed presence: its admission certificate and the model it trains.

    Published retained on the peer's announce topic. ``connection`` is 16 random bytes drawn
    for each broker connection; only a LEAVE naming the same connection can remove the peer.
    """

    certificate: bytes
    model_id: str
    param_count: int
    connection: bytes


@dataclass(frozen=True)
class Leave:
    """A departure, published retained on the peer's announce topic.

    Sent by the peer when it stops, or held by the broker as the peer's last will for
    ``connection`` (signed when that connection was opened). Receivers act on it only while
    ``connection`` is the one the peer's current announcement names, so a will or leave
    captured from an earlier connection cannot remove the peer later.
    """

    reason: str
    connection: bytes


@dataclass(frozen=True)
class Invite:
    """The initiator asks a peer to join a session of ``group_size`` members, threshold t."""

    group_size: int
    threshold: int
    model_id: str
    param_count: int
    frac_bits: int


def _arrays_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a, b))


@dataclass(frozen=True, eq=False)
class Accept:
    """An invitee joins, sending its top-k index set (sorted unique uint32)."""

    indices: np.ndarray

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Accept) and _arrays_equal(self.indices, other.indices)

    __hash__ = None  # type: ignore[assignment]  # holds a mutable array


@dataclass(frozen=True)
class Decline:
    """An invitee refuses (busy, wrong model, ...)."""

    reason: str


@dataclass(frozen=True, eq=False)
class Start:
    """The initiator fixes the group and the coordinate set.

    ``members`` is ordered: the member at position i holds Shamir x-coordinate ``i + 1``, and
    ``members[0]`` is the initiator (the decoder checks it equals the sender). ``coordinates``
    is the sorted unique union of the members' index sets.
    """

    members: tuple[str, ...]
    threshold: int
    coordinates: np.ndarray

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Start)
            and self.members == other.members
            and self.threshold == other.threshold
            and _arrays_equal(self.coordinates, other.coordinates)
        )

    __hash__ = None  # type: ignore[assignment]  # holds a mutable array


@dataclass(frozen=True)
class Share:
    """One member's Shamir share for ``recipient``, sealed for that recipient only."""

    recipient: str
    sealed: bytes


@dataclass(frozen=True)
class Partial:
    """A member's sealed sum of the shares it holds from ``contributors``."""

    recipient: str
    contributors: tuple[str, ...]
    sealed: bytes


@dataclass(frozen=True)
class Abort:
    """The session is abandoned; receivers discard everything they hold for it."""

    reason: str


# --------------------------------------------------------------------------------------------
# masked session. INVITE, DECLINE and ABORT keep the bodies above.


@dataclass(frozen=True, eq=False)
class MaskedAccept:
    """An invitee joins a masked session: its index set (as ACCEPT) and a fresh X25519 public
    key drawn for this session only; long-term keys never key a mask."""

    indices: np.ndarray
    ephemeral_public: bytes

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, MaskedAccept)
            and _arrays_equal(self.indices, other.indices)
            and self.ephemeral_public == other.ephemeral_public
        )

    __hash__ = None  # type: ignore[assignment]  # holds a mutable array


@dataclass(frozen=True, eq=False)
class MaskedStart:
    """The initiator fixes a masked group (one START per member, direct).

    ``members``, ``threshold`` and ``coordinates`` as in :class:`Start`; ``ephemeral_publics``
    holds one 32-byte X25519 key per member, in member order. ``session_key`` is the session
    key K sealed (crypto.sealing, Box) for ``recipient`` alone, so only members hold K. The
    keys are relayed unsigned by their owners: each member compares its view through KEYS.
    """

    members: tuple[str, ...]
    threshold: int
    coordinates: np.ndarray
    ephemeral_publics: tuple[bytes, ...]
    recipient: str
    session_key: bytes

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, MaskedStart)
            and self.members == other.members
            and self.threshold == other.threshold
            and _arrays_equal(self.coordinates, other.coordinates)
            and tuple(self.ephemeral_publics) == tuple(other.ephemeral_publics)
            and self.recipient == other.recipient
            and self.session_key == other.session_key
        )

    __hash__ = None  # type: ignore[assignment]  # holds a mutable array


@dataclass(frozen=True)
class Keys:
    """Sealed (Box) for ``recipient``: the sender's START-view digest and its Shamir shares,
    at the recipient's x, of its ephemeral secret key and of its self-mask seed."""

    recipient: str
    sealed: bytes


@dataclass(frozen=True)
class Masked:
    """On the session topic: the sender's masked vector, session-sealed under K."""

    sealed: bytes


@dataclass(frozen=True)
class Survivors:
    """Initiator to each member: whose MASKED arrived before the deadline, in member order."""

    survivors: tuple[str, ...]


@dataclass(frozen=True)
class Confirm:
    """On the session topic: the survivor list the sender received; the envelope signature
    covers (session, list), so a member cannot deny the list it confirmed."""

    survivors: tuple[str, ...]


@dataclass(frozen=True)
class Reveal:
    """On the session topic, session-sealed: per member, a share of its self seed (survivor)
    or of its ephemeral key (dropped), never both for one member."""

    sealed: bytes


@dataclass(frozen=True)
class Chunk:
    """Piece ``index`` of ``count`` of one complete signed wire message (the *inner* message).

    ``digest`` is BLAKE2b-256 of the whole inner message, ``total_bytes`` its length; ``data``
    is bytes ``chunk_span(index, count, total_bytes)`` of it (an even split,
    protocol.fields.chunk_span). The inner message is signed (and sealed where private) on its
    own, so a chunk exposes nothing the whole message would not; the chunk's own envelope is
    signed too, so a forged or replayed chunk is dropped before it is buffered.
    """

    digest: bytes
    index: int
    count: int
    total_bytes: int
    data: bytes


Body = (
    Announce | Leave | Invite | Accept | Decline | Start | Share | Partial | Abort
    | MaskedAccept | MaskedStart | Keys | Masked | Survivors | Confirm | Reveal | Chunk
    | SnapshotShare | Serve | Query | Answer
)

#: The body class of each kind (the codec refuses a body that does not match its header kind).
BODY_TYPES: Final[dict[Kind, type]] = {
    Kind.ANNOUNCE: Announce,
    Kind.LEAVE: Leave,
    Kind.INVITE: Invite,
    Kind.ACCEPT: Accept,
    Kind.DECLINE: Decline,
    Kind.START: Start,
    Kind.SHARE: Share,
    Kind.PARTIAL: Partial,
    Kind.ABORT: Abort,
    Kind.MASKED_ACCEPT: MaskedAccept,
    Kind.MASKED_START: MaskedStart,
    Kind.KEYS: Keys,
    Kind.MASKED: Masked,
    Kind.SURVIVORS: Survivors,
    Kind.CONFIRM: Confirm,
    Kind.REVEAL: Reveal,
    Kind.CHUNK: Chunk,
    Kind.SNAPSHOT_SHARE: SnapshotShare,
    Kind.SERVE: Serve,
    Kind.QUERY: Query,
    Kind.ANSWER: Answer,
}


@dataclass(frozen=True, eq=False)
class SignedMessage:
    """A decoded, structurally valid message.

    ``signed_bytes`` are exactly the bytes the sender signed, as received; verify
    ``signature`` over them with the sender's key (never over a re-encoding). Decoding proves
    only well-formedness: the signature, the sender's certificate and the replay window are
    still to be checked by the caller.
    """

    header: Header
    body: Body
    signed_bytes: bytes
    signature: bytes

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, SignedMessage)
            and self.header == other.header
            and self.body == other.body
            and self.signed_bytes == other.signed_bytes
            and self.signature == other.signature
        )

    __hash__ = None  # type: ignore[assignment]  # body may hold a mutable array


class SequenceCounter:
    """Per-sender message counter: starts at ``time.time_ns() // 1000`` and adds one per message.

    Starting from the wall clock in microseconds means a restarted peer (even after SIGKILL,
    with nothing persisted) continues above every number it used before, as long as it sent
    fewer than one message per microsecond and the clock did not step back. Thread-safe.
    """

    def __init__(self, start: int | None = None) -> None:
        first = time.time_ns() // 1000 if start is None else start
        if not 0 <= first < (1 << 63):
            raise ValueError(f"sequence start {first} outside 0 <= seq < 2**63")
        self._lock = threading.Lock()
        self._counter = itertools.count(first)

    def next(self) -> int:
        """Return the next sequence number (never the same one twice)."""
        with self._lock:
            return next(self._counter)
