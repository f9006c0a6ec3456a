"""A peer's outgoing messages, sent in order: publishes pipelined, (un)subscriptions awaited.

Everything the node sends goes through one :class:`Outbox`, so the broker sees a peer's
messages in the order the sessions produced them (the protocol relies on per-sender order:
an INVITE before the SHARE that follows it). A publish is handed to the MQTT client as soon as
it is dequeued and its QoS 1 acknowledgement is awaited in the background (at most
``MAX_IN_FLIGHT`` at a time), so a message queued while earlier ones wait for their PUBACK
does not wait a broker round trip: that wait sat on every step of a session. A subscription
waits for the broker's SUBACK before anything queued after it is sent, so a session's members
are subscribed to its topic before any of them can publish there. Failures are counted
(``send_failures``) and logged, never raised: a peer that cannot send keeps running, and its
sessions time out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from peer.network.counters import SessionCounters
from peer.network.transport import NotConnectedError, PayloadTooLargeError, Transport

log = logging.getLogger(__name__)

#: topic, payload, retain
Publish = tuple[str, bytes, bool]

#: Publishes awaiting their PUBACK at once (paho's own default window is 20; more wait there).
MAX_IN_FLIGHT = 64


@dataclass(frozen=True)
class Subscription:
    """(Un)subscribe ``topic_filter`` for session ``session_id``, in order with the publishes
    around it."""

    topic_filter: str
    subscribe: bool
    session_id: bytes


class Outbox:
    """The ordered send queue of one peer; :meth:`run` is its sender task."""

    def __init__(self, transport: Transport, counters: SessionCounters, peer_id: str,
                 on_subscribe_failed: Callable[[bytes], None]) -> None:
        self.transport = transport
        self.counters = counters
        self.peer_id = peer_id
        self.on_subscribe_failed = on_subscribe_failed
        self._queue: asyncio.Queue[Publish | Subscription] = asyncio.Queue()
        self._busy = False
        self._in_flight: set[asyncio.Task[None]] = set()

    def put(self, item: Publish | Subscription) -> None:
        self._queue.put_nowait(item)

    async def drained(self) -> None:
        """Return once everything queued so far has been handed to the broker and
        acknowledged (or failed)."""
        while not self._queue.empty() or self._busy or self._in_flight:
            await asyncio.sleep(0.01)

    async def run(self) -> None:
        """Send queued items in order until cancelled; then cancel what is still in flight."""
        try:
            while True:
                item = await self._queue.get()
                self._busy = True
                try:
                    if isinstance(item, tuple):
                        await self._start_publish(item)
                    else:
                        await self._change_subscription(item)
                finally:
                    self._busy = False
        finally:
            for task in self._in_flight:
                task.cancel()

    async def _start_publish(self, item: Publish) -> None:
        while len(self._in_flight) >= MAX_IN_FLIGHT:
            await asyncio.wait(self._in_flight, return_when=asyncio.FIRST_COMPLETED)
        # Tasks take their first step in creation order, and that step hands the packet to
        # paho, so packets leave in queue order.
        task = asyncio.create_task(self._publish(item))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _publish(self, item: Publish) -> None:
        topic, payload, retain = item
        try:
            await self.transport.publish(topic, payload, retain=retain)
        except (NotConnectedError, PayloadTooLargeError) as exc:
            self.counters.send_failures += 1
            log.info("%s: could not send on %s: %s", self.peer_id, topic, exc)
        except Exception as exc:
            self.counters.send_failures += 1
            log.error("%s: unexpected send error on %s: %r", self.peer_id, topic, exc)

    async def _change_subscription(self, item: Subscription) -> None:
        await asyncio.sleep(0)  # publishes queued before it reach the client first
        change = self.transport.subscribe if item.subscribe else self.transport.unsubscribe
        if not await change(item.topic_filter) and item.subscribe:
            self.counters.send_failures += 1
            self.on_subscribe_failed(item.session_id)
