"""The part of a session both kinds run the same way: :class:`GroupSession`.

A session of either kind (:class:`peer.network.session.shamir.Session`,
:class:`peer.network.session.masked.MaskedSession`) is a sans-IO state machine the node drives
through one public interface: ``handle(header, body, now)``, ``on_timeout(now)`` and
``abort(reason)`` each return a :class:`~peer.network.session.common.Step`; ``inviting``,
``finished``, ``result``, ``participants()``, ``role``, ``members``, ``abort_reason``,
``started_at``, ``deadline`` and ``session_id`` say where it stands, and ``held_counts()`` how
much it holds. This base holds what is the same in both: the input checks, the INVITE, the
initiator's bookkeeping of answers, the group it fixes, the release of invitees left out, the
early-message buffer and its replay, the encoding of this member's vector, the result and the
ABORT to every participant. The phases and the protocol after START are the subclasses'.

Security property kept here: every refused inbound message is a counted drop
(:class:`peer.errors.DroppedError` raised by a handler becomes a reason in ``Step.drops``),
never an exception out of ``handle``, and a finished session refuses everything.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Generic, TypeVar

import numpy as np

from crypto.errors import CryptoError, SealError
from crypto.sealing import SealContext, open_sealed
from peer.errors import DroppedError
from peer.network.session.common import (
    NO_INDICES,
    NO_VALUES,
    Contribution,
    GroupResult,
    Outgoing,
    Role,
    SessionContext,
    Step,
    check_contribution,
    check_invite,
    dense_contribution,
    group_decided,
    min_contributors,
)
from peer.network.session.early import EarlyBudget, EarlyBuffer
from protocol import messages as m

log = logging.getLogger(__name__)

#: What an invitee's ACCEPT offered, as the initiator keeps it (its index set; masked: and
#: its ephemeral public key).
Offer = TypeVar("Offer")


class GroupSession(ABC, Generic[Offer]):
    """One aggregation session from this peer's point of view (either kind)."""

    check_invite = staticmethod(check_invite)

    def __init__(self, ctx: SessionContext, session_id: bytes, role: Role,
                 contribution: Contribution, initiator: str, threshold: int, group_size: int,
                 now: float, first_timeout: float) -> None:
        check_contribution(contribution, ctx.params)
        self.ctx, self.session_id, self.role = ctx, session_id, role
        self.contribution, self.initiator = contribution, initiator
        self.threshold, self.group_size = threshold, group_size
        self.started_at = now
        self.deadline = now + first_timeout
        self.abort_reason: str | None = None
        self.result: GroupResult | None = None
        # initiator bookkeeping, in answer order
        self.invited: list[str] = []
        self.accepted: dict[str, Offer] = {}
        self.declined: set[str] = set()
        # after START
        self.members: tuple[str, ...] = ()
        self.coordinates: np.ndarray = np.zeros(0, dtype=np.uint32)
        self._view = b""  # the START-view digest every member's message must name
        self._own_encoded: np.ndarray | None = None
        self._filled: tuple[np.ndarray, np.ndarray] = (NO_INDICES, NO_VALUES)
        # Messages that overtook START (or, masked, REVEALs before our quorum): bounded in
        # bytes, per sender and in all (peer/network/session/early.py).
        self._early: EarlyBuffer[tuple[m.Header, m.Body]] = EarlyBuffer(
            EarlyBudget.for_session(ctx.params.vector_coordinates, min(group_size,
                                                                ctx.params.group_size)))

    # ------------------------------------------------------------------ public API
    @property
    @abstractmethod
    def finished(self) -> bool:
        """Whether the session is done or aborted (it then refuses every message)."""

    @property
    @abstractmethod
    def inviting(self) -> bool:
        """Whether the initiator is still collecting answers (it may yield to another invite)."""

    @abstractmethod
    def held_counts(self) -> dict[str, int]:
        """How many items of each kind the session holds (``early``: messages held until it
        can handle them, plus the kind's own stores); all zero once it is finished. An
        audit read-out: nothing received outlives a session."""

    @abstractmethod
    def on_timeout(self, now: float) -> Step:
        """Advance on time: past the deadline of the current phase, move on or abort."""

    def participants(self) -> list[str]:
        """Every other peer this session has involved so far."""
        if self.members:
            return [p for p in self.members if p != self.ctx.self_id]
        if self.role is Role.INITIATOR:
            return list(self.invited)
        return [self.initiator]

    def handle(self, header: m.Header, body: m.Body, now: float) -> Step:
        """Process one authenticated message of this session; a bad one is a counted drop."""
        if self.finished:
            return Step(drops=["session_finished"])
        try:
            return self._dispatch(header, body, now)
        except DroppedError as drop:
            log.debug("session %s: drop %s from %s: %s", self.session_id.hex()[:8],
                      header.kind.name, header.sender, drop.reason)
            return Step(drops=[drop.reason])

    def abort(self, reason: str) -> Step:
        """Abandon the session: discard every secret and share, tell the other participants."""
        if self.finished:
            return Step()
        recipients = self._abort_recipients()
        self._close(reason)
        return Step([self._out(p, m.Kind.ABORT, m.Abort(reason[:200])) for p in recipients])

    # ------------------------------------------------------------------ for the subclasses
    @abstractmethod
    def _dispatch(self, header: m.Header, body: m.Body, now: float) -> Step:
        """Handle one message; raise DroppedError to refuse it."""

    @abstractmethod
    def _close(self, reason: str | None) -> None:
        """Enter DONE (``reason`` None) or ABORTED with ``reason``, forgetting every secret."""

    @abstractmethod
    def _fix_members(self, now: float) -> Step:
        """The initiator fixes its group from the answers it holds."""

    def _abort_recipients(self) -> list[str]:
        """Who an ABORT goes to: the other members, or before START every invitee that has
        not declined (the initiator) or the initiator (an invitee)."""
        if self.members:
            return [p for p in self.members if p != self.ctx.self_id]
        if self.role is Role.INITIATOR:
            return [p for p in self.invited if p not in self.declined]
        return [self.initiator]

    def _out(self, recipient: str | None, kind: m.Kind, body: m.Body) -> Outgoing:
        return Outgoing(recipient, kind, body, self.ctx.next_seq())

    def _invite(self, invitees: Sequence[str]) -> Step:
        """Record ``invitees`` and invite each of them."""
        p = self.ctx.params
        self.invited = list(invitees)
        invite = m.Invite(group_size=self.group_size, threshold=p.threshold,
                          model_id=p.model_id, param_count=p.param_count,
                          frac_bits=p.fixed_point.frac_bits)
        return Step([self._out(peer, m.Kind.INVITE, invite) for peer in invitees])

    def _fewest(self) -> int:
        """The sum invariant (docs/sessions.md 3.3): no group, and no sum, of fewer than
        max(t, c + 2, 3) contributions, nor fewer than the peer's ``min_sum`` (group noise:
        h + c)."""
        return max(self.threshold, min_contributors(self.ctx.params.max_colluders),
                   self.ctx.params.min_sum)

    def _vector_size(self) -> int:
        """Field elements of one member's vector: one per coordinate and the count slot;
        group noise: the field elements, the encoded model, then the count slot."""
        blocks = 2 if self.ctx.params.field_contributions else 1
        return blocks * self.coordinates.size + 1

    def _maybe_fix_members(self, now: float) -> Step:
        if not group_decided(len(self.accepted), len(self.declined), len(self.invited),
                             self.group_size):
            return Step()
        return self._fix_members(now)

    def _chosen(self) -> tuple[list[str], tuple[str, ...]] | None:
        """(the first g - 1 invitees to accept, the group with us first); None when that
        group is below the sum invariant (the caller aborts with ``too_few_members``)."""
        chosen = list(self.accepted)[: self.group_size - 1]
        members = (self.ctx.self_id, *chosen)
        return None if len(members) < self._fewest() else (chosen, members)

    def _release(self, chosen: Sequence[str]) -> Step:
        """ABORT ``not_selected`` to every invitee left out of the group (not answered yet,
        or accepted too late)."""
        released = [p for p in self.invited if p not in chosen and p not in self.declined]
        return Step([self._out(p, m.Kind.ABORT, m.Abort("not_selected")) for p in released])

    def _invitee_left(self, sender: str, now: float) -> Step:
        """An invitee's ABORT (or decline) while we invite: it is out of the group."""
        if sender not in self.invited or sender in self.declined:
            raise DroppedError("not_invited")
        self.accepted.pop(sender, None)
        self.declined.add(sender)
        return self._maybe_fix_members(now)

    def _replay_early(self, now: float) -> Step:
        """Handle, in arrival order, every message held until now."""
        step = Step()
        for header, body in self._early.take():
            step.extend(self.handle(header, body, now))
        return step

    def _encode_own(self, coords: np.ndarray) -> bool:
        """Encode this member's dense vector over ``coords`` plus the count slot (each member
        adds 1.0, rebuilt as the number of contributors) into ``_own_encoded``; False when it
        cannot be encoded (the caller aborts with ``encode_failed``)."""
        fp = self.ctx.params.fixed_point
        label = f"session {self.session_id.hex()[:8]}"
        try:
            if self.ctx.params.field_contributions:
                # Group noise: the field elements go out as they are (check_contribution made
                # sure they cover every coordinate), then the model and the count slot.
                own = self.contribution
                assert own.field_values is not None and own.model is not None
                tail = fp.encode(np.concatenate([own.model.astype(np.float64), np.ones(1)]))
                self._own_encoded = np.concatenate([own.field_values, tail])
                return True
            dense, self._filled = dense_contribution(self.contribution, coords, fp.max_abs,
                                                     label)
            self._own_encoded = fp.encode(np.concatenate([dense, np.ones(1)]))
        except CryptoError as exc:
            log.warning("%s: cannot encode own update: %s", label, exc)
            return False
        return True

    def _box_context(self, sender: str, recipient: str, seq: int) -> SealContext:
        return SealContext(self.ctx.params.network_id, self.session_id, sender, recipient, seq)

    def _open_box(self, header: m.Header, sealed: bytes) -> bytes:
        """A pairwise-sealed payload from ``header.sender`` to us; DroppedError
        ``unknown_member`` or ``bad_seal``."""
        key = self.ctx.box_key_of(header.sender)
        if key is None:
            raise DroppedError("unknown_member")
        try:
            return open_sealed(self.ctx.identity, key,
                               self._box_context(header.sender, self.ctx.self_id, header.seq),
                               sealed)
        except (SealError, ValueError) as exc:
            raise DroppedError("bad_seal") from exc

    def _conclude(self, field_sum: np.ndarray, contributors: tuple[str, ...]) -> Step:
        """The rebuilt sum: DONE with the result if its count slot matches the contributors
        (a corrupted partial or share shows there), else abort ``inconsistent_sum``."""
        fp = self.ctx.params.fixed_point
        decoded = fp.decode(field_sum)
        if abs(float(decoded[-1]) - len(contributors)) > 0.5:
            return self.abort("inconsistent_sum")
        if len(contributors) < self._fewest():  # every caller checked; never release below
            return self.abort("too_few_contributors")
        assert self._own_encoded is not None
        n = self.coordinates.size
        field_part = model_sum = None
        if self.ctx.params.field_contributions:
            field_part, model_sum = field_sum[:n].copy(), decoded[n:2 * n]
        self.result = GroupResult(
            session_id=self.session_id, role=self.role, members=self.members,
            contributors=contributors, threshold=self.threshold, coordinates=self.coordinates,
            group_sum=decoded[:n], own_values=fp.decode(self._own_encoded)[:n],
            own_round=self.contribution.round, filled_indices=self._filled[0],
            filled_values=self._filled[1], field_sum=field_part, model_sum=model_sum)
        self._close(None)
        return Step()
