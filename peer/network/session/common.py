"""What both session kinds share: roles, parameters, the context a session runs in, a member's
contribution, the result, and the initiator's checks of invitees' answers.

:mod:`peer.network.session.shamir` (Shamir) and :mod:`peer.network.session.masked` (masked) build
on these; ``peer.network.session.shamir`` re-exports them.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from crypto.field import FixedPoint, field_to_bytes
from crypto.identity import Identity
from peer.errors import DroppedError
from protocol.limits import MAX_MEMBERS, MIN_GROUP_SIZE, MIN_THRESHOLD


class Role(Enum):
    INITIATOR = "initiator"
    MEMBER = "member"


@dataclass(frozen=True)
class SessionTimeouts:
    """Per-phase timeouts in seconds."""

    invite_s: float = 2.0  # initiator: waiting for Accept/Decline
    start_s: float = 4.0  # invitee: waiting for Start after accepting
    share_s: float = 5.0  # waiting for every member's share after Start
    partial_s: float = 5.0  # waiting for t partials after sending ours


@dataclass(frozen=True)
class SessionParams:
    """What this peer requires of any session it joins or starts."""

    network_id: str
    model_id: str
    param_count: int
    group_size: int
    threshold: int
    fixed_point: FixedPoint = field(default_factory=FixedPoint)
    timeouts: SessionTimeouts = field(default_factory=SessionTimeouts)
    #: c, the number of colluding members (the initiator may be one of them) this peer's
    #: privacy must survive: every sum it reveals holds at least ``min_contributors(c)``
    #: contributions, and its threshold must exceed c (docs/sessions.md section 3.3).
    max_colluders: int = 1

    def __post_init__(self) -> None:
        if not MIN_GROUP_SIZE <= self.group_size <= min(MAX_MEMBERS, self.fixed_point.max_summands):
            raise ValueError(
                f"group_size must be in [{MIN_GROUP_SIZE}, "
                f"{min(MAX_MEMBERS, self.fixed_point.max_summands)}]"
            )
        if not MIN_THRESHOLD <= self.threshold <= self.group_size:
            raise ValueError(f"threshold must be in [{MIN_THRESHOLD}, group_size]")
        check_colluders(self.max_colluders, self.group_size, self.threshold)


#: Bytes of a START-view digest (BLAKE2b-256).
VIEW_DIGEST_BYTES = 32
_START_VIEW_DOMAIN = b"murmur/shamir-start-view/v1\x00"


def start_view_digest(network_id: str, session_id: bytes, members: Sequence[str],
                      threshold: int, coordinates: np.ndarray) -> bytes:
    """BLAKE2b-256 of everything a Shamir START tells a member: who holds which Shamir point
    (the member order), t and the coordinates.

    Every SHARE carries its sender's digest inside the seal, and a member sends its partial
    only once every member's share names the view it holds itself. An initiator that tells
    two members different orders or groups (their shares would then be evaluated at points
    the partials mix up, and two partials could be solved for both vectors) makes the session
    abort before any partial exists.
    """
    h = hashlib.blake2b(digest_size=VIEW_DIGEST_BYTES)
    h.update(_START_VIEW_DOMAIN + network_id.encode() + b"\x00" + session_id)
    for member in members:
        h.update(struct.pack(">H", len(member)) + member.encode())
    h.update(struct.pack(">I", threshold))
    h.update(np.ascontiguousarray(coordinates, dtype="<u4").tobytes())
    return h.digest()


def min_contributors(max_colluders: int) -> int:
    """Fewest contributions a revealed sum may hold: c + 2, and never fewer than 3.

    A coalition of c members learns the revealed sum minus its own vectors; with c + 2
    contributions that is still the sum of at least two honest vectors, never one.
    """
    return max(MIN_GROUP_SIZE, max_colluders + 2)


def check_colluders(max_colluders: int, group_size: int, threshold: int) -> None:
    """ValueError unless 1 <= c, a group of ``group_size`` can hold ``min_contributors(c)``
    members, and c < t (c members hold fewer than t Shamir shares of any honest secret)."""
    if type(max_colluders) is not int or max_colluders < 1:
        raise ValueError(f"max_colluders must be an integer >= 1 (got {max_colluders!r})")
    if group_size < min_contributors(max_colluders):
        raise ValueError(f"max_colluders={max_colluders} needs group_size >= "
                         f"{min_contributors(max_colluders)} (got {group_size})")
    if threshold <= max_colluders:
        raise ValueError(f"max_colluders={max_colluders} needs threshold >= "
                         f"{max_colluders + 1} (got {threshold})")


#: An audit read-out of the secrets a session draws or derives, called as ``tap(label,
#: secret)``: ``"session_key"`` (masked: K), ``"self_seed"`` and ``"ephemeral_private"``
#: (masked), ``"share_plaintext"`` (the field-element bytes of each Shamir share or partial
#: before sealing, and each KEYS and REVEAL payload), ``"own_vector"`` (the member's own
#: encoded vector, both kinds) and ``"masked_plaintext"`` (each masked vector before it is
#: sealed under K: the broker must not be able to add them up). Confidentiality audits hand
#: it a list and check that none of these bytes appear on the wire
#: (tests/test_confidentiality_mosquitto.py). A production peer leaves it unset.
SecretTap = Callable[[str, bytes], None]


@dataclass(frozen=True)
class SessionContext:
    """What a session needs from its peer: keys, peer lookup and the message counter.

    ``box_key_of`` returns the X25519 public key of an admitted peer (None if unknown);
    ``next_seq`` hands out the sender's sequence numbers (they are bound into each seal);
    ``secret_tap``, for audits only, receives every session secret (:data:`SecretTap`).
    """

    identity: Identity
    params: SessionParams
    box_key_of: Callable[[str], bytes | None]
    next_seq: Callable[[], int]
    secret_tap: SecretTap | None = None

    def tap(self, label: str, secret: bytes | np.ndarray) -> None:
        """Hand a session secret to the audit tap, if one is set (see :data:`SecretTap`); a
        field-element array is converted to its wire bytes only then."""
        if self.secret_tap is not None:
            as_bytes = field_to_bytes(secret) if isinstance(secret, np.ndarray) else secret
            self.secret_tap(label, bytes(as_bytes))

    @property
    def self_id(self) -> str:
        return self.identity.peer_id


@dataclass(frozen=True)
class Contribution:
    """A peer's update for one session: sorted unique uint32 indices and float32 values.

    ``fill``, when given, returns this peer's values on coordinates *outside* its own index set
    (its sharing strategy's :meth:`peer.sharing.SharingStrategy.fill`). Without it the peer
    contributes zeros there, and at a coordinate only one member selected the group sum is that
    member's value
    (docs/sessions.md, "Sparse supports"); with it every member contributes on every
    coordinate. The values used are reported in ``GroupResult.filled_*`` so the peer can
    remove them from its residual once the session is done.
    """

    indices: np.ndarray
    values: np.ndarray
    round: int = 0
    fill: Callable[[np.ndarray], np.ndarray] | None = None


@dataclass(frozen=True)
class GroupResult:
    """What a member holds after a successful session (the only thing it ever learns)."""

    session_id: bytes
    role: Role
    members: tuple[str, ...]
    contributors: tuple[str, ...]
    threshold: int
    coordinates: np.ndarray  # uint32 sorted unique
    group_sum: np.ndarray  # float64, sum of every contributor's vector on the coordinates
    own_values: np.ndarray  # float64, this member's contribution as encoded (fixed-point exact)
    own_round: int
    filled_indices: np.ndarray  # uint32: coordinates outside our index set we contributed on
    filled_values: np.ndarray  # float32: what we contributed there (0 entries if no fill)


class SessionDrop(DroppedError):
    """Refuse one inbound message of a session with a counted reason (both session kinds)."""


def validate_indices(indices: np.ndarray, param_count: int) -> np.ndarray:
    """Check an index set is a non-empty sorted unique uint32 array below ``param_count``."""
    idx = np.asarray(indices)
    if idx.ndim != 1 or idx.size == 0 or idx.dtype != np.uint32:
        raise ValueError("index set must be a non-empty 1-D uint32 array")
    if int(idx[-1]) >= param_count:
        raise ValueError("index out of range")
    if idx.size > 1 and not bool(np.all(idx[1:] > idx[:-1])):
        raise ValueError("index set must be sorted and unique")
    return idx


def check_answer(sender: str, invited: Sequence[str], accepted: Mapping[str, object],
                 declined: Set[str]) -> None:
    """An initiator's check of an invitee's ACCEPT or DECLINE: SessionDrop unless ``sender``
    was invited and has not answered yet (both session kinds)."""
    if sender not in invited:
        raise SessionDrop("not_invited")
    if sender in accepted or sender in declined:
        raise SessionDrop("duplicate_answer")


def answer_indices(indices: np.ndarray, param_count: int) -> np.ndarray:
    """An ACCEPT's index set, checked (:func:`validate_indices`); SessionDrop ``bad_indices``."""
    try:
        return validate_indices(indices, param_count)
    except ValueError as exc:
        raise SessionDrop("bad_indices") from exc


def group_decided(accepted: int, declined: int, invited: int, group_size: int) -> bool:
    """Whether an initiator can fix its group: g − 1 accepted, or every invitee answered."""
    return accepted >= group_size - 1 or accepted + declined >= invited
