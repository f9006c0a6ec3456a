"""The MQTT side every party of private predictions shares: one Transport, an ordered and
bounded send queue drained by one task, and inbound messages handed to the party's
``on_message`` with every refusal counted (never raised out of the handler).

Nothing here is trusted or secret: payloads are already signed and sealed by the party
(``peer.inference.endpoint``); the queue is bounded in messages so a party that cannot send
fast enough drops (``send_queue_full``) instead of growing without bound.
"""

from __future__ import annotations

import asyncio
import logging
import os

from peer.errors import DroppedError
from peer.inference.endpoint import InferenceEndpoint
from peer.network.broker_settings import BrokerSettings
from peer.network.transport import Incoming, Transport, TransportError
from protocol.limits import MAX_PAYLOAD_BYTES

log = logging.getLogger(__name__)

#: Messages waiting to be published, at most.
MAX_QUEUED_SENDS = 4096


class InferenceParty:
    """Base of the serving peer, the model owner and the client: start, stop, send, receive."""

    role_suffix = "inference"

    def __init__(self, endpoint: InferenceEndpoint, broker: BrokerSettings,
                 subscriptions: list[str]) -> None:
        self.endpoint = endpoint
        # A fresh suffix per instance: a lingering earlier instance of the same party (a
        # restart, a second process) must not take this connection over, nor this one it.
        self.transport = Transport(
            broker, client_id=f"{endpoint.peer_id}-{self.role_suffix}-{os.urandom(4).hex()}",
            subscriptions=subscriptions, will=None, on_connected=self.on_connected,
            max_payload=MAX_PAYLOAD_BYTES)
        self._outgoing: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue(MAX_QUEUED_SENDS)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.send_failures = 0

    @property
    def drops(self) -> dict[str, int]:
        """Refused inbound messages by reason (a public read-out for tests and status)."""
        return self.endpoint.drops.snapshot()

    async def start(self, timeout_s: float = 10.0) -> None:
        """Connect and subscribe; TransportError if the broker is not reached in time."""
        self._tasks = [asyncio.create_task(self.transport.run(self._handle, self._stop)),
                       asyncio.create_task(self._sender())]
        try:
            await asyncio.wait_for(self.transport.connected.wait(), timeout_s)
        except TimeoutError:
            await self.stop()
            raise TransportError(f"no broker at {self.transport.settings.url}") from None

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Disconnect cleanly; a transport that has not returned after ``timeout_s`` is
        cancelled, so stopping never hangs on a stuck broker."""
        self._stop.set()
        for task in self._tasks[1:]:
            task.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            _, stuck = await asyncio.wait(self._tasks, timeout=timeout_s)
            if stuck:
                log.warning("%s: %d task(s) did not stop", self.endpoint.peer_id, len(stuck))
            for task in self._tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    log.warning("%s: %s", self.endpoint.peer_id, task.exception())
        self._tasks = []

    async def on_connected(self) -> None:
        """Called after every (re)connection; subclasses republish retained state."""

    def send(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        try:
            self._outgoing.put_nowait((topic, payload, retain))
        except asyncio.QueueFull:
            self.endpoint.drops.drop("send_queue_full", topic)

    async def _sender(self) -> None:
        while True:
            topic, payload, retain = await self._outgoing.get()
            try:
                await self.transport.connected.wait()
                await self.transport.publish(topic, payload, retain=retain)
            except TransportError as exc:
                self.send_failures += 1
                log.warning("%s: publish to %s failed: %s", self.endpoint.peer_id, topic, exc)
            finally:
                self._outgoing.task_done()

    async def flush(self, timeout_s: float) -> None:
        """Wait until everything queued so far was published (or failed); TimeoutError."""
        await asyncio.wait_for(self._outgoing.join(), timeout_s)

    async def _handle(self, incoming: Incoming) -> None:
        try:
            await self.on_message(incoming)
        except DroppedError as exc:
            self.endpoint.drops.drop(exc.reason, exc.detail)

    async def on_message(self, incoming: Incoming) -> None:
        raise NotImplementedError
