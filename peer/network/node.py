"""The Murmur peer: trains locally, meets its neighbours in aggregation sessions, merges.

``Peer.run(stop)`` runs concurrently, on one event loop:

* the MQTT transport (reconnects on its own; a broker restart costs only time);
* the training loop (peer/network/rounds.py): ``train_round`` in a worker thread, paced by the
  network and the budget (peer/network/pacing.py);
* the session starter of the peer's session seat (peer/network/session/seat.py): with a fresh
  update and no session in flight, invite g - 1 eligible live peers after a small random delay;
* a ticker that expires silent peers and advances the current session's timeouts;
* periodic signed, retained announcements and checkpoints.

The node owns the lifecycle, the transport and its wiring, the inbound checks, status and
drops; the session seat owns the one session a peer takes part in at a time (invitations, the
fresh update, settling and merging); peer/network/framing.py signs what either sends. Which
announcements a peer follows is peer/network/view/loop.py's business (every one, or a few
buckets with lookups of senders outside them: docs/design/partial-view.md).

Membership is asserted only by the peer itself: its signed, retained ANNOUNCE names a fresh
connection id for every broker connection, its last will is a LEAVE it signed for that
connection when it opened it, and on a clean stop it publishes a signed LEAVE for it. Nobody
else can remove it from other peers' views (peer/network/view/membership.py).

Every inbound message passes the checks of peer/network/inbound.py before it reaches a
session; each failure is a counted drop with a reason (``status().drops``), so nothing on the
wire can crash a peer. Large session messages travel as signed CHUNKs (bounded reassembly).

(About 475 lines, past the usual ~450: this is the one place a peer's parts are wired to its
I/O; each method is a few lines of wiring that would only move, not shrink, if split off.)
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import time
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
    SessionTotals,
    state_word,
)
from peer.network.framing import Framer
from peer.network.inbound import InboundChecks
from peer.network.outbox import Outbox, Subscription
from peer.network.pacing import PacingState, can_form_group
from peer.network.rounds import RoundLoop, TrainingGauges
from peer.network.session.common import SessionContext
from peer.network.session.group import GroupSession
from peer.network.session.kinds import build_kind, session_params
from peer.network.session.seat import SeatHooks, SessionSeat
from peer.network.settings import EventCallback, NodeConfig, PeerEvent, Trainer
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
from peer.resources import peak_rss_mb
from peer.sharing import SharingStrategy
from peer.waiting import stop_tasks
from protocol import messages as m
from protocol.chunks import ChunkReassembler, ReassemblyLimits, check_max_message_bytes
from protocol.errors import ProtocolError
from protocol.limits import CONNECTION_ID_BYTES
from protocol.topics import announce_topic, inbox_filter

__all__ = ["EventCallback", "NodeConfig", "Peer", "PeerEvent", "Trainer"]

#: Shutdown bounds: background tasks to end after cancellation, the clean disconnect.
_TASK_STOP_S = 5.0
_DISCONNECT_S = 15.0

log = logging.getLogger(__name__)


class Peer:
    """One Murmur peer; ``peer.assembly`` builds it (daemon and simulation alike).

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
        group_steps: Any = None,
    ) -> None:
        self.identity = identity
        self.peer_id = identity.peer_id
        self.certificate = certificate
        self.network_id = network_id
        self.trainer = trainer
        self.config = cfg = config or NodeConfig()
        self.on_event = on_event
        # Residual fill (docs/sessions.md, "Sparse supports"): the strategy lends this peer's
        # values outside its top-k and settles what a session shared. None: zeros there.
        self.sharing = sharing
        check_max_message_bytes(cfg.max_message_bytes)
        # The session kind (peer/network/session/kinds.py) is part of the model id peers
        # group by, so peers of different kinds never meet in a session.
        self.session_kind = build_kind(cfg.session_kind, cfg.timeouts, cfg.masked_timeouts)
        self.params = session_params(network_id, cfg, trainer, self.session_kind)
        self.membership = MembershipView(network_id, admission_public_key, self.peer_id,
                                         silence_expiry_s=cfg.silence_expiry_s,
                                         clock_skew_s=cfg.clock_skew_s)
        # What this peer holds for others (chunks of unfinished messages, messages waiting
        # for a lookup) is sized from its own model and group: docs/protocol.md section 11.
        self.held_limits = ReassemblyLimits.for_sessions(self.params.vector_coordinates,
                                                          cfg.group_size)
        self.inbound = InboundChecks(network_id, self.peer_id, self.membership, ReplayWindow(),
                                     chunks=ChunkReassembler(self.held_limits))
        self.seq = m.SequenceCounter()
        self.drops = DropCounter(self.peer_id)
        self.counters = SessionCounters()  # figures for status()
        self._connection_id = b""  # fresh for every broker connection (announcements, will)
        self.transport = self._make_transport(broker, client_id)
        # Our messages, in order; (un)subscriptions to session topics go through it too.
        self.outbox = Outbox(self.transport, self.counters, self.peer_id,
                             lambda sid: self.seat.abort("subscribe_failed", sid))
        self.framer = Framer(network_id=network_id, identity=identity, seq=self.seq,
                             max_message_bytes=cfg.max_message_bytes, outbox=self.outbox,
                             counters=self.counters)
        self._stopping = False
        self._next_expiry = 0.0
        self._round_wake = asyncio.Event()  # the training loop's: a session ended, a link changed
        self._was_connected = self._ever_connected = False
        self._tail_announce: asyncio.Task[None] | None = None  # the tail's model id, at once
        self.gauges = TrainingGauges.of(trainer)
        self.seat = self._make_seat()
        # Group noise (peer/group_steps.py): each private step is one session's release.
        self.group_steps = self.seat.group_steps = group_steps
        self.view = self._make_view()
        self.rounds = RoundLoop(self, cfg.pacing, self._round_wake,
                                round_pause_s=cfg.round_pause_s,
                                evaluate_every=cfg.evaluate_every)
        # Totals since the peer was created: rounds from the trainer's checkpoint, sessions
        # from this small file (written with each checkpoint).
        self.totals = SessionTotals(totals_path, self.counters)

    # ------------------------------------------------------------------ construction
    def _make_seat(self) -> SessionSeat:
        """The seat of this peer's one session at a time, wired to this peer's I/O."""
        ctx = SessionContext(identity=self.identity, params=self.params,
                             box_key_of=self.membership.box_key_of, next_seq=self.seq.next,
                             secret_tap=self.config.secret_tap)
        hooks = SeatHooks(
            send=self.framer.queue,
            subscription=lambda topic_filter, on, sid: self.outbox.put(
                Subscription(topic_filter, on, sid)),
            emit=self.emit,
            ended=self._session_ended,
            connected=self.transport.connected.is_set,
            stopping=lambda: self._stopping,
            budget_spent=lambda: self.gauges.budget_exhausted,
        )
        return SessionSeat(session_kind=self.session_kind, ctx=ctx, config=self.config,
                           membership=self.membership, counters=self.counters,
                           drops=self.drops, trainer=self.trainer, sharing=self.sharing,
                           hooks=hooks)

    def _make_view(self) -> ViewKeeper:
        """Which announcements this peer follows, and lookups of senders outside them."""
        return ViewKeeper(
            network_id=self.network_id, peer_id=self.peer_id, config=self.config.view,
            membership=self.membership, transport=self.transport, drops=self.drops,
            pinned=lambda: [] if self.session is None else self.session.participants(),
            current_session=lambda: None if self.session is None else self.session.session_id,
            redeliver=self._handle, dispatch=self.seat.dispatch,
            held_bytes=self.held_limits.max_buffered_bytes)

    # ------------------------------------------------------------------ status / events
    def _make_transport(self, broker: BrokerSettings, client_id: str | None) -> Transport:
        """The MQTT client: our announcements and our inbox; our will is our signed leave."""
        net = self.network_id
        return Transport(broker, client_id=client_id or f"murmur-{net}-{self.peer_id}"[:64],
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
        return self._leave("connection lost")

    def _leave(self, reason: str) -> WillMessage:
        """This connection's LEAVE, retained on the announce topic: it replaces the peer's
        announcement, so newcomers do not invite it."""
        payload = self.framer.encode(m.Kind.LEAVE, b"", m.Leave(reason, self._connection_id))
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
            clip_norm=getattr(self.trainer, "clip_norm", None),
            rounds_total=int(getattr(self.trainer, "round", self.counters.round)),
            engine=str(getattr(self.trainer, "engine", "")),
            sessions_total=self.totals.total,
            peers_live=eligible,
            view_peers=len(self.membership),
            view_buckets=self.view.followed_buckets,
            peak_rss_mb=peak_rss_mb(),
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

    def emit(self, kind: str, **data: Any) -> None:
        """Hand an event to ``on_event`` (the sim's metrics, RoundHost); never raises."""
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
            tasks.append(asyncio.create_task(self.seat.starter_loop()))
        training = asyncio.create_task(self.rounds.run()) if self.config.train else None
        try:
            await stop.wait()
        finally:
            self._stopping = True
            await self._shutdown(tasks, training, transport_task, transport_stop)

    async def _shutdown(self, tasks: list[asyncio.Task[None]],
                        training: asyncio.Task[None] | None, transport_task: asyncio.Task[None],
                        transport_stop: asyncio.Event) -> None:
        self.seat.abort("peer_stopping")
        # Let the aborts and the leave go out while still connected (bounded wait).
        if self.transport.connected.is_set():
            with contextlib.suppress(ProtocolError, ValueError):
                self.outbox.put(self._leave("stopping"))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self.outbox.drained()
        if training is not None:
            # The round in flight finishes in its thread (it cannot be interrupted safely);
            # its ledger entry is already on disk, so nothing is forgotten.
            tasks = [*tasks, training]
        await stop_tasks(tasks, _TASK_STOP_S, self.peer_id)
        await self._checkpoint()
        transport_stop.set()
        try:
            async with asyncio.timeout(_DISCONNECT_S):
                await transport_task
        except TimeoutError:
            log.warning("%s: broker disconnect did not finish in time", self.peer_id)

    # ------------------------------------------------------------------ announcing
    async def _on_connected(self) -> None:
        self.view.on_connected()
        await self._publish_announce()

    async def _publish_announce(self) -> None:
        body = m.Announce(certificate=self.certificate.to_bytes(), model_id=self.params.model_id,
                          param_count=self.params.param_count, connection=self._connection_id)
        payload = self.framer.encode(m.Kind.ANNOUNCE, b"", body)
        await self.transport.publish(announce_topic(self.network_id, self.peer_id), payload,
                                     retain=True)

    # ------------------------------------------------------------------ inbound
    async def _on_message(self, incoming: Incoming) -> None:
        self._handle(incoming, time.time())

    def _handle(self, incoming: Incoming, now: float) -> None:
        """Check one inbound message end to end (every refusal is a counted drop); also what a
        message held for a lookup goes through again (peer/network/view/loop.py)."""
        try:
            admitted = self.inbound.admit(incoming, now)
        except DroppedError as exc:
            if not self.view.hold_unknown(exc, incoming, now):
                self.drops.drop(exc.reason, exc.detail)
            return
        if admitted is None:
            self.view.on_admitted(incoming, now)
        elif not self.view.hold_admitted(admitted.header, admitted.body, now):
            self.seat.dispatch(admitted.header, admitted.body, now)

    # ------------------------------------------------------------------ sessions (seat)
    @property
    def session(self) -> GroupSession | None:
        """The session this peer takes part in now (None: it is free)."""
        return self.seat.session

    def offer_update(self, indices: np.ndarray, values: np.ndarray, round_: int = 0) -> None:
        """Make an update available for the next session (used by training and benchmarks)."""
        self.seat.offer_update(indices, values, round_)

    def try_start_session(self, now: float | None = None) -> bool:
        """Start a session now if possible (fresh update, free, >= 2 eligible live peers)."""
        return self.seat.try_start_session(now)

    def _session_ended(self, done: bool) -> None:
        """A session finished (the seat's hook): record a done one, wake the training loop."""
        if done:
            self.totals.save_soon()
        self._round_wake.set()

    def _eligible(self, now: float) -> list[str]:
        return self.membership.eligible(now, model_id=self.params.model_id,
                                        param_count=self.params.param_count)

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
            self.emit("connected" if connected else "disconnected",
                       reconnects=self.transport.reconnects)
        if now >= self._next_expiry:
            self._next_expiry = now + 1.0
            for gone in self.membership.expire(now):
                log.info("%s: %s went silent", self.peer_id, gone)
            self.view.tick(now)
            self.inbound.expire_chunks(now, self.drops)
        self.seat.tick(now)

    async def _announce_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.config.announce_interval_s)
            await self._announce_once()

    async def _announce_once(self) -> None:
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
        self.totals.save()
        if not self.config.train:
            return
        try:
            await asyncio.to_thread(self.trainer.save_checkpoint)
        except OSError as exc:
            log.error("%s: checkpoint failed: %s", self.peer_id, exc)

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
            update_pending=self.seat.update_pending,
            budget_spent=self.gauges.budget_exhausted,
            can_average=self.rounds.can_average,
            next_private_at=next_private_at,
            next_averaging_at=next_averaging_at,
            tail_peers=self.seat.tail_peers(time.time()),
        )

    def enter_averaging_tail(self) -> bool:
        """Group noise (RoundHost): announce, invite and accept by the averaging tail's model
        id from now on (docs/privacy.md, "The averaging tail"); False while a session is in
        flight (nothing changed)."""
        params = self.seat.enter_tail()
        if params is None:
            return False
        self.params = params
        self._tail_announce = asyncio.get_running_loop().create_task(self._announce_once())
        return True

    def round_done(self, update: Any) -> None:
        """A round finished (RoundHost): count it and offer its update to sessions."""
        self.counters.round += 1
        self.offer_update(update.indices, update.values, int(update.round))

    def offer_group_step(self, step: Any, rounds: int, initiate: bool = True) -> None:
        """A group-noise share is ready (RoundHost); ``rounds``: rounds done; ``initiate``
        False: it only answers invitations."""
        self.counters.round = rounds
        self.seat.offer_group_step(step, initiate)

    def withdraw_update(self) -> None:
        """Nothing fresh to contribute any more (RoundHost)."""
        self.seat.withdraw_update()
