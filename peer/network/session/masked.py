"""One masked aggregation session as a sans-IO state machine (``[session] kind = "masked"``).

The design is docs/design/masked-sessions.md (rules 1-7); the arithmetic is crypto/masking.py;
the messages are peer/network/session/masked_messages.py. Like peer/network/session/shamir.py, a
:class:`MaskedSession` never touches the network or the clock: the node feeds it authenticated
messages (``handle``) and the time (``on_timeout``) and sends what each call returns. Its
messages are the wire's own kinds (MASKED_ACCEPT, MASKED_START, KEYS, MASKED, SURVIVORS,
CONFIRM, REVEAL, and INVITE, DECLINE and ABORT as the Shamir session has them); a wire kind it
does not speak is a counted ``unexpected_kind`` drop. What it shares with the Shamir kind is
:class:`peer.network.session.group.GroupSession`; its state and agreement stage are
:class:`peer.network.session.masked_agreement.MaskedAgreement`.

Phases (``MaskedPhase``)::

    initiator: INVITING --answers / invite timeout--> KEYS
    invitee:   ACCEPTED --START--> KEYS
    KEYS --every other member's KEYS--> MASKED --SURVIVORS--> CONFIRMING
         --quorum of matching CONFIRMs--> REVEALING --t REVEALs + survivors' MASKED--> DONE
    any phase --timeout / ABORT / equivocation / too few survivors--> ABORTED

Security properties:

* The input leaves a member only inside one masked vector (crypto.masking.mask_vector),
  session-sealed under K, and its secrets only as Shamir shares sealed for one member each.
* A member masks only once it holds KEYS from every other member, each carrying the same
  START view digest (group, threshold, coordinates, ephemeral keys, K), sealed pairwise under
  long-term keys: an initiator cannot hand two honest members different keys or groups, and
  every survivor holds a share of every dropped member's ephemeral key.
* What happens once the masked vectors are out (SURVIVORS, the CONFIRM quorum, REVEAL and the
  sum, and the sum invariant) is :class:`peer.network.session.masked_agreement.MaskedAgreement`,
  this class's base; its properties are listed there.
* Every bad input is a counted drop (``Step.drops``); aborts discard every share held.
"""

from __future__ import annotations

import os

import numpy as np

from crypto import masking
from crypto.errors import CryptoError
from crypto.field import field_from_bytes, field_to_bytes
from crypto.sealing import seal
from peer.errors import DroppedError
from peer.network.session import masked_messages as mm
from peer.network.session.common import (
    Contribution,
    Outgoing,
    Role,
    SessionContext,
    Step,
    answer_indices,
    check_answer,
    check_start,
    invite_group_size,
    union_coordinates,
)
from peer.network.session.early import held_size
from peer.network.session.masked_agreement import HeldShares, MaskedAgreement, MaskedPhase
from peer.network.session.masked_messages import MaskedTimeouts
from protocol import messages as m

__all__ = ["MaskedPhase", "MaskedSession"]

Kind = m.Kind
_EARLY_KINDS = (Kind.KEYS, Kind.MASKED, Kind.CONFIRM, Kind.REVEAL)


class MaskedSession(MaskedAgreement):
    """One masked session from this member's point of view; create with ``initiate``/``join``."""

    # ------------------------------------------------------------------ construction
    @classmethod
    def initiate(cls, ctx: SessionContext, session_id: bytes, contribution: Contribution,
                 invitees: list[str], now: float,
                 timeouts: MaskedTimeouts | None = None) -> tuple[MaskedSession, Step]:
        """Invite ``invitees``; the first g - 1 to accept form the group."""
        group_size = invite_group_size(ctx, invitees)
        s = cls(ctx, session_id, Role.INITIATOR, contribution, ctx.self_id,
                ctx.params.threshold, group_size, now, timeouts or MaskedTimeouts())
        return s, s._invite(invitees)

    @classmethod
    def join(cls, ctx: SessionContext, header: m.Header, invite: m.Invite,
             contribution: Contribution, now: float,
             timeouts: MaskedTimeouts | None = None) -> tuple[MaskedSession, Step]:
        """Accept an invite (the caller ran ``check_invite`` and knows we are free)."""
        s = cls(ctx, header.session, Role.MEMBER, contribution, header.sender, invite.threshold,
                invite.group_size, now, timeouts or MaskedTimeouts())
        assert s._key is not None
        accept = mm.Accept(contribution.indices, s._key.public)
        return s, Step([s._out(header.sender, Kind.MASKED_ACCEPT, accept)])

    # ------------------------------------------------------------------ public API
    def participants(self) -> list[str]:
        """Every other peer this session has involved and not lost: an invitee that declined
        is not one."""
        return self._abort_recipients()

    def handle(self, header: m.Header, body: m.Body, now: float) -> Step:
        """Process one authenticated message; bad input is a counted drop, never an exception.
        A wire kind this session does not speak (SHARE, PARTIAL, the Shamir ACCEPT and START)
        is ``unexpected_kind`` whatever the phase."""
        if header.kind not in mm.BODY_TYPES:
            return Step(drops=["unexpected_kind"])
        return super().handle(header, body, now)

    def on_timeout(self, now: float) -> Step:
        """Past the current phase's deadline: fix the group, send SURVIVORS, or abort."""
        if self.finished or now < self.deadline:
            return Step()
        if self.phase is MaskedPhase.INVITING:
            return self._fix_members(now)
        if self.phase is MaskedPhase.MASKED and self.role is Role.INITIATOR:
            return self._send_survivors(now)
        return self.abort(f"timeout_{self.phase.value}")

    # ------------------------------------------------------------------ internals
    def _dispatch(self, header: m.Header, body: m.Body, now: float) -> Step:
        kind, sender = header.kind, header.sender
        if header.session != self.session_id:
            raise DroppedError("wrong_session")
        if sender == self.ctx.self_id:
            raise DroppedError("own_message")
        if not isinstance(body, mm.BODY_TYPES[kind]):
            raise DroppedError("body_mismatch")
        if kind in (Kind.ABORT, Kind.DECLINE):  # a DECLINE is the invitee's ABORT here
            return self._on_abort(sender, body.reason, now)  # type: ignore[union-attr]
        if self.phase is MaskedPhase.INVITING:
            if kind is Kind.MASKED_ACCEPT:
                return self._on_accept(sender, body, now)  # type: ignore[arg-type]
            raise DroppedError("unexpected_kind")
        if self.phase is MaskedPhase.ACCEPTED:
            if kind is Kind.MASKED_START:
                return self._on_start(header, body, now)  # type: ignore[arg-type]
            if kind in _EARLY_KINDS:  # direct and topic messages may overtake START
                self._early.hold(sender, (header, body), held_size(body))
                return Step()
            raise DroppedError("unexpected_kind")
        if kind is Kind.MASKED_ACCEPT and self._late_answer(sender):
            return Step()
        if sender not in self.members:
            raise DroppedError("not_a_member")
        handlers = {Kind.KEYS: self._on_keys, Kind.MASKED: self._on_masked,
                    Kind.SURVIVORS: self._on_survivors, Kind.CONFIRM: self._on_confirm,
                    Kind.REVEAL: self._on_reveal}
        if kind not in handlers:
            raise DroppedError("unexpected_kind")
        return handlers[kind](header, body, now)  # type: ignore[operator]

    # initiator: group formation -------------------------------------------
    def _on_accept(self, sender: str, body: mm.Accept, now: float) -> Step:
        check_answer(sender, self.invited, self.accepted, self.declined)
        idx = answer_indices(body.indices, self.ctx.params.param_count)
        public = bytes(body.ephemeral_public)
        assert self._key is not None
        known = {self._key.public} | {pub for _, pub in self.accepted.values()}
        if len(public) != mm.EPHEMERAL_PUBLIC_BYTES or public in known:
            raise DroppedError("bad_ephemeral_key")
        self.accepted[sender] = (idx, public)
        return self._maybe_fix_members(now)

    def _fix_members(self, now: float) -> Step:
        group = self._chosen()
        if group is None:
            return self.abort("too_few_members")  # the sum invariant (docs/sessions.md 3.3)
        chosen, members = group
        step = self._release(chosen)
        coords = union_coordinates([self.contribution.indices,
                                    *(self.accepted[p][0] for p in chosen)])
        assert self._key is not None
        publics = (self._key.public, *(self.accepted[p][1] for p in chosen))
        session_key = os.urandom(mm.SESSION_KEY_BYTES)
        for peer in chosen:
            box_key = self.ctx.box_key_of(peer)
            if box_key is None:
                return self.abort("unknown_member")
            seq = self.ctx.next_seq()
            sealed = seal(self.ctx.identity, box_key,
                          self._box_context(self.ctx.self_id, peer, seq), session_key)
            start = mm.Start(members, self.threshold, coords, publics, peer, sealed)
            step.out.append(Outgoing(peer, Kind.MASKED_START, start, seq))
        step.extend(self._begin_keys(members, coords, publics, session_key, now))
        return step

    # invitee: START -------------------------------------------------------
    def _on_start(self, header: m.Header, body: mm.Start, now: float) -> Step:
        me = self.ctx.self_id
        if header.sender != self.initiator:
            raise DroppedError("not_from_initiator")
        if body.recipient != me:
            raise DroppedError("wrong_recipient")
        checked = check_start(body.members, body.threshold, body.coordinates,
                              initiator=self.initiator, me=me, group_size=self.group_size,
                              expected_threshold=self.threshold, params=self.ctx.params,
                              own_indices=self.contribution.indices)
        if checked is None:
            return self.abort("too_few_members")  # our sum invariant: never mask into it
        members, coords = checked
        publics = tuple(bytes(p) for p in body.ephemeral_publics)
        assert self._key is not None
        if (len(publics) != len(members) or len(set(publics)) != len(publics)
                or any(len(p) != mm.EPHEMERAL_PUBLIC_BYTES for p in publics)
                or publics[members.index(me)] != self._key.public):
            raise DroppedError("bad_ephemeral_keys")
        key = self._open_box(header, body.session_key)
        if len(key) != mm.SESSION_KEY_BYTES:
            raise DroppedError("bad_session_key")
        step = self._begin_keys(members, coords, publics, key, now)
        step.extend(self._replay_early(now))
        return step

    # both: KEYS and MASKED ------------------------------------------------
    def _begin_keys(self, members: tuple[str, ...], coords: np.ndarray,
                    publics: tuple[bytes, ...], session_key: bytes, now: float) -> Step:
        ctx, me = self.ctx, self.ctx.self_id
        for peer in members:
            if peer != me and ctx.box_key_of(peer) is None:
                return self.abort("unknown_member")
        self.members, self.coordinates, self._session_key = members, coords, session_key
        ctx.tap("session_key", session_key)
        self.publics = dict(zip(members, publics, strict=True))
        self._view = mm.view_digest(ctx.params.network_id, self.session_id, members,
                                    self.threshold, coords, publics, session_key)
        if not self._encode_own(coords):
            return self.abort("encode_failed")
        assert self._key is not None and self._self_seed is not None
        g = len(members)
        eph = masking.share_secret(self._key.private, n=g, t=self.threshold)
        seeds = masking.share_secret(self._self_seed, n=g, t=self.threshold)
        step = Step()
        for pos, peer in enumerate(members):
            if peer == me:
                self._held[me] = HeldShares(eph[pos].values, seeds[pos].values)
                continue
            seq = ctx.next_seq()
            payload = mm.encode_keys(self._view, eph[pos].values, seeds[pos].values)
            ctx.tap("share_plaintext", payload)
            sealed = seal(ctx.identity, ctx.box_key_of(peer) or b"",
                          self._box_context(me, peer, seq), payload)
            step.out.append(Outgoing(peer, Kind.KEYS, mm.Keys(peer, sealed), seq))
        self._enter(MaskedPhase.KEYS, now, self.timeouts.keys_s)
        step.extend(self._maybe_publish_masked(now))
        return step

    def _on_keys(self, header: m.Header, body: mm.Keys, now: float) -> Step:
        if body.recipient != self.ctx.self_id:
            raise DroppedError("wrong_recipient")
        if header.sender in self._held:
            raise DroppedError("duplicate_keys")
        if self.phase is not MaskedPhase.KEYS:
            raise DroppedError("unexpected_kind")
        try:
            view, eph, seed = mm.decode_keys(self._open_box(header, body.sealed))
        except ValueError as exc:
            raise DroppedError("bad_keys_payload") from exc
        if view != self._view:  # the initiator told the sender another group, keys or K
            return self.abort("inconsistent_view")
        self._held[header.sender] = HeldShares(eph, seed)
        return self._maybe_publish_masked(now)

    def _maybe_publish_masked(self, now: float) -> Step:
        if self.phase is not MaskedPhase.KEYS or len(self._held) < len(self.members):
            return Step()
        assert self._own_encoded is not None and self._key and self._self_seed
        try:
            masked = masking.mask_vector(
                self._own_encoded, me=self.ctx.self_id, members=self.members, key=self._key,
                publics=self.publics, self_seed=self._self_seed, session_id=self.session_id)
        except CryptoError:
            return self.abort("bad_ephemeral_keys")
        self._key = self._self_seed = None  # shared and used: only the shares remain
        self._masked[self.ctx.self_id] = masked
        self.ctx.tap("own_vector", self._own_encoded)
        self.ctx.tap("masked_plaintext", masked)  # sealed under K: hidden from the broker
        step = Step([self._sealed_out(Kind.MASKED, field_to_bytes(masked))])
        if self.role is Role.INITIATOR:
            self._enter(MaskedPhase.MASKED, now, self.timeouts.masked_s)
            step.extend(self._maybe_send_survivors(now))
            return step
        self._enter(MaskedPhase.MASKED, now, self.timeouts.survivors_s)
        if self._pending_survivors is not None:
            step.extend(self._adopt(self._pending_survivors, now))
        else:
            step.extend(self._maybe_adopt_everyone(now))
        return step

    def _on_masked(self, header: m.Header, body: mm.Masked, now: float) -> Step:
        sender = header.sender
        if sender in self._masked:
            raise DroppedError("duplicate_masked")
        if self.survivors is not None and sender not in self.survivors:
            raise DroppedError("late_masked")
        plain = self._open_session(header, body.sealed)
        try:
            values = field_from_bytes(plain)
        except ValueError as exc:
            raise DroppedError("bad_field_elements") from exc
        if values.shape != (self._vector_size(),):
            raise DroppedError("bad_length")
        self._masked[sender] = values
        if self.role is Role.INITIATOR:
            return self._maybe_send_survivors(now)
        step = self._maybe_adopt_everyone(now)
        step.extend(self._maybe_finish(now))
        return step

    def _on_abort(self, sender: str, reason: str, now: float) -> Step:
        if sender == self.initiator:
            released = self.phase is MaskedPhase.ACCEPTED and reason == "not_selected"
            self._close("not_selected" if released else "aborted_by_initiator")
            return Step()
        if self.phase is MaskedPhase.INVITING:
            # Still inviting, the group was not decided on any ACCEPT: fixing it now is
            # waiting for every answer (GroupSession._maybe_fix_members).
            return self._invitee_left(sender, now)
        if self._late_answer(sender):  # a DECLINE (or ABORT) after the group was fixed
            return Step()
        if sender not in self.members:
            raise DroppedError("not_a_member")
        if self.phase is MaskedPhase.KEYS and sender not in self._held:
            # Its KEYS will never come: nobody could recover its masks, so nobody may mask.
            self._close(f"member_aborted:{sender}")
        return Step()  # after KEYS a member that leaves is a dropout (rules 3-6)

    def _late_answer(self, sender: str) -> bool:
        """An invitee's answer after the group was fixed without it: it was released with an
        ABORT already, so its ACCEPT or decline is expected traffic, not a drop."""
        return (self.role is Role.INITIATOR and sender in self.invited
                and sender not in self.members)
