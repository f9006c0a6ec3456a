"""The Murmur peer: trains locally, meets its neighbours in aggregation sessions, merges.

``Peer.run(stop)`` runs concurrently, on one event loop:

* the MQTT transport (reconnects on its own; a broker restart costs only time);
* the training loop: ``train_round`` in a worker thread, so the loop keeps answering the
  network; rounds are paced by the network and the budget (peer/network/pacing.py): no
  private step while the peer cannot form a group, and once the budget is spent only free
  averaging rounds (share mode "model") or serving;
* the session starter: with a fresh update, no session in flight and >= 2 eligible live peers,
  invite g - 1 of them after a small random delay (so neighbours do not all invite at once);
* a ticker that advances the current session's timeouts;
* periodic signed, retained announcements and checkpoints.

Which announcements a peer follows is peer/network/view/loop.py's business: every one (the
default, ``NodeConfig.view.view_size`` 0) or a few buckets of them, with lookups of senders
outside the view (docs/design/partial-view.md).

Membership is asserted only by the peer itself: its signed, retained ANNOUNCE names a fresh
connection id for every broker connection, its last will is a LEAVE it signed for that
connection when it opened it, and on a clean stop it publishes a signed LEAVE for it. Nobody
else can remove it from other peers' views (peer/network/view/membership.py).

Every inbound message passes the checks of peer/network/inbound.py (topic, size, decoding,
topic binding, network, certificate or known sender, signature, recipient, replay window)
before it reaches a session. Each failure is a counted drop with a reason
(``status().drops``) and a rate-limited log line; nothing on the wire can crash a peer. The
session itself checks seals, sizes and contributor sets; a session message larger than
``NodeConfig.max_message_bytes`` travels as signed CHUNKs, reassembled in bounded memory
(protocol/chunks.py, peer/network/inbound.py); the merge rule
(peer/sharing/merge.py) checks finiteness and the norm bound before the model is touched.

``NodeConfig.session_kind`` picks the session (peer/network/session/kinds.py): "shamir"
(peer/network/session/shamir.py, the default) or "masked" (peer/network/session/masked.py, whose
members also subscribe to the session's topics for its duration, before its first message).

A peer takes part in at most one session at a time; nobody waits for a global round.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import secrets
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from crypto.admission import Certificate
from crypto.identity import Identity
from crypto.replay import ReplayWindow
from peer.errors import DroppedError
from peer.network.counters import (
    DropCounter,
    PeerStatus,
    SessionCounters,
    load_sessions_total,
    save_sessions_total,
    state_word,
)
from peer.network.inbound import InboundChecks
from peer.network.outbox import Outbox, Subscription
from peer.network.pacing import PacingState, can_form_group
from peer.network.rounds import RoundLoop, TrainingGauges
from peer.network.session.common import Outgoing, Step
from peer.network.session.group import GroupSession
from peer.network.session.kinds import build_kind
from peer.network.session.shamir import (
    Contribution,
    GroupResult,
    Role,
    SessionContext,
    SessionParams,
)
from peer.network.settings import (
    EventCallback,
    NodeConfig,
    PeerEvent,
    Trainer,
    session_done_data,
)
from peer.network.transport import (
    BrokerSettings,
    Incoming,
    NotConnectedError,
    PayloadTooLargeError,
    Transport,
    WillMessage,
)
from peer.network.view.loop import ViewKeeper, restored_announce_filters
from peer.network.view.membership import MembershipView
from peer.sharing import SharingStrategy
from peer.sharing.merge import MergeRejected, merge_group_sum
from peer.waiting import wait_event
from protocol import messages as m
from protocol.chunks import (
    ChunkReassembler,
    ReassemblyLimits,
    check_max_message_bytes,
    encode_chunked,
)
from protocol.codec import encode_message
from protocol.errors import ProtocolError
from protocol.limits import CONNECTION_ID_BYTES, MAX_MEMBERS
from protocol.topics import (
    announce_topic,
    direct_topic,
    inbox_filter,
    session_topic,
)

__all__ = ["EventCallback", "NodeConfig", "Peer", "PeerEvent", "Trainer"]

#: Shutdown bounds: background tasks to end after cancellation, the clean disconnect.
_TASK_STOP_S = 5.0
_DISCONNECT_S = 15.0

log = logging.getLogger(__name__)

#: How many finished session ids to remember, so late messages of a finished session are
#: told apart from messages of sessions this peer never joined.
_RECENT_SESSIONS = 64


class Peer:
    """One Murmur peer; ``peer.daemon`` builds it (daemon and simulation alike).

    ``run(stop)`` until ``stop`` is set; then it leaves cleanly.
    """

    def __init__(
        self,
        *,
        identity: Identity,
        certificate: Certificate,
        admission_public_key: bytes,
        network_id: str,
        trainer: Trainer,
        broker: BrokerSettings,
        config: NodeConfig | None = None,
        sharing: SharingStrategy | None = None,
        on_event: EventCallback | None = None,
        client_id: str | None = None,
        totals_path: Path | None = None,
    ) -> None:
        self.identity = identity
        self.peer_id = identity.peer_id
        self.certificate = certificate
        self.network_id = network_id
        self.trainer = trainer
        self.config = config or NodeConfig()
        self.on_event = on_event
        cfg = self.config
        check_max_message_bytes(cfg.max_message_bytes)
        # The session kind (peer/network/session/kinds.py) is part of the model id peers
        # group by, so peers of different kinds never meet in a session.
        self.session_kind = build_kind(cfg.session_kind, cfg.timeouts, cfg.masked_timeouts)
        self.params = SessionParams(
            network_id=network_id, model_id=self.session_kind.model_id(trainer.model_id),
            param_count=trainer.param_count,
            group_size=cfg.group_size, threshold=cfg.threshold, fixed_point=cfg.fixed_point,
            timeouts=cfg.timeouts, max_colluders=cfg.max_colluders,
        )
        self.membership = MembershipView(
            network_id,
            admission_public_key,
            self.peer_id,
            silence_expiry_s=cfg.silence_expiry_s,
            clock_skew_s=cfg.clock_skew_s,
        )
        # What this peer holds for others (chunks of unfinished messages, messages waiting
        # for a lookup) is sized from its own model and group: docs/protocol.md section 11.
        self.held_limits = ReassemblyLimits.for_sessions(trainer.param_count, cfg.group_size)
        self.inbound = InboundChecks(network_id, self.peer_id, self.membership, ReplayWindow(),
                                     chunks=ChunkReassembler(self.held_limits))
        self.seq = m.SequenceCounter()
        self.drops = DropCounter(self.peer_id)
        # Fresh for every broker connection: our announcements and our will name it.
        self._connection_id = b""
        self.transport = self._make_transport(broker, client_id)
        self._session_ctx = SessionContext(
            identity=identity,
            params=self.params,
            box_key_of=self._box_key_of,
            next_seq=self.seq.next,
            secret_tap=cfg.secret_tap,
        )
        self.session: GroupSession | None = None
        self._session_contribution: Contribution | None = None
        self._fresh: Contribution | None = None
        # Residual fill (docs/sessions.md, "Sparse supports"): the strategy lends this peer's
        # values outside its top-k and settles what a session shared. None: zeros there.
        self.sharing = sharing
        self._recent_sessions: OrderedDict[bytes, None] = OrderedDict()
        self._stopping = False
        self._next_expiry = 0.0
        self._last_session_end = -1e18
        self._initiator_failures = 0  # consecutive aborted sessions we started: backoff
        self._wake = asyncio.Event()  # the session starter's
        self._round_wake = asyncio.Event()  # the training loop's: a session ended, a link changed
        # figures for status()
        self.counters = SessionCounters()
        # Our messages, in order; (un)subscriptions to session topics go through it too.
        self.outbox = Outbox(self.transport, self.counters, self.peer_id, self._subscribe_failed)
        # Which announcements this peer follows, and lookups of senders outside them.
        self.view = ViewKeeper(
            network_id=network_id, peer_id=self.peer_id, config=cfg.view,
            membership=self.membership, transport=self.transport, drops=self.drops,
            pinned=lambda: [] if self.session is None else self.session.participants(),
            current_session=lambda: None if self.session is None else self.session.session_id,
            redeliver=self._handle, dispatch=self._dispatch,
            held_bytes=self.held_limits.max_buffered_bytes)
        self._latest_round = -1
        self._was_connected = False
        self._ever_connected = False
        self.gauges = TrainingGauges.of(trainer)
        self.rounds = RoundLoop(self, cfg.pacing, self._round_wake,
                                round_pause_s=cfg.round_pause_s,
                                evaluate_every=cfg.evaluate_every)
        # Totals since the peer was created: rounds from the trainer's checkpoint, sessions
        # from this small file (written with each checkpoint).
        self.totals_path = totals_path
        self._sessions_before = load_sessions_total(totals_path)
        self._totals_dirty = False
        self._totals_writer: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ status / events
    def _make_transport(self, broker: BrokerSettings, client_id: str | None) -> Transport:
        """The MQTT client: our announcements and our inbox; our will is our signed leave."""
        net = self.network_id
        return Transport(
            broker,
            client_id=client_id or f"murmur-{net}-{self.peer_id}"[:64],
            subscriptions=[*restored_announce_filters(net, self.config.view),
                           inbox_filter(net, self.peer_id)],
            will=self._will_for_new_connection,
            on_connected=self._on_connected,
            # Never more than the broker is meant to carry; larger messages are chunked.
            max_payload=self.config.max_message_bytes,
            on_refused=lambda reason, size: self.drops.drop(reason, f"{size} bytes"),
        )

    def _will_for_new_connection(self) -> WillMessage:
        """Called by the transport before each connection: a new connection id, and the
        LEAVE for it that the broker publishes (retained) if the connection dies."""
        self._connection_id = os.urandom(CONNECTION_ID_BYTES)
        leave = m.Leave("connection lost", self._connection_id)
        payload = self._encode(m.Kind.LEAVE, b"", leave, self.seq.next())
        return announce_topic(self.network_id, self.peer_id), payload, True

    def _state(self, connected: bool, eligible: int) -> str:
        gauges = self.gauges
        return state_word(
            stopping=self._stopping, connected=connected, ever_connected=self._ever_connected,
            in_session=self.session is not None, training=gauges.training_now,
            training_failed=gauges.training_error is not None,
            budget_spent=gauges.budget_exhausted, can_average=self.rounds.can_average,
            grouped=can_form_group(connected, eligible))

    def status(self) -> PeerStatus:
        """This peer's counters and gauges now (the one snapshot every reader uses)."""
        t = self.transport
        connected = t.connected.is_set()
        eligible = len(self._eligible(time.time()))
        return PeerStatus(
            peer_id=self.peer_id,
            connected=connected,
            state=self._state(connected, eligible),
            accuracy=self.gauges.accuracy,
            dp=self.gauges.dp,
            epsilon=self.gauges.epsilon,
            budget_epsilon=self.gauges.budget_epsilon,
            budget_exhausted=self.gauges.budget_exhausted,
            rounds_total=int(getattr(self.trainer, "round", self.counters.round)),
            sessions_total=self._sessions_before + self.counters.sessions_done,
            peers_live=eligible,
            view_peers=len(self.membership),
            view_buckets=self.view.followed_buckets,
            in_session=self.session is not None,
            bytes_sent=t.bytes_sent,
            bytes_received=t.bytes_received,
            messages_sent=t.messages_sent,
            messages_received=t.messages_received,
            reconnects=t.reconnects,
            chunked_received=self.inbound.reassembled,
            lookups=self.view.lookups.started_total,
            drops=self.drops.snapshot(),
            **copy.deepcopy(vars(self.counters)),
        )

    def _emit(self, kind: str, **data: Any) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(PeerEvent(kind, self.peer_id, time.time(), data))
        except Exception:
            # A metrics writer bug must not take the peer down.
            log.exception("%s: event callback failed", self.peer_id)

    # ------------------------------------------------------------------ main loop
    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then abort the session in flight, checkpoint and leave."""
        transport_stop = asyncio.Event()
        transport_task = asyncio.create_task(self.transport.run(self._on_message, transport_stop))
        tasks = [
            asyncio.create_task(self.outbox.run()),
            asyncio.create_task(self._ticker_loop()),
            asyncio.create_task(self._announce_loop()),
            asyncio.create_task(self._checkpoint_loop()),
            asyncio.create_task(self.view.run()),
        ]
        if self.config.auto_start:
            tasks.append(asyncio.create_task(self._starter_loop()))
        training = asyncio.create_task(self.rounds.run()) if self.config.train else None
        try:
            await stop.wait()
        finally:
            self._stopping = True
            await self._shutdown(tasks, training, transport_task, transport_stop)

    async def _shutdown(
        self,
        tasks: list[asyncio.Task[None]],
        training: asyncio.Task[None] | None,
        transport_task: asyncio.Task[None],
        transport_stop: asyncio.Event,
    ) -> None:
        if self.session is not None:
            self._process(self.session.abort("peer_stopping"))
        # Let the aborts and the leave go out while still connected (bounded wait).
        if self.transport.connected.is_set():
            with contextlib.suppress(ProtocolError, ValueError):
                # Retained: it replaces our announcement, so newcomers do not invite us.
                leave = self._encode(m.Kind.LEAVE, b"", m.Leave("stopping", self._connection_id),
                                     self.seq.next())
                self.outbox.put((announce_topic(self.network_id, self.peer_id), leave,
                                         True))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self.outbox.drained()
        for task in tasks:
            task.cancel()
        if training is not None:
            # The round in flight finishes in its thread (it cannot be interrupted safely);
            # its ledger entry is already on disk, so nothing is forgotten.
            training.cancel()
            tasks = [*tasks, training]
        # Bounded, and cancelled again: on Python 3.11 a cancellation that arrives as an awaited
        # reply does (aiomqtt's PUBACK wait is an asyncio.wait_for) is lost; the loops also end
        # on _stopping, so a second cancellation finds them asleep.
        stuck: set[asyncio.Task[None]] = set(tasks)
        for _attempt in range(3):
            _done, stuck = await asyncio.wait(stuck, timeout=_TASK_STOP_S / 3)
            if not stuck:
                break
            for task in stuck:
                task.cancel()
        for task in tasks:
            if task in stuck:
                log.error("%s: background task %s did not stop in %.0f s", self.peer_id,
                          task.get_coro(), _TASK_STOP_S)
            elif not task.cancelled() and task.exception() is not None:
                log.error("%s: a background task had failed", self.peer_id,
                          exc_info=task.exception())
        await self._checkpoint()
        transport_stop.set()
        try:
            async with asyncio.timeout(_DISCONNECT_S):
                await transport_task
        except TimeoutError:
            log.warning("%s: broker disconnect did not finish in time", self.peer_id)

    # ------------------------------------------------------------------ sending
    def _encode(self, kind: m.Kind, session_id: bytes, body: m.Body, seq: int) -> bytes:
        header = m.Header(
            version=m.PROTOCOL_VERSION,
            network=self.network_id,
            kind=kind,
            sender=self.peer_id,
            session=session_id,
            seq=seq,
        )
        return encode_message(header, body, self.identity.sign)

    def _queue(self, out: Outgoing, session_id: bytes) -> None:
        payload = self._encode(out.kind, session_id, out.body, out.seq)
        if out.recipient is None:  # for every member: on our topic of this session
            topic = session_topic(self.network_id, self.peer_id, session_id)
        else:
            topic = direct_topic(self.network_id, self.peer_id, out.recipient)
        # Too large for max_message_bytes: signed CHUNKs in order, on the same topic.
        parts = encode_chunked(payload, max_message_bytes=self.config.max_message_bytes,
                               network=self.network_id, sender=self.peer_id, session=session_id,
                               sign=self.identity.sign, next_seq=self.seq.next)
        self.counters.chunked_sent += int(len(parts) > 1)
        for part in parts:
            self.outbox.put((topic, part, False))

    def _subscribe_failed(self, session_id: bytes) -> None:
        """The broker refused a session topic: that session cannot work, abort it."""
        session = self.session
        if session is not None and session.session_id == session_id:
            self._process(session.abort("subscribe_failed"))

    async def _on_connected(self) -> None:
        self.view.on_connected()
        await self._publish_announce()

    async def _publish_announce(self) -> None:
        body = m.Announce(
            certificate=self.certificate.to_bytes(),
            model_id=self.params.model_id,
            param_count=self.params.param_count,
            connection=self._connection_id,
        )
        payload = self._encode(m.Kind.ANNOUNCE, b"", body, self.seq.next())
        await self.transport.publish(
            announce_topic(self.network_id, self.peer_id), payload, retain=True
        )

    # ------------------------------------------------------------------ inbound
    async def _on_message(self, incoming: Incoming) -> None:
        """Check one inbound message end to end; every refusal is a counted drop."""
        self._handle(incoming, time.time())

    def _handle(self, incoming: Incoming, now: float) -> None:
        """The body of _on_message; also what a message held for a lookup goes through again
        once its sender is known (peer/network/view/loop.py)."""
        try:
            admitted = self.inbound.admit(incoming, now)
        except DroppedError as exc:
            if not self.view.hold_unknown(exc, incoming, now):
                self.drops.drop(exc.reason, exc.detail)
            return
        if admitted is None:
            self.view.on_admitted(incoming, now)
        elif not self.view.hold_admitted(admitted.header, admitted.body, now):
            self._dispatch(admitted.header, admitted.body, now)

    def _dispatch(self, header: m.Header, body: m.Body, now: float) -> None:
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

    def _on_invite(self, header: m.Header, invite: m.Invite, now: float) -> None:
        reason: str | None = None
        if self._stopping or (self.session is not None and not self._yields_to(header)):
            reason = "busy"
        elif header.session in self._recent_sessions:
            reason = "session_reused"
        elif self.gauges.budget_exhausted and self._fresh is None:
            reason = "budget_exhausted"
        elif self._fresh is None:
            # A member contributing nothing would let the two others learn each other's vector.
            reason = "no_update"
        else:
            reason = self.session_kind.check_invite(self.params, invite)
        if reason is not None:
            self.counters.count_decline(reason)
            out = Outgoing(header.sender, m.Kind.DECLINE, m.Decline(reason), self.seq.next())
            self._queue(out, header.session)
            self._remember_session(header.session)  # its ABORT may still come: not a drop
            return
        assert self._fresh is not None
        if self.session is not None:
            self._process(self.session.abort("yielded"))
        contribution = self._fresh
        session, step = self.session_kind.join(self._session_ctx, header, invite,
                                               contribution, now)
        self._set_session(session, contribution)
        self._process(step)

    def _set_session(self, session: GroupSession, contribution: Contribution) -> None:
        self.session = session
        self._session_contribution = contribution
        self._remember_session(session.session_id)
        self._subscription(session, subscribe=True)  # queued before the session's first message

    def _subscription(self, session: GroupSession, *, subscribe: bool) -> None:
        topic_filter = self.session_kind.session_filter(self.network_id, session)
        if topic_filter is not None:
            self.outbox.put(Subscription(topic_filter, subscribe, session.session_id))

    def _remember_session(self, session_id: bytes) -> None:
        self._recent_sessions[session_id] = None
        while len(self._recent_sessions) > _RECENT_SESSIONS:
            self._recent_sessions.popitem(last=False)

    def _process(self, step: Step) -> None:
        """Send what a session step produced, count its drops, and settle a finished session."""
        session = self.session
        for reason in step.drops:
            self.drops.drop(reason)
        if session is not None:
            for out in step.out:
                self._queue(out, session.session_id)
        if session is None or not session.finished:
            return
        self.session = None
        self._subscription(session, subscribe=False)
        self._last_session_end = time.monotonic()
        contribution = self._session_contribution
        self._session_contribution = None
        duration = time.time() - session.started_at
        if session.result is not None:  # set exactly when a session is done
            self.counters.sessions_done += 1
            self._save_totals_soon()
            self._initiator_failures = 0
            if self._fresh is contribution:
                self._fresh = None  # shared: the next session needs a new update
            self._merge(session.result, contribution, session.started_at, duration)
        else:
            if session.role is Role.INITIATOR:
                self._initiator_failures += 1
            if session.members:
                self.counters.sessions_aborted += 1
            else:
                self.counters.sessions_not_formed += 1
            reason = (session.abort_reason or "unknown").split(":")[0]
            self.counters.count_abort(reason)
            log.info("%s: session %s aborted: %s", self.peer_id, session.session_id.hex()[:8],
                     session.abort_reason)
            self._emit("session_aborted", session_id=session.session_id, role=session.role.value,
                       members=session.members, formed=bool(session.members),
                       reason=session.abort_reason,
                       started_at=session.started_at, duration_s=duration)
        self._wake.set()
        self._round_wake.set()

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
            self._emit("merge_rejected", session_id=result.session_id, reason=exc.reason)
            merged = None
        self._emit("session_done", **session_done_data(result, contribution, staleness, merged,
                                                       started_at, duration))
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

    def _box_key_of(self, peer_id: str) -> bytes | None:
        member = self.membership.get(peer_id)
        return None if member is None else member.public.box_key

    # ------------------------------------------------------------------ sessions
    def _eligible(self, now: float) -> list[str]:
        return [
            mem.public.peer_id
            for mem in self.membership.live(now)
            if mem.public.peer_id != self.peer_id
            and mem.model_id == self.params.model_id
            and mem.param_count == self.params.param_count
        ]

    def offer_update(self, indices: np.ndarray, values: np.ndarray, round_: int = 0) -> None:
        """Make an update available for the next session (used by training and benchmarks)."""
        self._fresh = Contribution(
            indices=np.asarray(indices, dtype=np.uint32),
            values=np.asarray(values, dtype=np.float32),
            round=round_,
            fill=None if self.sharing is None else self.sharing.fill,
        )
        self._latest_round = max(self._latest_round, round_)
        self._wake.set()

    def try_start_session(self, now: float | None = None) -> bool:
        """Start a session now if possible (fresh update, free, >= 2 eligible live peers)."""
        now = time.time() if now is None else now
        if (self._stopping or self.session is not None or self._fresh is None
                or not self.transport.connected.is_set()
                or time.monotonic() - self._last_session_end < self.config.cooldown_s):
            return False
        k = min(self.params.group_size - 1 + max(0, self.config.over_invite), MAX_MEMBERS - 1)
        invitees = self.membership.sample(k, now, model_id=self.params.model_id,
                                          exclude={self.peer_id},
                                          param_count=self.params.param_count)
        invitees = [p for p in invitees if self._box_key_of(p) is not None]
        if len(invitees) < 2:
            return False
        contribution = self._fresh
        session, step = self.session_kind.initiate(self._session_ctx, os.urandom(16),
                                                   contribution, invitees[:k], now)
        self._set_session(session, contribution)
        self._process(step)
        return True

    async def _starter_loop(self) -> None:
        rng = secrets.SystemRandom()
        while not self._stopping:
            self._wake.clear()
            if self.session is None and self._fresh is not None:
                # Random delay, growing with consecutive failed invitations (collisions): a
                # peer that waits is likely to be invited by a neighbour instead.
                spread = self.config.start_jitter_s * 2 ** min(self._initiator_failures, 4)
                await asyncio.sleep(rng.uniform(0.0, spread))
                try:
                    if self.try_start_session():
                        continue
                except Exception:
                    # A bug must not stop this peer from ever inviting again.
                    log.exception("%s: could not start a session", self.peer_id)
                await asyncio.sleep(self.config.start_jitter_s)
                continue
            await wait_event(self._wake, 1.0)

    async def _ticker_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.config.tick_s)
            try:
                self._tick()
            except Exception:
                # A bug here must not freeze the session timeouts: log and keep ticking.
                log.exception("%s: session tick failed", self.peer_id)

    def _tick(self) -> None:
        """Expire silent peers (once a second), note connection changes, advance timeouts."""
        now = time.time()
        connected = self.transport.connected.is_set()
        if connected != self._was_connected:
            self._was_connected = connected
            self._ever_connected = self._ever_connected or connected
            self._round_wake.set()
            self._emit("connected" if connected else "disconnected",
                       reconnects=self.transport.reconnects)
        if now >= self._next_expiry:
            self._next_expiry = now + 1.0
            for gone in self.membership.expire(now):
                log.info("%s: %s went silent", self.peer_id, gone)
            self.view.tick(now)
            expired = self.inbound.expire_chunks(now)
            if expired:
                self.drops.drop("chunk_expired", "unfinished chunked message", expired)
            evicted = self.inbound.chunks.take_evicted()
            if evicted:
                self.drops.drop("chunk_evicted", "the largest sender's oldest message", evicted)
        session = self.session
        if session is not None and now >= session.deadline:
            self._process(session.on_timeout(now))

    async def _announce_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.config.announce_interval_s)
            if self.transport.connected.is_set():
                try:
                    await self._publish_announce()
                except (NotConnectedError, PayloadTooLargeError) as exc:
                    log.info("%s: announce not sent: %s", self.peer_id, exc)

    async def _checkpoint_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.config.checkpoint_interval_s)
            await self._checkpoint()

    async def _checkpoint(self) -> None:
        self._save_totals()
        if not self.config.train:
            return
        try:
            await asyncio.to_thread(self.trainer.save_checkpoint)
        except OSError as exc:
            log.error("%s: checkpoint failed: %s", self.peer_id, exc)

    def _save_totals(self) -> None:
        if self.totals_path is not None:
            save_sessions_total(self.totals_path,
                                self._sessions_before + self.counters.sessions_done)

    def _save_totals_soon(self) -> None:
        """Record the session total after each session, off the event loop (it fsyncs), so
        a SIGKILL loses at most the session in flight; one writer at a time."""
        if self.totals_path is None:
            return
        self._totals_dirty = True
        if self._totals_writer is None or self._totals_writer.done():
            self._totals_writer = asyncio.get_running_loop().create_task(self._write_totals())

    async def _write_totals(self) -> None:
        while self._totals_dirty:
            self._totals_dirty = False
            await asyncio.to_thread(self._save_totals)

    # ------------------------------------------------------------------ training (rounds.py)
    @property
    def stopping(self) -> bool:
        return self._stopping

    def pacing_state(self, now: float, next_private_at: float,
                     next_averaging_at: float) -> PacingState:
        """The facts the pacing decides on (RoundHost)."""
        return PacingState(
            now=now,
            connected=self.transport.connected.is_set(),
            eligible_peers=len(self._eligible(time.time())),
            update_pending=self._fresh is not None,
            budget_spent=self.gauges.budget_exhausted,
            can_average=self.rounds.can_average,
            next_private_at=next_private_at,
            next_averaging_at=next_averaging_at,
        )

    def round_done(self, update: Any) -> None:
        """A round finished (RoundHost): count it and offer its update to sessions."""
        self.counters.round += 1
        self.offer_update(update.indices, update.values, int(update.round))

    def withdraw_update(self) -> None:
        """Nothing fresh to contribute any more (RoundHost)."""
        self._fresh = None

    def emit(self, kind: str, **data: Any) -> None:
        self._emit(kind, **data)
