"""One masked aggregation session as a sans-IO state machine (``[session] kind = "masked"``).

The design is docs/design/masked-sessions.md (rules 1-7); the arithmetic is crypto/masking.py;
the messages are peer/network/session/masked_messages.py. Like peer/network/session/shamir.py, a
:class:`MaskedSession` never touches the network or the clock: the node feeds it authenticated
messages (``handle``) and the time (``on_timeout``) and sends what each call returns. Its
messages are the wire's own kinds (MASKED_ACCEPT, MASKED_START, KEYS, MASKED, SURVIVORS,
CONFIRM, REVEAL, and INVITE, DECLINE and ABORT as the Shamir session has them); a wire kind it
does not speak is a counted ``unexpected_kind`` drop. What it shares with the Shamir kind is
:class:`peer.network.session.group.GroupSession`.

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
* A member reveals nothing until it holds ``confirm_quorum(g, t)`` CONFIRMs (its own included)
  naming exactly the list it received; it aborts on a second, different SURVIVORS and on any
  conflicting CONFIRM before it reveals. It reveals once, for each member either a self-seed
  share (on the list) or an ephemeral-key share (not on it), never both, and then discards the
  shares it held, so it cannot be made to reveal the other kind later.
* A REVEAL counts only after its sender's CONFIRM of the same list; rebuilt ephemeral keys must
  match their public keys, and a count slot (each survivor adds 1.0) must rebuild to the number
  of survivors, so forged shares abort the session instead of yielding a wrong sum.
* The sum invariant: a member confirms only a list that names itself and holds at least
  max(t, c + 2, 3) members (c = ``SessionParams.max_colluders``); otherwise it aborts.
* Every bad input is a counted drop (``Step.drops``); aborts discard every share held.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum

import numpy as np

from crypto import masking
from crypto.errors import CryptoError, SealError
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
from peer.network.session.group import GroupSession
from peer.network.session.masked_messages import MaskedTimeouts
from protocol import messages as m

Kind = m.Kind
_EARLY_KINDS = (Kind.KEYS, Kind.MASKED, Kind.CONFIRM, Kind.REVEAL)


class MaskedPhase(Enum):
    INVITING = "inviting"
    ACCEPTED = "accepted"
    KEYS = "keys"
    MASKED = "masked"
    CONFIRMING = "confirming"
    REVEALING = "revealing"
    DONE = "done"
    ABORTED = "aborted"


@dataclass
class _Held:
    """This member's shares (at its own x) of one member's two secrets, from that one's KEYS."""

    ephemeral: np.ndarray
    seed: np.ndarray


class MaskedSession(GroupSession[tuple[np.ndarray, bytes]]):
    """One masked session from this member's point of view; create with ``initiate``/``join``."""

    def __init__(self, ctx: SessionContext, session_id: bytes, role: Role,
                 contribution: Contribution, initiator: str, threshold: int, group_size: int,
                 now: float, timeouts: MaskedTimeouts) -> None:
        initiating = role is Role.INITIATOR
        super().__init__(ctx, session_id, role, contribution, initiator, threshold, group_size,
                         now, timeouts.invite_s if initiating else timeouts.start_s)
        self.timeouts = timeouts
        self.phase = MaskedPhase.INVITING if initiating else MaskedPhase.ACCEPTED
        # Rule 1: fresh secrets per session; forgotten once shared and used.
        self._key: masking.EphemeralKey | None = masking.EphemeralKey.generate()
        self._self_seed: bytes | None = masking.new_self_seed()
        ctx.tap("ephemeral_private", self._key.private)
        ctx.tap("self_seed", self._self_seed)
        self.publics: dict[str, bytes] = {}
        self.survivors: tuple[str, ...] | None = None
        #: The survivors list this member revealed its shares on (None: it revealed nothing).
        #: An audit read-out: which sum this member's REVEAL helps to unmask.
        self.revealed_for: tuple[str, ...] | None = None
        self._session_key = b""
        self._held: dict[str, _Held] = {}
        self._masked: dict[str, np.ndarray] = {}
        self._confirms: dict[str, tuple[str, ...]] = {}
        self._reveals: dict[str, list[tuple[mm.RevealKind, np.ndarray]]] = {}
        self._pending_survivors: tuple[str, ...] | None = None
        self._heard_survivors = False  # the initiator's SURVIVORS has arrived

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
    @property
    def finished(self) -> bool:
        return self.phase in (MaskedPhase.DONE, MaskedPhase.ABORTED)

    @property
    def inviting(self) -> bool:
        return self.phase is MaskedPhase.INVITING

    @property
    def masked_from(self) -> frozenset[str]:
        """The members whose masked vector this member holds (its own included)."""
        return frozenset(self._masked)

    def held_counts(self) -> dict[str, int]:
        """What this member holds: other members' secret shares from KEYS (``keys``), masked
        vectors (``masked``), CONFIRMs (``confirms``), REVEALs (``reveals``) and messages held
        until START or quorum (``early``)."""
        return {"keys": len(self._held), "masked": len(self._masked),
                "confirms": len(self._confirms), "reveals": len(self._reveals),
                "early": len(self._early)}

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
    def _sealed_out(self, kind: m.Kind, payload: bytes) -> Outgoing:
        """A session-sealed topic message bound to its own seq."""
        seq = self.ctx.next_seq()
        ctx = mm.SessionSealContext(self.ctx.params.network_id, self.session_id,
                                    self.ctx.self_id, kind, seq)
        sealed = mm.session_seal(self._session_key, ctx, payload)
        body = mm.Masked(sealed) if kind is Kind.MASKED else mm.Reveal(sealed)
        return Outgoing(None, kind, body, seq)

    def _close(self, reason: str | None) -> None:
        self._enter(MaskedPhase.DONE if reason is None else MaskedPhase.ABORTED)
        self.abort_reason = reason

    def _enter(self, phase: MaskedPhase, now: float = 0.0, timeout: float = 0.0) -> None:
        self.phase = phase
        self.deadline = now + timeout
        if self.finished:  # nothing received or drawn in a session outlives it
            self._key = self._self_seed = self._own_encoded = None
            self._session_key = b""
            for store in (self._held, self._masked, self._reveals):
                store.clear()
            self._early.clear()

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
                self._held[me] = _Held(eph[pos].values, seeds[pos].values)
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
        self._held[header.sender] = _Held(eph, seed)
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
        if values.shape != (self.coordinates.size + 1,):
            raise DroppedError("bad_length")
        self._masked[sender] = values
        if self.role is Role.INITIATOR:
            return self._maybe_send_survivors(now)
        step = self._maybe_adopt_everyone(now)
        step.extend(self._maybe_finish(now))
        return step

    def _maybe_adopt_everyone(self, now: float) -> Step:
        """Holding every member's MASKED, a member confirms the full list at once instead of
        waiting one more broker hop for the initiator's SURVIVORS, which can only name the
        same list. Safe because rule 4 is unchanged: an honest member still confirms one list
        per session and reveals only on a quorum of matching CONFIRMs; an initiator that then
        sends a shorter list is caught equivocating."""
        if (self.phase is MaskedPhase.MASKED and self.survivors is None
                and len(self._masked) == len(self.members)):
            return self._adopt(self.members, now)
        return Step()

    # SURVIVORS and CONFIRM --------------------------------------------------
    def _maybe_send_survivors(self, now: float) -> Step:
        if self.phase is MaskedPhase.MASKED and len(self._masked) == len(self.members):
            return self._send_survivors(now)
        return Step()

    def _refuse_list(self, survivors: tuple[str, ...]) -> str | None:
        """Why this member must abort rather than confirm ``survivors`` (None: it may)."""
        if self.ctx.self_id not in survivors:
            return "excluded_from_survivors"  # our vector is out: never a sum without it
        if len(survivors) < self.threshold:
            return "below_threshold"
        if len(survivors) < self._fewest():
            return "too_few_contributors"
        return None

    def _send_survivors(self, now: float) -> Step:
        survivors = tuple(p for p in self.members if p in self._masked)
        refusal = self._refuse_list(survivors)
        if refusal is not None:
            return self.abort(refusal)  # rule 3: nothing is revealed
        body = mm.Survivors(survivors)
        step = Step([self._out(p, Kind.SURVIVORS, body) for p in self.participants()])
        step.extend(self._adopt(survivors, now))
        return step

    def _check_list(self, survivors: tuple[str, ...]) -> tuple[str, ...]:
        listed = tuple(survivors)
        if tuple(p for p in self.members if p in set(listed)) != listed:
            raise DroppedError("bad_survivors")  # not distinct members in member order
        return listed

    def _on_survivors(self, header: m.Header, body: mm.Survivors, now: float) -> Step:
        if header.sender != self.initiator:
            raise DroppedError("not_from_initiator")
        listed = self._check_list(body.survivors)
        if self._heard_survivors and listed == (self.survivors or self._pending_survivors):
            raise DroppedError("duplicate_survivors")
        self._heard_survivors = True
        known = self.survivors if self.survivors is not None else self._pending_survivors
        if known is not None:
            if known == listed:
                return Step()  # we had adopted the full list already: it agrees
            return self.abort("initiator_equivocated")
        refusal = self._refuse_list(listed)
        if refusal is not None:
            return self.abort(refusal)
        if self.phase is MaskedPhase.KEYS:  # our KEYS are not all in yet: adopt it after
            self._pending_survivors = listed
            return Step()
        return self._adopt(listed, now)

    def _adopt(self, survivors: tuple[str, ...], now: float) -> Step:
        """Rule 4: publish CONFIRM for the list received, then wait for a quorum on it."""
        refusal = self._refuse_list(survivors)
        if refusal is not None:  # every caller checked already; kept where the list is adopted
            return self.abort(refusal)
        self.survivors = survivors
        me = self.ctx.self_id
        self._confirms[me] = survivors
        for gone in [p for p in self._masked if p not in survivors]:
            del self._masked[gone]  # a dropped member's vector is never summed
        step = Step([self._out(None, Kind.CONFIRM, mm.Confirm(survivors))])
        self._enter(MaskedPhase.CONFIRMING, now, self.timeouts.confirm_s)
        if any(lst != survivors for lst in self._confirms.values()):
            step.extend(self.abort("conflicting_confirm"))
            return step
        step.extend(self._maybe_reveal(now))
        return step

    def _on_confirm(self, header: m.Header, body: mm.Confirm, now: float) -> Step:
        sender = header.sender
        listed = self._check_list(body.survivors)
        previous = self._confirms.get(sender)
        conflict = (previous is not None and previous != listed) or (
            self.survivors is not None and listed != self.survivors)
        if conflict:
            if self.phase in (MaskedPhase.REVEALING, MaskedPhase.DONE):
                # already revealed: nothing left to protect
                raise DroppedError("conflicting_confirm")
            return self.abort("conflicting_confirm")
        if previous is not None:
            raise DroppedError("duplicate_confirm")
        self._confirms[sender] = listed
        return self._maybe_reveal(now)

    # REVEAL and the result --------------------------------------------------
    def _maybe_reveal(self, now: float) -> Step:
        if self.phase is not MaskedPhase.CONFIRMING or self.survivors is None:
            return Step()
        agreeing = sum(1 for lst in self._confirms.values() if lst == self.survivors)
        if agreeing < mm.confirm_quorum(len(self.members), self.threshold):
            return Step()
        entries = [(mm.RevealKind.SELF_SEED, self._held[v].seed) if v in self.survivors
                   else (mm.RevealKind.EPHEMERAL_KEY, self._held[v].ephemeral)
                   for v in self.members]
        self._held.clear()  # rule 5: having revealed one kind, we can never reveal the other
        self.revealed_for = self.survivors
        self._reveals[self.ctx.self_id] = entries
        payload = mm.encode_reveal(entries)
        self.ctx.tap("share_plaintext", payload)
        step = Step([self._sealed_out(Kind.REVEAL, payload)])
        self._enter(MaskedPhase.REVEALING, now, self.timeouts.reveal_s)
        step.extend(self._replay_early(now))
        step.extend(self._maybe_finish(now))
        return step

    def _on_reveal(self, header: m.Header, body: mm.Reveal, now: float) -> Step:
        sender = header.sender
        if sender in self._reveals:
            raise DroppedError("duplicate_reveal")
        confirmed = self._confirms.get(sender)
        if confirmed is None or (self.survivors is not None and confirmed != self.survivors):
            # A member publishes its CONFIRM before its REVEAL on the same topic, and MQTT
            # keeps one publisher's order on one topic: a REVEAL without one is forged.
            raise DroppedError("reveal_before_confirm")
        if self.phase is not MaskedPhase.REVEALING:  # we have not reached quorum ourselves
            self._early.hold(sender, (header, body), held_size(body))
            return Step()
        try:
            entries = mm.decode_reveal(self._open_session(header, body.sealed), len(self.members))
        except ValueError as exc:
            raise DroppedError("bad_reveal_payload") from exc
        expected = [mm.RevealKind.SELF_SEED if v in self.survivors
                    else mm.RevealKind.EPHEMERAL_KEY for v in self.members]
        if [kind for kind, _ in entries] != expected:
            raise DroppedError("reveal_mismatch")
        self._reveals[sender] = entries
        return self._maybe_finish(now)

    def _maybe_finish(self, now: float) -> Step:
        survivors = self.survivors
        if (self.phase is not MaskedPhase.REVEALING or survivors is None
                or len(self._reveals) < self.threshold
                or any(p not in self._masked for p in survivors)):
            return Step()
        if self._refuse_list(survivors) is not None:  # unreachable past _adopt; never unmask
            return self.abort("too_few_contributors")
        me = self.ctx.self_id
        revealers = [me, *[p for p in self._reveals if p != me]][: self.threshold]
        try:
            seeds, dropped = mm.recover_secrets(
                self.members, survivors, self.publics, self.threshold,
                {self.members.index(r) + 1: self._reveals[r] for r in revealers})
            total = masking.combine(self._masked[survivors[0]],
                                    (self._masked[p] for p in survivors[1:]))
            field_sum = masking.unmask_sum(
                total, members=self.members, survivors=survivors,
                publics=self.publics, self_seeds=seeds, dropped_keys=dropped,
                session_id=self.session_id)
        except (CryptoError, ValueError):  # forged shares: wrong key, or not a 32-byte secret
            return self.abort("bad_reveal")
        return self._conclude(field_sum, survivors)

    # ABORT and opening ------------------------------------------------------
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

    def _open_session(self, header: m.Header, sealed: bytes) -> bytes:
        ctx = mm.SessionSealContext(self.ctx.params.network_id, self.session_id, header.sender,
                                    header.kind, header.seq)
        try:
            return mm.session_open(self._session_key, ctx, sealed)
        except SealError as exc:
            raise DroppedError("bad_seal") from exc

