"""The masked session's state and its agreement stage: SURVIVORS, CONFIRM, REVEAL, the sum.

:class:`MaskedAgreement` is the base of :class:`peer.network.session.masked.MaskedSession`
(which adds group formation, START, KEYS and MASKED): it holds a masked session's state and
decides, once the masked vectors are out, which list of survivors is unmasked (rules 3-6 of
docs/design/masked-sessions.md).

Security properties kept here:

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
* Nothing received or drawn in a session outlives it (``_enter`` of a final phase).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from crypto import masking
from crypto.errors import CryptoError, SealError
from peer.errors import DroppedError
from peer.network.session import masked_messages as mm
from peer.network.session.common import Contribution, Outgoing, Role, SessionContext, Step
from peer.network.session.early import held_size
from peer.network.session.group import GroupSession
from peer.network.session.masked_messages import MaskedTimeouts
from protocol import messages as m

Kind = m.Kind


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
class HeldShares:
    """This member's shares (at its own x) of one member's two secrets, from that one's KEYS."""

    ephemeral: np.ndarray
    seed: np.ndarray


class MaskedAgreement(GroupSession[tuple[np.ndarray, bytes]]):
    """A masked session's state and its SURVIVORS / CONFIRM / REVEAL stage."""

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
        self._held: dict[str, HeldShares] = {}
        self._masked: dict[str, np.ndarray] = {}
        self._confirms: dict[str, tuple[str, ...]] = {}
        self._reveals: dict[str, list[tuple[mm.RevealKind, np.ndarray]]] = {}
        self._pending_survivors: tuple[str, ...] | None = None
        self._heard_survivors = False  # the initiator's SURVIVORS has arrived

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


    def _open_session(self, header: m.Header, sealed: bytes) -> bytes:
        ctx = mm.SessionSealContext(self.ctx.params.network_id, self.session_id, header.sender,
                                    header.kind, header.seq)
        try:
            return mm.session_open(self._session_key, ctx, sealed)
        except SealError as exc:
            raise DroppedError("bad_seal") from exc
