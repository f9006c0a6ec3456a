"""One aggregation session as an explicit, sans-IO state machine.

A :class:`Session` never touches the network or the clock: the node feeds it decoded,
signature-checked messages (``handle``) and the current time (``on_timeout``), and it answers
with a :class:`Step` — messages to send (:class:`Outgoing`) and the reasons of any inbound
message it refused. Its ``deadline`` says when the node must call ``on_timeout`` next. That
keeps the whole protocol unit-testable in memory (tests/test_session.py) with the real crypto.
What it shares with the masked kind (formation, early messages, the result) is
:class:`peer.network.session.group.GroupSession`.

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
from enum import Enum

import numpy as np

from crypto import shamir
from crypto.field import field_from_bytes, field_to_bytes
from crypto.sealing import seal
from peer.errors import DroppedError
from peer.network.session.common import (
    VIEW_DIGEST_BYTES,
    Contribution,
    GroupResult,
    Outgoing,
    Role,
    SessionContext,
    SessionParams,
    SessionTimeouts,
    Step,
    answer_indices,
    check_answer,
    check_start,
    group_decided,
    invite_group_size,
    start_view_digest,
    union_coordinates,
    validate_indices,
)
from peer.network.session.early import held_size
from peer.network.session.group import GroupSession
from protocol import messages as m

__all__ = [
    "Contribution", "GroupResult", "Outgoing", "Phase", "Role", "Session", "SessionContext",
    "SessionParams", "SessionTimeouts", "Step", "answer_indices", "check_answer",
    "group_decided", "validate_indices",
]

log = logging.getLogger(__name__)


class Phase(Enum):
    INVITING = "inviting"
    ACCEPTED = "accepted"
    SHARING = "sharing"
    PARTIALS = "partials"
    DONE = "done"
    ABORTED = "aborted"


class Session(GroupSession[np.ndarray]):
    """One aggregation session from this peer's point of view. Create with ``initiate`` or
    ``join``; then feed ``handle``/``on_timeout``/``abort`` and send what each returns."""

    def __init__(self, ctx: SessionContext, session_id: bytes, role: Role,
                 contribution: Contribution, initiator: str, threshold: int, group_size: int,
                 now: float) -> None:
        t = ctx.params.timeouts
        initiating = role is Role.INITIATOR
        super().__init__(ctx, session_id, role, contribution, initiator, threshold, group_size,
                         now, t.invite_s if initiating else t.start_s)
        self.phase = Phase.INVITING if initiating else Phase.ACCEPTED
        self._shares: dict[str, shamir.Share] = {}  # sender -> share of sender's vector at my x
        self._partials: dict[str, shamir.Share] = {}  # sender -> partial at sender's x
        self._gone: set[str] = set()

    # ------------------------------------------------------------------ construction
    @classmethod
    def initiate(cls, ctx: SessionContext, session_id: bytes, contribution: Contribution,
                 invitees: list[str], now: float) -> tuple[Session, Step]:
        """Start a session: invite ``invitees`` (peers with our model, sampled at random);
        the first g - 1 to accept form the group (common.invite_group_size)."""
        group_size = invite_group_size(ctx, invitees)
        s = cls(ctx, session_id, Role.INITIATOR, contribution, ctx.self_id,
                ctx.params.threshold, group_size, now)
        return s, s._invite(invitees)

    @classmethod
    def join(cls, ctx: SessionContext, header: m.Header, invite: m.Invite,
             contribution: Contribution, now: float) -> tuple[Session, Step]:
        """Accept an invite (the caller ran ``check_invite`` and knows we are free)."""
        s = cls(ctx, header.session, Role.MEMBER, contribution, header.sender, invite.threshold,
                invite.group_size, now)
        return s, Step([s._out(header.sender, m.Kind.ACCEPT, m.Accept(contribution.indices))])

    # ------------------------------------------------------------------ public API
    @property
    def finished(self) -> bool:
        return self.phase in (Phase.DONE, Phase.ABORTED)

    @property
    def inviting(self) -> bool:
        return self.phase is Phase.INVITING

    def held_counts(self) -> dict[str, int]:
        """Shares and partials held (``shares``, ``partials``) and messages held until START
        (``early``)."""
        return {"shares": len(self._shares), "partials": len(self._partials),
                "early": len(self._early)}

    def on_timeout(self, now: float) -> Step:
        """Advance on time: past the deadline of the current phase, move on or abort."""
        if self.finished or now < self.deadline:
            return Step()
        if self.phase is Phase.INVITING:
            return self._fix_members(now)
        return self.abort(f"timeout_{self.phase.value}")

    # ------------------------------------------------------------------ internals
    def _seq_out(self, recipient: str, kind: m.Kind, make: Callable[[int], m.Body]) -> Outgoing:
        """An outgoing message whose body depends on its own seq (sealed bodies bind it)."""
        seq = self.ctx.next_seq()
        return Outgoing(recipient, kind, make(seq), seq)

    def _close(self, reason: str | None) -> None:
        self.phase = Phase.DONE if reason is None else Phase.ABORTED
        self.abort_reason = reason
        # Why: nothing received in a session outlives it; an aborted session must reveal nothing.
        self._shares.clear()
        self._partials.clear()
        self._early.clear()
        self._own_encoded = None

    def _dispatch(self, header: m.Header, body: m.Body, now: float) -> Step:
        kind = header.kind
        sender = header.sender
        if sender == self.ctx.self_id:
            raise DroppedError("own_message")
        if kind is m.Kind.ABORT:
            assert isinstance(body, m.Abort)
            return self._on_abort(sender, body.reason, now)
        if self.phase is Phase.INVITING:
            if kind is m.Kind.ACCEPT:
                assert isinstance(body, m.Accept)
                check_answer(sender, self.invited, self.accepted, self.declined)
                self.accepted[sender] = answer_indices(body.indices, self.ctx.params.param_count)
                return self._maybe_fix_members(now)
            if kind is m.Kind.DECLINE:
                check_answer(sender, self.invited, self.accepted, self.declined)
                self.declined.add(sender)
                return self._maybe_fix_members(now)
            raise DroppedError("unexpected_kind")
        if kind in (m.Kind.ACCEPT, m.Kind.DECLINE):
            if self.role is Role.INITIATOR and sender in self.invited:
                # A late answer: the invitee was already released with an ABORT when the
                # group was fixed.
                return Step()
            raise DroppedError("unexpected_kind")
        if self.phase is Phase.ACCEPTED:
            if kind is m.Kind.START:
                assert isinstance(body, m.Start)
                return self._on_start(header, body, now)
            if kind in (m.Kind.SHARE, m.Kind.PARTIAL):
                self._early.hold(sender, (header, body), held_size(body))
                return Step()
            raise DroppedError("unexpected_kind")
        # SHARING or PARTIALS
        if kind is m.Kind.SHARE:
            assert isinstance(body, m.Share)
            return self._on_share(header, body, now)
        if kind is m.Kind.PARTIAL:
            assert isinstance(body, m.Partial)
            return self._on_partial(header, body, now)
        raise DroppedError("unexpected_kind")

    # initiator ---------------------------------------------------------
    def _fix_members(self, now: float) -> Step:
        group = self._chosen()
        if group is None:
            return self.abort("too_few_members")  # the sum invariant (docs/sessions.md 3.3)
        accepted, members = group
        release = self._release(accepted)
        coords = union_coordinates([self.contribution.indices,
                                    *(self.accepted[p] for p in accepted)])
        start = m.Start(members=members, threshold=self.threshold, coordinates=coords)
        step = Step([self._out(p, m.Kind.START, start) for p in accepted])
        step.extend(release)
        step.extend(self._begin_sharing(members, coords, now))
        return step

    # member ------------------------------------------------------------
    def _on_start(self, header: m.Header, body: m.Start, now: float) -> Step:
        if header.sender != self.initiator:
            raise DroppedError("start_not_from_initiator")
        checked = check_start(body.members, body.threshold, body.coordinates,
                              initiator=self.initiator, me=self.ctx.self_id,
                              group_size=self.group_size, expected_threshold=self.threshold,
                              params=self.ctx.params, own_indices=self.contribution.indices)
        if checked is None:
            return self.abort("too_few_members")  # our sum invariant: never share into it
        step = self._begin_sharing(*checked, now)
        if self.finished:
            return step
        step.extend(self._replay_early(now))
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
        if not self._encode_own(coords):
            return self.abort("encode_failed")
        encoded = self._own_encoded
        assert encoded is not None
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
                        sealed=seal(ctx.identity, key, self._box_context(ctx.self_id, peer, seq),
                                    payload),
                    ),
                )
            )
        step.extend(self._maybe_send_partial(now))
        return step

    def _open(self, header: m.Header, recipient: str, sealed: bytes) -> bytes:
        """The plaintext of a SHARE or PARTIAL addressed to us; DroppedError if it does not
        open under the context bound to this message."""
        if recipient != self.ctx.self_id:
            raise DroppedError("wrong_recipient")
        return self._open_box(header, sealed)

    def _field_values(self, plain: bytes) -> np.ndarray:
        """One field element per coordinate plus the weight slot; DroppedError otherwise."""
        try:
            values = field_from_bytes(plain)
        except ValueError as exc:
            raise DroppedError("bad_field_elements") from exc
        if values.shape != (self._vector_size(),):
            raise DroppedError("bad_length")
        return values

    def _x_of(self, peer: str) -> int:
        return self.members.index(peer) + 1

    def _on_share(self, header: m.Header, body: m.Share, now: float) -> Step:
        sender = header.sender
        if sender not in self.members:
            raise DroppedError("not_a_member")
        if sender in self._shares:
            raise DroppedError("duplicate_share")
        if self.phase is not Phase.SHARING:
            raise DroppedError("unexpected_kind")
        plain = self._open(header, body.recipient, body.sealed)
        if plain[:VIEW_DIGEST_BYTES] != self._view:  # the initiator told us different STARTs
            return self.abort("inconsistent_view")
        values = self._field_values(plain[VIEW_DIGEST_BYTES:])
        self._shares[sender] = shamir.Share(x=self._x_of(self.ctx.self_id), values=values)
        return self._maybe_send_partial(now)

    def _maybe_send_partial(self, now: float) -> Step:
        if self.phase is not Phase.SHARING or len(self._shares) < len(self.members):
            return Step()
        if len(self.members) < self._fewest():  # the sum invariant, checked where it counts:
            return self.abort("too_few_contributors")  # a partial is what lets a sum rebuild
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
                        sealed=seal(self.ctx.identity, key, self._box_context(me, peer, seq),
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
            raise DroppedError("not_a_member")
        if tuple(body.contributors) != tuple(sorted(self.members)):
            raise DroppedError("wrong_contributors")
        if sender in self._partials:
            raise DroppedError("duplicate_partial")
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
        total = shamir.reconstruct(chosen[: self.threshold], t=self.threshold)
        return self._conclude(total, tuple(sorted(self.members)))

    def _on_abort(self, sender: str, reason: str, now: float) -> Step:
        if sender == self.initiator and self.phase is Phase.ACCEPTED:
            released = reason == "not_selected"
            self._close("not_selected" if released else "aborted_by_initiator")
            return Step()
        if self.role is Role.INITIATOR and self.phase is Phase.INVITING:
            return self._invitee_left(sender, now)
        if sender not in self.members:
            raise DroppedError("not_a_member")
        self._gone.add(sender)
        if self.phase is Phase.SHARING and sender not in self._shares:
            # Its share will never come: we can never hold shares from every member.
            self._close(f"member_aborted:{sender}")
            return Step()
        alive = len(self.members) - len(self._gone)
        if alive < self.threshold and len(self._partials) < self.threshold:
            self._close("below_threshold")
        return Step()
