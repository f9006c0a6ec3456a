"""A peer's outgoing messages, sent in order: publishes pipelined, (un)subscriptions awaited.

Everything the node sends goes through one :class:`Outbox`, so the broker sees a peer's
messages in the order the sessions produced them (the protocol relies on per-sender order:
an INVITE before the SHARE that follows it). Publishes between two subscription changes go out
together (their QoS 1 acknowledgements overlap); a subscription waits for the broker's SUBACK
before anything queued after it is sent, so a session's members are subscribed to its topic
before any of them can publish there. Failures are counted (``send_failures``) and logged, never
raised: a peer that cannot send keeps running, and its sessions time out.
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
        self._sending = False

    def put(self, item: Publish | Subscription) -> None:
        self._queue.put_nowait(item)

    async def drained(self) -> None:
        """Return once everything queued so far has been handed to the broker."""
        while not self._queue.empty() or self._sending:
            await asyncio.sleep(0.01)

    async def run(self) -> None:
        """Send queued items in order, a batch at a time, until cancelled."""
        while True:
            first = await self._queue.get()
            batch = [first]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._sending = True
            try:
                await self._send_batch(batch)
            finally:
                self._sending = False

    async def _send_batch(self, batch: list[Publish | Subscription]) -> None:
        publishes: list[Publish] = []
        for item in [*batch, None]:
            if isinstance(item, tuple):
                publishes.append(item)
                continue
            if publishes:
                await self._publish_all(publishes)
                publishes = []
            if item is None:
                return
            change = self.transport.subscribe if item.subscribe else self.transport.unsubscribe
            if not await change(item.topic_filter) and item.subscribe:
                self.counters.send_failures += 1
                self.on_subscribe_failed(item.session_id)

    async def _publish_all(self, batch: list[Publish]) -> None:
        # Tasks start in creation order, so paho queues the packets in batch order.
        results = await asyncio.gather(
            *(self.transport.publish(t, p, retain=r) for t, p, r in batch),
            return_exceptions=True,
        )
        for (topic, _p, _r), res in zip(batch, results, strict=True):
            if isinstance(res, NotConnectedError | PayloadTooLargeError):
                self.counters.send_failures += 1
                log.info("%s: could not send on %s: %s", self.peer_id, topic, res)
            elif isinstance(res, BaseException):
                self.counters.send_failures += 1
                log.error("%s: unexpected send error on %s: %r", self.peer_id, topic, res)
