"""What both session kinds share: roles, parameters, the context a session runs in, a member's
contribution and its dense form, the result, what a step sends (:class:`Outgoing`,
:class:`Step`, in the wire's own ``protocol.messages`` kinds) and the checks of group formation.

:mod:`peer.network.session.shamir` (Shamir) and :mod:`peer.network.session.masked` (masked) build
on these, and on :class:`peer.network.session.group.GroupSession`; ``shamir`` re-exports them.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field, replace
from enum import Enum

import numpy as np

from crypto.field import PRIME, FixedPoint, field_to_bytes
from crypto.identity import Identity
from peer.errors import DroppedError
from protocol import messages as m
from protocol.limits import MAX_MEMBERS, MIN_GROUP_SIZE, MIN_THRESHOLD

log = logging.getLogger(__name__)

NO_INDICES = np.zeros(0, dtype=np.uint32)
NO_VALUES = np.zeros(0, dtype=np.float32)


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
    #: The fewest contributions any sum this peer helps reveal may hold; 0 (the default)
    #: means ``min_contributors(max_colluders)``, and a larger value only raises it (group
    #: noise: honest_min + c, docs/privacy.md "Group noise"). Part of the model id in group
    #: mode, so peers that disagree about it never group.
    min_sum: int = 0
    #: Group-noise sessions: every contribution carries pre-encoded field elements for every
    #: coordinate plus this member's model (:class:`Contribution`); the session vector is
    #: (field elements, encoded model, count slot).
    field_contributions: bool = False

    def __post_init__(self) -> None:
        if not MIN_GROUP_SIZE <= self.group_size <= min(MAX_MEMBERS, self.fixed_point.max_summands):
            raise ValueError(
                f"group_size must be in [{MIN_GROUP_SIZE}, "
                f"{min(MAX_MEMBERS, self.fixed_point.max_summands)}]"
            )
        if not MIN_THRESHOLD <= self.threshold <= self.group_size:
            raise ValueError(f"threshold must be in [{MIN_THRESHOLD}, group_size]")
        check_colluders(self.max_colluders, self.group_size, self.threshold)
        least = max(self.min_sum, min_contributors(self.max_colluders))
        if self.group_size < least:
            raise ValueError(f"a sum needs {least} contributors, more than group_size "
                             f"{self.group_size}")
        object.__setattr__(self, "min_sum", least)  # frozen: normalised once, here

    @property
    def vector_coordinates(self) -> int:
        """Coordinates a member's session vector can hold (the count slot aside): what the
        peer's buffers for session messages are sized by. Group noise doubles them (the
        field elements, then the model)."""
        return self.param_count * (2 if self.field_contributions else 1)


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


def group_min_sum(honest_min: int, max_colluders: int) -> int:
    """The fewest contributions a group-noise release may hold: h + c, so that at least h
    are honest (docs/privacy.md, "Group noise")."""
    return honest_min + max_colluders


def group_model_suffix(max_colluders: int) -> str:
    """What a group-noise peer appends to its trainer's model id (which names h, sigma_eff, C
    and the batch size): c, so peers that disagree about h + c never group."""
    return f"-c{max_colluders}"


#: What a group-noise peer in its averaging tail appends to its private model id, so that tail
#: members (who draw no noise share) and private-step members never form a session together
#: (docs/privacy.md, "The averaging tail").
GROUP_TAIL_SUFFIX = "-tail"


def averaging_tail_params(private: SessionParams) -> SessionParams:
    """The session parameters of a group-noise peer's averaging tail: the private ones with
    the tail's model id and plain (model-only) contributions; ``min_sum`` is kept."""
    if not private.field_contributions:
        raise ValueError("only a group-noise peer has an averaging tail")
    return replace(private, model_id=private.model_id + GROUP_TAIL_SUFFIX,
                               field_contributions=False)


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
    #: Group noise (``SessionParams.field_contributions``): canonical uint32 field elements,
    #: one per coordinate of the model (``indices`` then holds every coordinate), put on the
    #: wire as they are: no fixed-point encoding, no clipping (docs/privacy.md, "Group noise").
    field_values: np.ndarray | None = None
    #: Group noise: this member's model (float32, every coordinate), fixed-point encoded after
    #: the field elements, so the session also releases the members' model sum.
    model: np.ndarray | None = None


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
    #: Group noise: the rebuilt field sum of the members' field elements (uint32, before
    #: decoding) and the sum of their models (float64); None in other sessions.
    field_sum: np.ndarray | None = None
    model_sum: np.ndarray | None = None


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
    """An initiator's check of an invitee's ACCEPT or DECLINE: DroppedError unless ``sender``
    was invited and has not answered yet (both session kinds)."""
    if sender not in invited:
        raise DroppedError("not_invited")
    if sender in accepted or sender in declined:
        raise DroppedError("duplicate_answer")


def answer_indices(indices: np.ndarray, param_count: int) -> np.ndarray:
    """An ACCEPT's index set, checked (:func:`validate_indices`); DroppedError ``bad_indices``."""
    try:
        return validate_indices(indices, param_count)
    except ValueError as exc:
        raise DroppedError("bad_indices") from exc


def group_decided(accepted: int, declined: int, invited: int, group_size: int) -> bool:
    """Whether an initiator can fix its group: g − 1 accepted, or every invitee answered."""
    return accepted >= group_size - 1 or accepted + declined >= invited


@dataclass(frozen=True)
class Outgoing:
    """A message a session wants signed and published: direct to ``recipient`` on
    ``direct_topic(network, self, recipient)``, or, when ``recipient`` is None, on the sender's
    session topic of the session (every member reads it; ``m.SESSION_TOPIC_KINDS``)."""

    recipient: str | None
    kind: m.Kind
    body: m.Body
    seq: int


@dataclass
class Step:
    """What one event produced: messages to send and reasons of refused inbound messages."""

    out: list[Outgoing] = field(default_factory=list)
    drops: list[str] = field(default_factory=list)

    def extend(self, other: Step) -> None:
        self.out.extend(other.out)
        self.drops.extend(other.drops)


def check_contribution(contribution: Contribution, params: SessionParams) -> None:
    """ValueError unless ``contribution`` has a valid index set and finite values on it, and,
    in a group-noise session, field elements and a finite model for every coordinate."""
    validate_indices(contribution.indices, params.param_count)
    if contribution.values.shape != contribution.indices.shape:
        raise ValueError("contribution values must match its indices")
    if not np.all(np.isfinite(contribution.values)):
        raise ValueError("contribution has non-finite values")
    if not params.field_contributions:
        if contribution.field_values is not None or contribution.model is not None:
            raise ValueError("field elements in a session that does not carry them")
        return
    full = (params.param_count,)
    fv, model = contribution.field_values, contribution.model
    if contribution.indices.shape != full:
        raise ValueError("a group-noise contribution covers every coordinate")
    if fv is None or fv.dtype != np.uint32 or fv.shape != full or bool(np.any(fv >= PRIME)):
        raise ValueError("a group-noise contribution needs canonical field elements")
    if model is None or model.shape != full or not np.all(np.isfinite(model)):
        raise ValueError("a group-noise contribution needs its finite model")


def dense_contribution(contribution: Contribution, coords: np.ndarray, max_abs: float,
                       label: str = "session",
                       ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """A member's float64 values over the session's ``coords`` (sorted, holding its own
    indices) and the (indices, float32 values) its residual fill put outside its index set.

    Values are clipped to ``[-max_abs, max_abs]`` (the encodable range) instead of failing: a
    DP update is far inside it, and the merge bounds the result anyway. Without a fill, or when
    the fill fails or returns a wrong-shaped or non-finite array, the member contributes zeros
    outside its index set (a trainer-side failure must not cost the session) and reports no
    fill. Both session kinds and the reference engine (sim/reference.py) build their vector
    here; ``label`` names the caller in log lines.
    """
    dense = np.zeros(coords.size, dtype=np.float64)
    dense[np.searchsorted(coords, contribution.indices)] = np.clip(
        contribution.values.astype(np.float64), -max_abs, max_abs)
    outside = np.setdiff1d(coords, contribution.indices, assume_unique=True)
    if contribution.fill is None or outside.size == 0:
        return dense, (NO_INDICES, NO_VALUES)
    try:
        values = np.asarray(contribution.fill(outside), dtype=np.float32)
    except Exception:
        log.exception("%s: residual fill failed", label)
        return dense, (NO_INDICES, NO_VALUES)
    if values.shape != outside.shape or not np.all(np.isfinite(values)):
        log.error("%s: residual fill returned a bad array", label)
        return dense, (NO_INDICES, NO_VALUES)
    values = np.clip(values, -max_abs, max_abs)
    dense[np.searchsorted(coords, outside)] = values.astype(np.float64)
    return dense, (outside.astype(np.uint32), values)


def check_invite(params: SessionParams, invite: m.Invite) -> str | None:
    """Why this peer must decline ``invite`` on protocol grounds (None if acceptable)."""
    if invite.model_id != params.model_id or invite.param_count != params.param_count:
        return "model_mismatch"
    if invite.frac_bits != params.fixed_point.frac_bits:
        return "encoding_mismatch"
    if not params.min_sum <= invite.group_size <= min(
        MAX_MEMBERS, params.fixed_point.max_summands
    ):
        return "bad_group_size"
    # Our own threshold is our privacy floor: fewer partials may never rebuild our shares,
    # and our c colluders must hold fewer than t shares of anything.
    floor = max(MIN_THRESHOLD, params.threshold, params.max_colluders + 1)
    if not floor <= invite.threshold <= invite.group_size:
        return "bad_threshold"
    return None


def invite_group_size(ctx: SessionContext, invitees: Sequence[str]) -> int:
    """The group size an initiator asks ``invitees`` for; ValueError unless they are 2 to
    MAX_MEMBERS - 1 distinct peers other than itself.

    More than g - 1 invitees may be asked (over-inviting): the first g - 1 to accept form the
    group and the rest are released with an ABORT, which raises the chance of a full group
    when many neighbours are busy or have nothing fresh.
    """
    if not MIN_GROUP_SIZE - 1 <= len(invitees) <= MAX_MEMBERS - 1:
        raise ValueError(f"need between 2 and {MAX_MEMBERS - 1} invitees")
    if ctx.self_id in invitees or len(set(invitees)) != len(invitees):
        raise ValueError("invitees must be distinct and exclude self")
    return min(len(invitees) + 1, ctx.params.group_size)


def union_coordinates(index_sets: Sequence[np.ndarray]) -> np.ndarray:
    """The session's coordinates: the sorted union of the members' index sets."""
    return np.unique(np.concatenate(list(index_sets))).astype(np.uint32)


def check_start(members: Sequence[str], threshold: int, coordinates: np.ndarray, *,
                initiator: str, me: str, group_size: int, expected_threshold: int,
                params: SessionParams, own_indices: np.ndarray,
                ) -> tuple[tuple[str, ...], np.ndarray] | None:
    """An invitee's check of the group and coordinates a START names (both kinds).

    Returns (members, coordinates), or None when the group is smaller than this peer's sum
    invariant allows (the caller aborts: it never shares into it). DroppedError
    ``bad_members``, ``bad_threshold`` or ``bad_coordinates`` for a malformed START.
    """
    group = tuple(members)
    if (not group or group[0] != initiator or me not in group or len(set(group)) != len(group)
            or not MIN_GROUP_SIZE <= len(group) <= group_size):
        raise DroppedError("bad_members")
    if threshold != expected_threshold or len(group) < expected_threshold:
        raise DroppedError("bad_threshold")
    if len(group) < params.min_sum:
        return None
    try:
        coords = validate_indices(coordinates, params.param_count)
    except ValueError as exc:
        raise DroppedError("bad_coordinates") from exc
    pos = np.searchsorted(coords, own_indices)
    if np.any(pos >= coords.size) or not np.array_equal(
        coords[np.minimum(pos, coords.size - 1)], own_indices
    ):
        raise DroppedError("bad_coordinates")  # our own index set must be inside the union
    return group, coords
