"""One aggregation session as an explicit, sans-IO state machine.

A :class:`Session` never touches the network or the clock: the node feeds it decoded,
signature-checked messages (``handle``) and the current time (``on_timeout``), and it answers
with a :class:`Step` — messages to send (:class:`Outgoing`) and the reasons of any inbound
message it refused. Its ``deadline`` says when the node must call ``on_timeout`` next. That keeps
the whole protocol unit-testable in memory (tests/test_session.py) with the real crypto.

Phases (``Phase``)::

    initiator: INVITING --all answered / invite timeout--> SHARING --> PARTIALS --> DONE
    member:    ACCEPTED --Start--> SHARING --> PARTIALS --> DONE
    any phase --timeout / Abort / too few members / inconsistent rebuild--> ABORTED

Security properties (docs/sessions.md gives the full threat model):

* Every member's vector leaves the member only as Shamir shares (threshold t >= 2), each sealed
  for its one recipient under a context binding network, session, sender, recipient and seq.
* A member returns one partial sum, and only over the *full* member list: it waits until it
  holds a share from every member. Partials over different contributor sets would let t - 1
  colluders (or a broker that drops chosen shares) difference two rebuilt sums and isolate one
  member's vector, so a member that vanishes before all its shares are out aborts the session;
  one that vanishes afterwards is tolerated down to t partials.
* Nothing is reconstructed unless t partials over the same (full) contributor set arrive; on
  abort the member discards every share it holds, so an abort reveals nothing.
* Every SHARE carries, sealed, the sender's digest of its START (member order, t, coordinates);
  a member sends its partial only once every share names its own view, so an initiator that
  tells members different orders or groups aborts the session before any partial exists.
* A group has at least max(3, c + 2) contributors (c = ``SessionParams.max_colluders``) and
  every member contributes a real update (a peer with nothing fresh declines), so c colluders
  learn at least the sum of two honest vectors, never one (docs/sessions.md section 3.3).
* The weight slot (each member adds 1.0) is rebuilt with the sum; a rebuilt count that differs
  from the contributor count exposes a corrupted partial and the session aborts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from crypto import shamir
from crypto.errors import CryptoError, SealError
from crypto.field import field_from_bytes, field_to_bytes
from crypto.sealing import SealContext, open_sealed, seal
from peer.network.session.common import (
    VIEW_DIGEST_BYTES,
    Contribution,
    GroupResult,
    Role,
    SessionContext,
    SessionDrop,
    SessionParams,
    SessionTimeouts,
    answer_indices,
    check_answer,
    group_decided,
    min_contributors,
    start_view_digest,
    validate_indices,
)
from peer.network.session.early import EarlyBudget, EarlyBuffer, held_size
from protocol import messages as m
from protocol.limits import MAX_MEMBERS, MIN_GROUP_SIZE, MIN_THRESHOLD

__all__ = [
    "Contribution", "GroupResult", "Outgoing", "Phase", "Role", "Session", "SessionContext",
    "SessionDrop", "SessionParams", "SessionTimeouts", "Step", "answer_indices",
    "check_answer", "group_decided", "validate_indices",
]

log = logging.getLogger(__name__)

_Drop = SessionDrop

_NO_INDICES = np.zeros(0, dtype=np.uint32)
_NO_VALUES = np.zeros(0, dtype=np.float32)

# Messages held while waiting for Start (shares/partials can overtake the Start from the
# initiator because MQTT only orders messages per publisher and topic) are bounded in bytes,
# per sender and in all: peer/network/session/early.py.


class Phase(Enum):
    INVITING = "inviting"
    ACCEPTED = "accepted"
    SHARING = "sharing"
    PARTIALS = "partials"
    DONE = "done"
    ABORTED = "aborted"


@dataclass(frozen=True)
class Outgoing:
    """A message to sign and publish on ``direct_topic(network, self, recipient)``."""

    recipient: str
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


class Session:
    """One aggregation session from this peer's point of view. Create with ``initiate`` or
    ``join``; then feed ``handle``/``on_timeout``/``abort`` and send what each returns."""

    def __init__(
        self,
        ctx: SessionContext,
        session_id: bytes,
        role: Role,
        contribution: Contribution,
        initiator: str,
        threshold: int,
        group_size: int,
        now: float,
    ) -> None:
        validate_indices(contribution.indices, ctx.params.param_count)
        if contribution.values.shape != contribution.indices.shape:
            raise ValueError("contribution values must match its indices")
        if not np.all(np.isfinite(contribution.values)):
            raise ValueError("contribution has non-finite values")
        self.ctx = ctx
        self.session_id = session_id
        self.role = role
        self.contribution = contribution
        self.initiator = initiator
        self.threshold = threshold
        self.group_size = group_size
        self.started_at = now
        self.phase = Phase.INVITING if role is Role.INITIATOR else Phase.ACCEPTED
        t = ctx.params.timeouts
        self.deadline = now + (t.invite_s if role is Role.INITIATOR else t.start_s)
        self.abort_reason: str | None = None
        self.result: GroupResult | None = None
        # initiator bookkeeping
        self.invited: list[str] = []
        self.accepted: dict[str, np.ndarray] = {}
        self.declined: set[str] = set()
        # after Start
        self.members: tuple[str, ...] = ()
        self.coordinates: np.ndarray = np.zeros(0, dtype=np.uint32)
        self._own_encoded: np.ndarray | None = None
        self._view = b""  # START-view digest (session_common.start_view_digest)
        self._shares: dict[str, shamir.Share] = {}  # sender -> share of sender's vector at my x
        self._partials: dict[str, shamir.Share] = {}  # sender -> partial at sender's x
        self._gone: set[str] = set()
        self._early: EarlyBuffer[tuple[m.Header, m.Body]] = EarlyBuffer(
            EarlyBudget.for_session(ctx.params.param_count, min(group_size,
                                                                ctx.params.group_size)))
        self._filled: tuple[np.ndarray, np.ndarray] = (_NO_INDICES, _NO_VALUES)

    # ------------------------------------------------------------------ construction
    @classmethod
    def initiate(
        cls,
        ctx: SessionContext,
        session_id: bytes,
        contribution: Contribution,
        invitees: list[str],
        now: float,
    ) -> tuple[Session, Step]:
        """Start a session: invite ``invitees`` (peers with our model, sampled at random).

        More than g - 1 invitees may be asked (over-inviting): the first g - 1 to accept form
        the group, and the rest are released with an ABORT. That raises the chance of a full
        group when many neighbours are busy or have nothing fresh.
        """
        p = ctx.params
        if not MIN_GROUP_SIZE - 1 <= len(invitees) <= MAX_MEMBERS - 1:
            raise ValueError(f"need between 2 and {MAX_MEMBERS - 1} invitees")
        if ctx.self_id in invitees or len(set(invitees)) != len(invitees):
            raise ValueError("invitees must be distinct and exclude self")
        group_size = min(len(invitees) + 1, p.group_size)
        s = cls(ctx, session_id, Role.INITIATOR, contribution, ctx.self_id, p.threshold,
                group_size, now)
        s.invited = list(invitees)
        invite = m.Invite(
            group_size=group_size,
            threshold=p.threshold,
            model_id=p.model_id,
            param_count=p.param_count,
            frac_bits=p.fixed_point.frac_bits,
        )
        step = Step([s._out(peer, m.Kind.INVITE, invite) for peer in invitees])
        return s, step

    @staticmethod
    def check_invite(params: SessionParams, invite: m.Invite) -> str | None:
        """Why this peer must decline ``invite`` on protocol grounds (None if acceptable)."""
        if invite.model_id != params.model_id or invite.param_count != params.param_count:
            return "model_mismatch"
        if invite.frac_bits != params.fixed_point.frac_bits:
            return "encoding_mismatch"
        if not min_contributors(params.max_colluders) <= invite.group_size <= min(
            MAX_MEMBERS, params.fixed_point.max_summands
        ):
            return "bad_group_size"
        # Our own threshold is our privacy floor: fewer partials may never rebuild our shares,
        # and our c colluders must hold fewer than t shares of anything.
        floor = max(MIN_THRESHOLD, params.threshold, params.max_colluders + 1)
        if not floor <= invite.threshold <= invite.group_size:
            return "bad_threshold"
        return None

    @classmethod
    def join(
        cls,
        ctx: SessionContext,
        header: m.Header,
        invite: m.Invite,
        contribution: Contribution,
        now: float,
    ) -> tuple[Session, Step]:
        """Accept an invite (the caller ran ``check_invite`` and knows we are free)."""
        s = cls(ctx, header.session, Role.MEMBER, contribution, header.sender, invite.threshold,
                invite.group_size, now)
        return s, Step([s._out(header.sender, m.Kind.ACCEPT, m.Accept(contribution.indices))])

    # ------------------------------------------------------------------ public API
    @property
    def finished(self) -> bool:
        return self.phase in (Phase.DONE, Phase.ABORTED)

    def participants(self) -> list[str]:
        """Every other peer this session has involved so far."""
        if self.members:
            return [p for p in self.members if p != self.ctx.self_id]
        if self.role is Role.INITIATOR:
            return list(self.invited)
        return [self.initiator]

    def handle(self, header: m.Header, body: m.Body, now: float) -> Step:
        """Process one authenticated message of this session (``header.session`` matches)."""
        step = Step()
        if self.finished:
            step.drops.append("session_finished")
            return step
        try:
            step.extend(self._dispatch(header, body, now))
        except _Drop as drop:
            log.debug("session %s: drop %s from %s: %s", self.session_id.hex()[:8],
                      header.kind.name, header.sender, drop.reason)
            step.drops.append(drop.reason)
        return step

    def on_timeout(self, now: float) -> Step:
        """Advance on time: past the deadline of the current phase, move on or abort."""
        if self.finished or now < self.deadline:
            return Step()
        if self.phase is Phase.INVITING:
            return self._fix_members(now)
        return self.abort(f"timeout_{self.phase.value}")

    def abort(self, reason: str) -> Step:
        """Abandon the session: discard every share and tell the other participants."""
        if self.finished:
            return Step()
        recipients = self.participants()
        if self.role is Role.INITIATOR and not self.members:
            recipients = [p for p in self.invited if p not in self.declined]
        self._enter_aborted(reason)
        return Step([self._out(p, m.Kind.ABORT, m.Abort(reason[:200])) for p in recipients])

    # ------------------------------------------------------------------ internals
    def _out(self, recipient: str, kind: m.Kind, body: m.Body) -> Outgoing:
        return Outgoing(recipient, kind, body, self.ctx.next_seq())

    def _seq_out(self, recipient: str, kind: m.Kind, make: Callable[[int], m.Body]) -> Outgoing:
        """An outgoing message whose body depends on its own seq (sealed bodies bind it)."""
        seq = self.ctx.next_seq()
        return Outgoing(recipient, kind, make(seq), seq)

    def _enter_aborted(self, reason: str) -> None:
        self.phase = Phase.ABORTED
        self.abort_reason = reason
        self._forget()

    def _forget(self) -> None:
        # Why: nothing received in a session outlives it; an aborted session must reveal nothing.
        self._shares.clear()
        self._partials.clear()
        self._early.clear()
        self._own_encoded = None

    def _dispatch(self, header: m.Header, body: m.Body, now: float) -> Step:
        kind = header.kind
        sender = header.sender
        if sender == self.ctx.self_id:
            raise _Drop("own_message")
        if kind is m.Kind.ABORT:
            assert isinstance(body, m.Abort)
            return self._on_abort(sender, body.reason, now)
        if self.phase is Phase.INVITING:
            if kind is m.Kind.ACCEPT:
                assert isinstance(body, m.Accept)
                return self._on_accept(sender, body, now)
            if kind is m.Kind.DECLINE:
                return self._on_decline(sender, now)
            raise _Drop("unexpected_kind")
        if kind in (m.Kind.ACCEPT, m.Kind.DECLINE):
            if self.role is Role.INITIATOR and sender in self.invited:
                # A late answer: the invitee was already released with an ABORT when the
                # group was fixed.
                return Step()
            raise _Drop("unexpected_kind")
        if self.phase is Phase.ACCEPTED:
            if kind is m.Kind.START:
                assert isinstance(body, m.Start)
                return self._on_start(header, body, now)
            if kind in (m.Kind.SHARE, m.Kind.PARTIAL):
                self._early.hold(sender, (header, body), held_size(body))
                return Step()
            raise _Drop("unexpected_kind")
        # SHARING or PARTIALS
        if kind is m.Kind.SHARE:
            assert isinstance(body, m.Share)
            return self._on_share(header, body, now)
        if kind is m.Kind.PARTIAL:
            assert isinstance(body, m.Partial)
            return self._on_partial(header, body, now)
        raise _Drop("unexpected_kind")

    # initiator ---------------------------------------------------------
    def _on_accept(self, sender: str, body: m.Accept, now: float) -> Step:
        check_answer(sender, self.invited, self.accepted, self.declined)
        self.accepted[sender] = answer_indices(body.indices, self.ctx.params.param_count)
        return self._maybe_fix_members(now)

    def _on_decline(self, sender: str, now: float) -> Step:
        check_answer(sender, self.invited, self.accepted, self.declined)
        self.declined.add(sender)
        return self._maybe_fix_members(now)

    def _maybe_fix_members(self, now: float) -> Step:
        if not group_decided(len(self.accepted), len(self.declined), len(self.invited),
                             self.group_size):
            return Step()
        return self._fix_members(now)

    def _fix_members(self, now: float) -> Step:
        accepted = list(self.accepted)[: self.group_size - 1]  # first to accept, first in
        members = (self.ctx.self_id, *accepted)
        if len(members) < max(self.threshold, min_contributors(self.ctx.params.max_colluders)):
            return self.abort("too_few_members")  # the sum invariant (docs/sessions.md 3.3)
        # Release invitees that are not in the group (not answered yet, or accepted too late).
        released = [p for p in self.invited if p not in accepted and p not in self.declined]
        release = Step([self._out(p, m.Kind.ABORT, m.Abort("not_selected")) for p in released])
        coords = np.unique(
            np.concatenate([self.contribution.indices, *(self.accepted[p] for p in accepted)])
        ).astype(np.uint32)
        start = m.Start(members=members, threshold=self.threshold, coordinates=coords)
        step = Step([self._out(p, m.Kind.START, start) for p in accepted])
        step.extend(release)
        step.extend(self._begin_sharing(members, coords, now))
        return step

    # member ------------------------------------------------------------
    def _on_start(self, header: m.Header, body: m.Start, now: float) -> Step:
        if header.sender != self.initiator:
            raise _Drop("start_not_from_initiator")
        members = tuple(body.members)
        me = self.ctx.self_id
        if not members or members[0] != self.initiator or me not in members:
            raise _Drop("bad_members")
        if len(set(members)) != len(members) or not (
            MIN_GROUP_SIZE <= len(members) <= self.group_size
        ):
            raise _Drop("bad_members")
        if body.threshold != self.threshold or len(members) < self.threshold:
            raise _Drop("bad_threshold")
        if len(members) < min_contributors(self.ctx.params.max_colluders):
            return self.abort("too_few_members")  # our sum invariant: never share into it
        try:
            coords = validate_indices(body.coordinates, self.ctx.params.param_count)
        except ValueError as exc:
            raise _Drop("bad_coordinates") from exc
        pos = np.searchsorted(coords, self.contribution.indices)
        if np.any(pos >= coords.size) or not np.array_equal(
            coords[np.minimum(pos, coords.size - 1)], self.contribution.indices
        ):
            raise _Drop("bad_coordinates")  # our own index set must be inside the union
        step = self._begin_sharing(members, coords, now)
        if self.finished:
            return step
        for h, b in self._early.take():
            step.extend(self.handle(h, b, now))
        return step

    # both --------------------------------------------------------------
    def _begin_sharing(self, members: tuple[str, ...], coords: np.ndarray, now: float) -> Step:
        ctx = self.ctx
        for peer in members:
            if peer != ctx.self_id and ctx.box_key_of(peer) is None:
                return self.abort("unknown_member")
        self.members = members
        self.coordinates = coords
        self.phase = Phase.SHARING
        self.deadline = now + ctx.params.timeouts.share_s
        fp = ctx.params.fixed_point
        dense = np.zeros(coords.size, dtype=np.float64)
        pos = np.searchsorted(coords, self.contribution.indices)
        # Clip to the encodable range instead of failing: a DP update is far inside it, and the
        # merge bounds the result anyway.
        dense[pos] = np.clip(self.contribution.values.astype(np.float64), -fp.max_abs, fp.max_abs)
        self._filled = self._fill_outside(coords, dense)
        secret = np.concatenate([dense, np.ones(1)])
        try:
            encoded = fp.encode(secret)
        except CryptoError as exc:
            log.warning("session %s: cannot encode own update: %s", self.session_id.hex()[:8], exc)
            return self.abort("encode_failed")
        self._own_encoded = encoded
        self._view = start_view_digest(ctx.params.network_id, self.session_id, members,
                                       self.threshold, coords)
        ctx.tap("own_vector", encoded)
        shares = shamir.split(encoded, n=len(members), t=self.threshold)
        step = Step()
        for position, peer in enumerate(members):
            share = shares[position]
            if peer == ctx.self_id:
                self._shares[peer] = share
                continue
            box_key = ctx.box_key_of(peer)
            assert box_key is not None
            payload = self._view + field_to_bytes(share.values)
            ctx.tap("share_plaintext", payload)
            step.out.append(
                self._seq_out(
                    peer,
                    m.Kind.SHARE,
                    lambda seq, peer=peer, key=box_key, payload=payload: m.Share(
                        recipient=peer,
                        sealed=seal(ctx.identity, key, self._context(ctx.self_id, peer, seq),
                                    payload),
                    ),
                )
            )
        step.extend(self._maybe_send_partial(now))
        return step

    def _fill_outside(self, coords: np.ndarray, dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Put our residual values on the coordinates outside our index set (if we can)."""
        fill = self.contribution.fill
        outside = np.setdiff1d(coords, self.contribution.indices, assume_unique=True)
        if fill is None or outside.size == 0:
            return _NO_INDICES, _NO_VALUES
        try:
            values = np.asarray(fill(outside), dtype=np.float32)
        except Exception:
            # A trainer-side failure must not cost the session: contribute zeros there.
            log.exception("session %s: residual fill failed", self.session_id.hex()[:8])
            return _NO_INDICES, _NO_VALUES
        if values.shape != outside.shape or not np.all(np.isfinite(values)):
            log.error("session %s: residual fill returned a bad array", self.session_id.hex()[:8])
            return _NO_INDICES, _NO_VALUES
        max_abs = self.ctx.params.fixed_point.max_abs
        values = np.clip(values, -max_abs, max_abs)
        dense[np.searchsorted(coords, outside)] = values.astype(np.float64)
        return outside.astype(np.uint32), values

    def _context(self, sender: str, recipient: str, seq: int) -> SealContext:
        return SealContext(
            network_id=self.ctx.params.network_id,
            session_id=self.session_id,
            sender=sender,
            recipient=recipient,
            seq=seq,
        )

    def _open(self, header: m.Header, recipient: str, sealed: bytes) -> bytes:
        """The plaintext of a SHARE or PARTIAL addressed to us; SessionDrop if it does not open
        under the context bound to this message."""
        me = self.ctx.self_id
        if recipient != me:
            raise _Drop("wrong_recipient")
        key = self.ctx.box_key_of(header.sender)
        if key is None:
            raise _Drop("unknown_member")
        try:
            return open_sealed(
                self.ctx.identity, key, self._context(header.sender, me, header.seq), sealed
            )
        except SealError as exc:
            raise _Drop("bad_seal") from exc

    def _field_values(self, plain: bytes) -> np.ndarray:
        """One field element per coordinate plus the weight slot; SessionDrop otherwise."""
        try:
            values = field_from_bytes(plain)
        except ValueError as exc:
            raise _Drop("bad_field_elements") from exc
        if values.shape != (self.coordinates.size + 1,):
            raise _Drop("bad_length")
        return values

    def _x_of(self, peer: str) -> int:
        return self.members.index(peer) + 1

    def _on_share(self, header: m.Header, body: m.Share, now: float) -> Step:
        sender = header.sender
        if sender not in self.members:
            raise _Drop("not_a_member")
        if sender in self._shares:
            raise _Drop("duplicate_share")
        if self.phase is not Phase.SHARING:
            raise _Drop("unexpected_kind")
        plain = self._open(header, body.recipient, body.sealed)
        if plain[:VIEW_DIGEST_BYTES] != self._view:  # the initiator told us different STARTs
            return self.abort("inconsistent_view")
        values = self._field_values(plain[VIEW_DIGEST_BYTES:])
        self._shares[sender] = shamir.Share(x=self._x_of(self.ctx.self_id), values=values)
        return self._maybe_send_partial(now)

    def _maybe_send_partial(self, now: float) -> Step:
        if self.phase is not Phase.SHARING or len(self._shares) < len(self.members):
            return Step()
        me = self.ctx.self_id
        partial = shamir.add_shares([self._shares[p] for p in self.members])
        self._partials[me] = partial
        contributors = tuple(sorted(self.members))
        payload = field_to_bytes(partial.values)
        self.ctx.tap("share_plaintext", payload)
        step = Step()
        for peer in self.members:
            if peer == me:
                continue
            key = self.ctx.box_key_of(peer)
            if key is None:
                return self.abort("unknown_member")
            step.out.append(
                self._seq_out(
                    peer,
                    m.Kind.PARTIAL,
                    lambda seq, peer=peer, key=key: m.Partial(
                        recipient=peer,
                        contributors=contributors,
                        sealed=seal(self.ctx.identity, key, self._context(me, peer, seq),
                                    payload),
                    ),
                )
            )
        self._shares.clear()  # the partial is all we need; drop individual shares early
        self.phase = Phase.PARTIALS
        self.deadline = now + self.ctx.params.timeouts.partial_s
        step.extend(self._maybe_rebuild())
        return step

    def _on_partial(self, header: m.Header, body: m.Partial, now: float) -> Step:
        sender = header.sender
        if sender not in self.members:
            raise _Drop("not_a_member")
        if tuple(body.contributors) != tuple(sorted(self.members)):
            raise _Drop("wrong_contributors")
        if sender in self._partials:
            raise _Drop("duplicate_partial")
        values = self._field_values(self._open(header, body.recipient, body.sealed))
        self._partials[sender] = shamir.Share(x=self._x_of(sender), values=values)
        return self._maybe_rebuild()

    def _maybe_rebuild(self) -> Step:
        me = self.ctx.self_id
        if self.phase is not Phase.PARTIALS or len(self._partials) < self.threshold:
            return Step()
        if me not in self._partials:
            return Step()
        chosen = [self._partials[me]] + [s for p, s in self._partials.items() if p != me]
        fp = self.ctx.params.fixed_point
        total = shamir.reconstruct(chosen[: self.threshold], t=self.threshold)
        decoded = fp.decode(total)
        count = float(decoded[-1])
        if abs(count - len(self.members)) > 0.5:
            return self.abort("inconsistent_sum")
        assert self._own_encoded is not None
        own = fp.decode(self._own_encoded)[:-1]
        self.result = GroupResult(
            session_id=self.session_id,
            role=self.role,
            members=self.members,
            contributors=tuple(sorted(self.members)),
            threshold=self.threshold,
            coordinates=self.coordinates,
            group_sum=decoded[:-1],
            own_values=own,
            own_round=self.contribution.round,
            filled_indices=self._filled[0],
            filled_values=self._filled[1],
        )
        self.phase = Phase.DONE
        self._forget()
        return Step()

    def _on_abort(self, sender: str, reason: str, now: float) -> Step:
        if sender == self.initiator and self.phase is Phase.ACCEPTED:
            released = reason == "not_selected"
            self._enter_aborted("not_selected" if released else "aborted_by_initiator")
            return Step()
        if self.role is Role.INITIATOR and self.phase is Phase.INVITING:
            if sender in self.invited and sender not in self.declined:
                self.accepted.pop(sender, None)
                self.declined.add(sender)
                return self._maybe_fix_members(now)
            raise _Drop("not_invited")
        if sender not in self.members:
            raise _Drop("not_a_member")
        self._gone.add(sender)
        if self.phase is Phase.SHARING and sender not in self._shares:
            # Its share will never come: we can never hold shares from every member.
            self._enter_aborted(f"member_aborted:{sender}")
            return Step()
        alive = len(self.members) - len(self._gone)
        if alive < self.threshold and len(self._partials) < self.threshold:
            self._enter_aborted("below_threshold")
        return Step()
