"""The session seat: the one aggregation session a peer takes part in at a time (nobody waits
for a global round).

A :class:`SessionSeat` owns, for its peer:

* the session in flight (at most one) and the contribution it shares;
* the fresh contribution: the latest update offered, not yet shared in a finished session;
* the ids of recent sessions, so late messages of a finished session (surplus partials, answers
  to an aborted invite) are told apart from messages of sessions this peer never joined;
* the initiator backoff: consecutive failed invitations widen the starter's random delay;
* answering invitations: join, yield our own still-inviting session, or decline with a reason;
* settling a finished session: counters, the ``session_done`` / ``session_aborted`` events, the
  merge (peer/sharing/merge.py checks finiteness and the norm bound before the model is
  touched) and its application to the model.

It never touches the broker: the messages a session produces and the subscriptions it needs go
to its host (peer/network/node.py) through :class:`SeatHooks`, and the host frames, signs,
chunks and queues them. Sessions of every kind share one interface (``handle``,
``on_timeout``, ``abort``, ``inviting``: peer/network/session/group.py), so the seat drives
them directly; only making one (``initiate``, ``join``) goes through the session kind
(peer/network/session/kinds.py), and so does what a peer's sessions agree on
(``session_params``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from peer.network.counters import DropCounter, SessionCounters
from peer.network.session.common import (
    Contribution,
    GroupResult,
    Outgoing,
    Role,
    SessionContext,
    SessionParams,
    Step,
    averaging_tail_params,
)
from peer.network.session.group import GroupSession
from peer.network.session.kinds import SessionKind
from peer.network.settings import NodeConfig, Trainer, session_done_data
from peer.network.view.membership import MembershipView
from peer.sharing import SharingStrategy
from peer.sharing.merge import MergeRejected, merge_group_sum
from peer.waiting import wait_event
from protocol import messages as m
from protocol.limits import MAX_MEMBERS

log = logging.getLogger(__name__)

#: How many finished session ids to remember, so late messages of a finished session are
#: told apart from messages of sessions this peer never joined.
RECENT_SESSIONS = 64

#: The starter's random delay doubles with each consecutive failed invitation, up to 2**4.
MAX_BACKOFF_DOUBLINGS = 4


@dataclass(frozen=True)
class SeatHooks:
    """What the seat needs from its host peer, and nothing more.

    ``send(out, session_id)`` frames, signs and queues one message of a session;
    ``subscription(topic_filter, subscribe, session_id)`` queues a (un)subscription in order with
    those messages; ``emit(kind, **data)`` reports a peer event; ``ended(done)`` tells the host
    a session finished (``done``: it produced a result), so it can wake its loops and record its
    totals. ``connected``, ``stopping`` and ``budget_spent`` are the host's state now.
    """

    send: Callable[[Outgoing, bytes], None]
    subscription: Callable[[str, bool, bytes], None]
    emit: Callable[..., None]
    ended: Callable[[bool], None]
    connected: Callable[[], bool]
    stopping: Callable[[], bool]
    budget_spent: Callable[[], bool]


class GroupReleases(Protocol):
    """What the seat needs of a group-noise peer's steps (peer.group_steps.GroupSteps)."""

    def release(self, step: Any, result: GroupResult) -> None: ...


class SessionSeat:
    """The one session a peer takes part in at a time, and the contribution it shares."""

    def __init__(self, *, session_kind: SessionKind, ctx: SessionContext, config: NodeConfig,
                 membership: MembershipView, counters: SessionCounters, drops: DropCounter,
                 trainer: Trainer, sharing: SharingStrategy | None, hooks: SeatHooks) -> None:
        self.session_kind = session_kind
        self.ctx = ctx
        self.params = ctx.params
        self.config = config
        self.membership = membership
        self.counters = counters
        self.drops = drops
        self.trainer = trainer
        # Residual fill (docs/sessions.md, "Sparse supports"): the strategy lends this peer's
        # values outside its top-k and settles what a session shared. None: zeros there.
        self.sharing = sharing
        self.hooks = hooks
        self.peer_id = ctx.self_id
        self.session: GroupSession | None = None
        self._session_contribution: Contribution | None = None
        self._fresh: Contribution | None = None
        # Group noise (peer/group_steps.py, set by the node): the charged step behind the
        # fresh share and the one behind the session's (each has a ``contribution``).
        self.group_steps: GroupReleases | None = None
        #: Group noise: the averaging tail's parameters (another model id: docs/privacy.md,
        #: "The averaging tail"); None for any other peer.
        self.tail_params = (averaging_tail_params(self.params)
                            if self.params.field_contributions else None)
        self._fresh_step: Any = None
        self._fresh_initiates = True  # False: the fresh share only answers invitations
        self._session_step: Any = None
        self._recent_sessions: OrderedDict[bytes, None] = OrderedDict()
        self._latest_round = -1
        self._last_session_end = -1e18
        self._initiator_failures = 0  # consecutive aborted sessions we started: backoff
        self.wake = asyncio.Event()  # the session starter's: an update, a session ended

    # ------------------------------------------------------------------ the update
    @property
    def update_pending(self) -> bool:
        """Whether a fresh update waits to be shared."""
        return self._fresh is not None

    def offer_update(self, indices: np.ndarray, values: np.ndarray, round_: int = 0) -> None:
        """Make an update available for the next session (replaces an unshared one)."""
        self._fresh = Contribution(
            indices=np.asarray(indices, dtype=np.uint32),
            values=np.asarray(values, dtype=np.float32),
            round=round_,
            fill=None if self.sharing is None else self.sharing.fill,
        )
        self._latest_round = max(self._latest_round, round_)
        self._fresh_initiates = True
        self.wake.set()

    def offer_group_step(self, step: Any, initiate: bool = True) -> None:
        """Make a group-noise step's share available for the next session (group mode keeps
        at most one: the caller offers a new one only once this one is gone); ``initiate``
        False: it only answers others' invitations (a peer whose own tail is done)."""
        self._fresh, self._fresh_step = step.contribution, step
        self._fresh_initiates = initiate
        self.wake.set()

    def withdraw_update(self) -> None:
        """Nothing fresh to contribute any more."""
        self._fresh = self._fresh_step = None

    # ------------------------------------------------------------------ the averaging tail
    def tail_peers(self, now: float) -> int:
        """Live peers announcing this peer's averaging-tail model id (0 without a tail)."""
        tail = self.tail_params
        if tail is None or self.params is tail:
            return 0
        return len(self.membership.eligible(now, model_id=tail.model_id,
                                            param_count=tail.param_count))

    def enter_tail(self) -> SessionParams | None:
        """Switch to the averaging tail's parameters (for good), withdrawing a private share
        that never formed a group; None, and nothing changed, while a session is in flight (it
        keeps the parameters it was made with) or for a peer without a tail."""
        if self.session is not None or self.tail_params is None:
            return None
        self.withdraw_update()
        self.params = self.tail_params
        self.ctx = replace(self.ctx, params=self.params)
        return self.params

    # ------------------------------------------------------------------ inbound
    def dispatch(self, header: m.Header, body: m.Body, now: float) -> None:
        """An admitted message: an INVITE, or a message of the session in flight."""
        if header.kind is m.Kind.INVITE:
            assert isinstance(body, m.Invite)
            self._on_invite(header, body, now)
            return
        session = self.session
        if session is None or header.session != session.session_id:
            if header.session in self._recent_sessions:
                # Surplus partials beyond t, answers to an aborted invite: normal, not a drop.
                self.counters.late_messages += 1
            else:
                self.drops.drop("unknown_session")
            return
        self._process(session.handle(header, body, now))

    def _yields_to(self, header: m.Header) -> bool:
        """Whether our own session, still only inviting, gives way to this invite.

        Peers with fresh updates tend to invite each other at the same moment and then decline
        each other as busy. The invite with the smaller (random) session id wins: an
        initiator that has not fixed its group yet abandons its own session (nothing was
        shared, so nothing is lost) and joins. Both sides compare the same two ids, so exactly
        one of them yields.
        """
        session = self.session
        return (
            session is not None
            and session.role is Role.INITIATOR
            and session.inviting
            and header.session < session.session_id
        )

    def _decline_reason(self, header: m.Header, invite: m.Invite) -> str | None:
        """Why this peer declines the invite (None: it joins)."""
        if self.hooks.stopping() or (self.session is not None and not self._yields_to(header)):
            return "busy"
        if header.session in self._recent_sessions:
            return "session_reused"
        if self.hooks.budget_spent() and self._fresh is None:
            return "budget_exhausted"
        if self._fresh is None:
            # A member contributing nothing would let the two others learn each other's vector.
            return "no_update"
        return self.session_kind.check_invite(self.params, invite)

    def _on_invite(self, header: m.Header, invite: m.Invite, now: float) -> None:
        reason = self._decline_reason(header, invite)
        if reason is not None:
            self.counters.count_decline(reason)
            out = Outgoing(header.sender, m.Kind.DECLINE, m.Decline(reason), self.ctx.next_seq())
            self.hooks.send(out, header.session)
            self._remember_session(header.session)  # its ABORT may still come: not a drop
            return
        assert self._fresh is not None
        self.abort("yielded")
        contribution = self._fresh
        session, step = self.session_kind.join(self.ctx, header, invite, contribution, now)
        self._set_session(session, contribution)
        self._process(step)

    # ------------------------------------------------------------------ starting
    def try_start_session(self, now: float | None = None) -> bool:
        """Start a session now if possible (fresh update, free, >= 2 eligible live peers)."""
        now = time.time() if now is None else now
        if (self.hooks.stopping() or self.session is not None or self._fresh is None
                or not self._fresh_initiates or not self.hooks.connected()
                or time.monotonic() - self._last_session_end < self.config.cooldown_s):
            return False
        k = min(self.params.group_size - 1 + max(0, self.config.over_invite), MAX_MEMBERS - 1)
        invitees = self.membership.sample(k, now, model_id=self.params.model_id,
                                          exclude={self.peer_id},
                                          param_count=self.params.param_count)
        invitees = [p for p in invitees if self.ctx.box_key_of(p) is not None]
        if len(invitees) < 2:
            return False
        contribution = self._fresh
        session, step = self.session_kind.initiate(self.ctx, os.urandom(16), contribution,
                                             invitees[:k], now)
        self._set_session(session, contribution)
        self._process(step)
        return True

    async def starter_loop(self) -> None:
        """With a fresh update and no session, invite after a random, backed-off delay."""
        rng = secrets.SystemRandom()
        while not self.hooks.stopping():
            self.wake.clear()
            if self.session is None and self._fresh is not None and self._fresh_initiates:
                # Random delay, growing with consecutive failed invitations (collisions): a
                # peer that waits is likely to be invited by a neighbour instead.
                doublings = min(self._initiator_failures, MAX_BACKOFF_DOUBLINGS)
                spread = self.config.start_jitter_s * 2 ** doublings
                await asyncio.sleep(rng.uniform(0.0, spread))
                try:
                    if self.try_start_session():
                        continue
                except Exception:
                    # A bug must not stop this peer from ever inviting again.
                    log.exception("%s: could not start a session", self.peer_id)
                await asyncio.sleep(self.config.start_jitter_s)
                continue
            await wait_event(self.wake, 1.0)

    # ------------------------------------------------------------------ timeouts, aborts
    def tick(self, now: float) -> None:
        """Advance the session's timeouts once its deadline has passed."""
        session = self.session
        if session is not None and now >= session.deadline:
            self._process(session.on_timeout(now))

    def abort(self, reason: str, session_id: bytes | None = None) -> None:
        """Abort the session in flight (only if it is ``session_id``, when given)."""
        session = self.session
        if session is not None and session_id in (None, session.session_id):
            self._process(session.abort(reason))

    # ------------------------------------------------------------------ the session's life
    def _set_session(self, session: GroupSession, contribution: Contribution) -> None:
        self.session = session
        self._session_contribution = contribution
        self._session_step = self._fresh_step if contribution is self._fresh else None
        self._remember_session(session.session_id)
        self._subscription(session, subscribe=True)  # queued before the session's first message

    def _subscription(self, session: GroupSession, *, subscribe: bool) -> None:
        topic_filter = self.session_kind.session_filter(self.params.network_id, session)
        if topic_filter is not None:
            self.hooks.subscription(topic_filter, subscribe, session.session_id)

    def _remember_session(self, session_id: bytes) -> None:
        self._recent_sessions[session_id] = None
        while len(self._recent_sessions) > RECENT_SESSIONS:
            self._recent_sessions.popitem(last=False)

    def _process(self, step: Step) -> None:
        """Send what a session step produced, count its drops, and settle a finished session."""
        session = self.session
        for reason in step.drops:
            self.drops.drop(reason)
        if session is not None:
            for out in step.out:
                self.hooks.send(out, session.session_id)
        if session is not None and session.finished:
            self._settle(session)

    def _settle(self, session: GroupSession) -> None:
        """The session finished: free the seat, then count, report and merge its outcome."""
        self.session = None
        self._subscription(session, subscribe=False)
        self._last_session_end = time.monotonic()
        contribution, step = self._session_contribution, self._session_step
        self._session_contribution = self._session_step = None
        duration = time.time() - session.started_at
        if step is not None and session.members and self._fresh is contribution:
            # A group-noise share whose session formed may have left: never offered again,
            # whether the session finished or aborted (docs/privacy.md, "Group noise").
            self._fresh = self._fresh_step = None
        if session.result is not None:  # set exactly when a session is done
            self.counters.sessions_done += 1
            self.hooks.ended(True)
            self._initiator_failures = 0
            if self._fresh is contribution:
                self._fresh = None  # shared: the next session needs a new update
            if step is not None:
                self._release(session.result, contribution, step, session.started_at,
                              duration)
            else:
                self._merge(session.result, contribution, session.started_at, duration)
        else:
            self._count_abort(session, duration)
            self.hooks.ended(False)
        self.wake.set()

    def _count_abort(self, session: GroupSession, duration: float) -> None:
        if session.role is Role.INITIATOR:
            self._initiator_failures += 1
        formed = bool(session.members)
        if formed:
            self.counters.sessions_aborted += 1
        else:
            self.counters.sessions_not_formed += 1
        self.counters.count_abort((session.abort_reason or "unknown").split(":")[0])
        # An invitation that never fixed its members is counted (and shown) as not formed.
        log.info("%s: %s %s %s: %s", self.peer_id, "session" if formed else "invitation",
                 session.session_id.hex()[:8], "aborted" if formed else "not formed",
                 session.abort_reason)
        self.hooks.emit("session_aborted", session_id=session.session_id,
                        role=session.role.value, members=session.members, formed=formed,
                        reason=session.abort_reason,
                        started_at=session.started_at, duration_s=duration)

    # ------------------------------------------------------------------ merging
    def _release(self, result: GroupResult, contribution: Contribution | None,
                 step: Any, started_at: float, duration: float) -> None:
        """A group-noise release: every member applies it (instead of the merge rule)."""
        self.hooks.emit("session_done", **session_done_data(
            result, contribution, 0, None, started_at, duration))
        if self.group_steps is not None:
            self.group_steps.release(step, result)
            self.counters.merges_applied += 1

    def _merge(self, result: GroupResult, contribution: Contribution | None,
               started_at: float, duration: float) -> None:
        staleness = max(0, self._latest_round - result.own_round)
        try:
            merged = merge_group_sum(
                result.coordinates, result.group_sum, result.own_values,
                len(result.contributors), staleness, self.config.merge,
            )
        except MergeRejected as exc:
            self.counters.count_rejected_merge(exc.reason)
            log.warning("%s: merge rejected: %s", self.peer_id, exc)
            self.hooks.emit("merge_rejected", session_id=result.session_id, reason=exc.reason)
            merged = None
        self.hooks.emit("session_done", **session_done_data(
            result, contribution, staleness, merged, started_at, duration))
        if merged is not None or result.filled_indices.size:
            asyncio.get_running_loop().create_task(self._apply(
                None if merged is None else merged.indices,
                None if merged is None else merged.values,
                result.filled_indices, result.filled_values,
            ))

    async def _apply(self, indices: np.ndarray | None, values: np.ndarray | None,
                     filled_indices: np.ndarray, filled_values: np.ndarray) -> None:
        if filled_indices.size and self.sharing is not None:
            # What we shared from the residual has left: remove it so it is not sent twice.
            try:
                self.sharing.settle(filled_indices, filled_values)
            except ValueError as exc:
                log.error("%s: trainer refused to settle the residual: %s", self.peer_id, exc)
        if indices is None or values is None:
            return
        try:
            if self.config.train:
                await asyncio.to_thread(self.trainer.apply_update, indices, values)
            else:
                self.trainer.apply_update(indices, values)
        except ValueError as exc:
            # The merge rule already bounded the delta; this is a trainer-side refusal.
            self.counters.count_rejected_merge("trainer_refused")
            log.error("%s: trainer refused a merge: %s", self.peer_id, exc)
            return
        self.counters.merges_applied += 1

