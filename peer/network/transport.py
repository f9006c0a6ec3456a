"""MQTT transport of a Murmur peer: one aiomqtt connection, kept alive for the life of the peer.

What this layer guarantees, and what it does not:

* It moves opaque bytes. Every Murmur payload is signed (and every share sealed) *above* this
  layer, so nothing here is trusted: the broker, the network and other clients may drop,
  delay, duplicate or forge messages, and the peer's checks (protocol/, crypto/, membership)
  decide what to accept. TLS and broker credentials (``mqtts://``, username/password, client
  certificates) are a second wall that keeps strangers off the broker, not the first.
* QoS 1 both ways (at least once): a message may arrive twice; replay windows above this layer
  drop the duplicate.
* A payload larger than ``max_payload`` is refused *before* it is sent
  (:class:`PayloadTooLargeError`), so a peer never asks the broker to carry what the receiving
  peers would drop anyway.
* TCP_NODELAY on the client socket. Measured on this project: one MQTT request/response hop
  between two clients costs ~88 ms with Nagle's algorithm and delayed ACKs, ~0.55 ms without.
  An aggregation session makes several such hops.
* The connection survives broker restarts: any :class:`aiomqtt.MqttError` leads to a reconnect
  with capped exponential backoff and full jitter (so a fleet that lost its broker does not
  reconnect in lock-step). A handler that raises is logged and counted; it never ends the loop.
* The last will (for a Murmur peer: a signed LEAVE, retained, on its announce topic) is
  published by the broker only if the connection dies without a DISCONNECT; a clean stop
  sends DISCONNECT, so a peer that leaves on purpose publishes its own leave first. The will
  is built afresh for every connection (``will`` may be a callable), so each connection's
  will can name that connection and no other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiomqtt

from peer.errors import PeerError
from peer.network.broker_settings import MQTT_VERSIONS, BrokerSettings
from peer.network.inbound_queue import (
    DEFAULT_MAX_QUEUED_INCOMING,
    DEFAULT_MAX_QUEUED_INCOMING_BYTES,
    INBOUND_OVER_BUDGET,
    IncomingQueue,
)
from protocol.limits import MAX_PAYLOAD_BYTES

__all__ = ["MQTT_VERSIONS", "BrokerSettings", "Incoming", "NotConnectedError",
           "PayloadTooLargeError", "Transport", "TransportError", "WillMessage", "backoff_delay"]

_log = logging.getLogger(__name__)


# Seconds to wait for the broker to acknowledge a QoS 1 publish before calling it lost.
DEFAULT_PUBLISH_TIMEOUT_S = 10.0


class TransportError(PeerError):
    """The transport could not do what was asked."""


class NotConnectedError(TransportError):
    """No live broker connection right now (or it was lost while publishing)."""


class PayloadTooLargeError(TransportError):
    """A payload exceeds the configured maximum; it was not sent."""


@dataclass(frozen=True)
class Incoming:
    """One message from the broker, exactly as received (untrusted)."""

    topic: str
    payload: bytes
    retain: bool


Handler = Callable[[Incoming], Awaitable[None]]
#: (topic, payload, retain) of a last will.
WillMessage = tuple[str, bytes, bool]


def _is_failure(code: object) -> bool:
    """A SUBACK code that refuses the subscription (paho ReasonCode or a bare int)."""
    if isinstance(code, int):
        return code >= 0x80
    return bool(getattr(code, "is_failure", False))


def backoff_delay(attempt: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Delay before reconnect attempt ``attempt`` (0-based): full jitter over a capped doubling.

    Full jitter (uniform in [0, cap]) spreads the reconnects of many peers that lost the same
    broker at the same moment; the cap bounds how long a peer stays away after a long outage.
    A floor of 10 % of the initial delay keeps a tight loop from hammering a refusing broker.
    """
    cap = min(max_s, initial_s * (2.0 ** min(attempt, 32)))
    return max(initial_s * 0.1, rng.uniform(0.0, cap))


class Transport:
    """A self-healing MQTT connection that feeds incoming messages to one async handler.

    ``run()`` owns the connection; ``publish()`` may be called from any task on the same event
    loop while connected. Counters are cumulative over reconnects.

    The handler is awaited for one message at a time, in arrival order: the protocol above
    relies on per-sender ordering (an INVITE before the SHARE that follows it), and MQTT keeps
    that order only if the consumer does. A slow handler therefore delays the next message;
    handlers should hand long work to other tasks.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        client_id: str,
        subscriptions: Sequence[str],
        will: WillMessage | Callable[[], WillMessage] | None,
        on_connected: Callable[[], Awaitable[None]] | None,
        max_payload: int,
        backoff_initial_s: float = 0.2,
        backoff_max_s: float = 10.0,
        max_queued_incoming: int = DEFAULT_MAX_QUEUED_INCOMING,
        max_queued_incoming_bytes: int = DEFAULT_MAX_QUEUED_INCOMING_BYTES,
        on_refused: Callable[[str, int], None] | None = None,
        publish_timeout_s: float = DEFAULT_PUBLISH_TIMEOUT_S,
        tcp_nodelay: bool = True,
    ) -> None:
        if max_payload <= 0:
            raise ValueError(f"max_payload must be positive, got {max_payload}")
        if not 0 < backoff_initial_s <= backoff_max_s:
            raise ValueError("need 0 < backoff_initial_s <= backoff_max_s")
        if not client_id:
            raise ValueError("client_id must not be empty")
        self.settings = settings
        self.client_id = client_id
        self.subscriptions = tuple(subscriptions)
        self.will = will
        self.on_connected = on_connected
        self.max_payload = max_payload
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.max_queued_incoming = max_queued_incoming
        self.max_queued_incoming_bytes = max_queued_incoming_bytes
        self.on_refused = on_refused  # (reason, payload bytes) of each message refused inbound
        self.incoming_refused = 0
        self.publish_timeout_s = publish_timeout_s
        self.tcp_nodelay = tcp_nodelay  # False only to measure what Nagle's algorithm costs

        self.connected = asyncio.Event()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages_sent = 0
        self.messages_received = 0
        self.reconnects = 0
        self.connect_failures = 0
        self.handler_errors = 0
        self.subscribe_failures = 0
        self.last_error: str | None = None

        self._client: aiomqtt.Client | None = None
        self._ever_connected = False
        self._had_session = False  # did the current/last connection attempt get subscribed?
        # Jitter only spreads reconnect times; it needs no cryptographic strength.
        self._rng = random.Random()

    # ----------------------------------------------------------------------------- connection
    def _make_client(self) -> aiomqtt.Client:
        host, port, _tls = self.settings.endpoint()
        will = None
        if self.will is not None:
            # A callable is asked once per connection attempt (a will bound to it).
            will_topic, will_payload, will_retain = (
                self.will() if callable(self.will) else self.will)
            will = aiomqtt.Will(will_topic, will_payload, qos=1, retain=will_retain)
        try:
            tls_context = self.settings.tls_context()
        except (OSError, ssl.SSLError) as exc:
            # A missing or unreadable CA/certificate file is a configuration error, not a
            # network hiccup: retrying would not fix it, so it ends run().
            raise TransportError(f"cannot set up TLS for {self.settings.url}: {exc}") from exc
        # A fresh session on every connect: queued traffic for a previous connection would
        # belong to aggregation sessions that have timed out by now.
        session_options: dict[str, Any]
        if self.settings.mqtt_version == "5":
            session_options = {"protocol": aiomqtt.ProtocolVersion.V5,
                               "clean_start": True}
        else:
            session_options = {"protocol": aiomqtt.ProtocolVersion.V311, "clean_session": True}
        client = aiomqtt.Client(
            host,
            port,
            username=self.settings.username,
            password=self.settings.password,
            identifier=self.client_id,
            will=will,
            **session_options,
            keepalive=self.settings.keepalive_s,
            tls_context=tls_context,
            max_queued_incoming_messages=self.max_queued_incoming,
            queue_type=self._incoming_queue,  # type: ignore[arg-type]  (a factory, not a class)
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(self.tcp_nodelay))],
        )
        # A session sends a burst of QoS 1 messages whose acks overlap; aiomqtt warns above
        # 10 pending calls, which is normal here.
        client.pending_calls_threshold = 1000
        return client

    def _incoming_queue(self, maxsize: int = 0) -> IncomingQueue:
        """A fresh inbound queue for each connection (aiomqtt calls it with ``maxsize``)."""
        return IncomingQueue(maxsize, max_bytes=self.max_queued_incoming_bytes,
                             max_message_bytes=MAX_PAYLOAD_BYTES,
                             on_refused=self._refused_inbound)

    def _refused_inbound(self, size: int) -> None:
        self.incoming_refused += 1
        if self.on_refused is not None:
            self.on_refused(INBOUND_OVER_BUDGET, size)

    async def run(self, handler: Handler, stop: asyncio.Event) -> None:
        """Stay connected and feed every incoming message to ``handler`` until ``stop`` is set.

        Returns after a clean disconnect (DISCONNECT sent, so the broker does not publish the
        will). Never raises for network or broker trouble: it logs and reconnects.
        """
        attempt = 0
        stop_waiter = asyncio.ensure_future(stop.wait())
        connection: asyncio.Future[bool] | None = None
        try:
            while not stop.is_set():
                connection = asyncio.ensure_future(self._connection(handler, stop_waiter))
                await asyncio.wait({connection, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
                if not connection.done():
                    # stop was set while connecting or connected: _connection notices it when
                    # connected; while still connecting there is nothing to save.
                    if self.connected.is_set():
                        await connection
                    else:
                        connection.cancel()
                        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                            await connection
                    break
                try:
                    was_connected = connection.result()
                except aiomqtt.MqttError as exc:
                    was_connected = self._had_session
                    self.last_error = str(exc)
                    if not was_connected:
                        self.connect_failures += 1
                    _log.warning("%s: broker connection %s: %s", self.client_id,
                                 "lost" if was_connected else "failed", exc)
                if stop.is_set():
                    break
                attempt = 0 if was_connected else attempt + 1
                delay = backoff_delay(attempt, self.backoff_initial_s, self.backoff_max_s,
                                      self._rng)
                # asyncio.wait neither cancels stop_waiter nor can swallow our cancellation.
                await asyncio.wait({stop_waiter}, timeout=delay)
        finally:
            stop_waiter.cancel()
            if connection is not None and not connection.done():
                # run() itself was cancelled: take the connection down with it.
                connection.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await connection
            self._detach()

    async def _connection(self, handler: Handler, stop_waiter: asyncio.Future[bool]) -> bool:
        """One connection's life; returns True after a clean stop. MqttError when it breaks."""
        self._had_session = False
        client = self._make_client()
        async with client:
            for topic in self.subscriptions:
                granted = await client.subscribe(topic, qos=1)
                if any(_is_failure(code) for code in granted):
                    # Typically a broker ACL: the peer runs but will not hear this filter.
                    self.subscribe_failures += 1
                    _log.error("%s: broker refused the subscription to %s", self.client_id,
                               topic)
            self._client = client
            self._had_session = True
            if self._ever_connected:
                self.reconnects += 1
            self._ever_connected = True
            self.connected.set()
            _log.info("%s: connected to %s", self.client_id, self.settings.url)
            # on_connected (e.g. publishing the announcement) runs beside the consumer so that
            # it may wait on replies without deadlocking the message loop.
            hook = asyncio.ensure_future(self._call_on_connected())
            consumer = asyncio.ensure_future(self._consume(client, handler))
            try:
                await asyncio.wait({consumer, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._detach()
                for task in (hook, consumer):
                    task.cancel()
                for task in (hook, consumer):
                    with contextlib.suppress(asyncio.CancelledError):
                        # Re-raises the consumer's MqttError when the connection broke.
                        await task
        # Leaving the context manager sent DISCONNECT: the will is discarded by the broker.
        return True

    def _detach(self) -> None:
        self.connected.clear()
        self._client = None

    async def _call_on_connected(self) -> None:
        if self.on_connected is None:
            return
        try:
            await self.on_connected()
        except asyncio.CancelledError:
            raise
        except (TransportError, aiomqtt.MqttError) as exc:
            # The consumer sees the same broken connection and triggers the reconnect.
            _log.warning("%s: on_connected could not publish: %s", self.client_id, exc)
        except Exception:
            self.handler_errors += 1
            _log.exception("%s: on_connected hook failed", self.client_id)

    async def _consume(self, client: aiomqtt.Client, handler: Handler) -> None:
        async for message in client.messages:
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                # paho always hands bytes; anything else means a library change, not an attack.
                _log.warning("%s: dropping message with %s payload", self.client_id,
                             type(payload).__name__)
                continue
            incoming = Incoming(str(message.topic), bytes(payload), bool(message.retain))
            self.messages_received += 1
            self.bytes_received += len(incoming.payload)
            try:
                await handler(incoming)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug or a hostile payload must never take the peer off the network.
                self.handler_errors += 1
                _log.exception("%s: handler failed on a message on %s", self.client_id,
                               incoming.topic)

    # -------------------------------------------------------------------------------- publish
    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish with QoS 1 and wait for the broker's acknowledgement.

        Raises PayloadTooLargeError (checked first, nothing sent) or NotConnectedError (no
        connection, or it broke before the broker acknowledged: the message may or may not
        have been delivered).
        """
        if len(payload) > self.max_payload:
            raise PayloadTooLargeError(
                f"payload of {len(payload)} bytes exceeds the limit of {self.max_payload} bytes"
            )
        client = self._client
        if client is None or not self.connected.is_set():
            raise NotConnectedError(f"not connected to {self.settings.url}")
        try:
            await client.publish(topic, payload, qos=1, retain=retain,
                                 timeout=self.publish_timeout_s)
        except aiomqtt.MqttError as exc:
            raise NotConnectedError(f"publish to {topic} failed: {exc}") from exc
        self.messages_sent += 1
        self.bytes_sent += len(payload)

    # ------------------------------------------------------------------ dynamic subscriptions
    async def subscribe(self, topic_filter: str) -> bool:
        """Subscribe the live connection to ``topic_filter`` (QoS 1); wait for the SUBACK.

        True once the broker granted it. False, and nothing else happens, when not connected;
        False too when the broker refused it (counted in ``subscribe_failures``) or the
        connection broke before it answered. Once this returns True, every message the broker
        accepts afterwards on a matching topic is delivered to the handler, which is what a
        caller needs before it lets others publish there (MQTT does not deliver earlier
        non-retained messages to a late subscriber).

        Such a subscription lasts for the current connection only: every connection starts a
        clean MQTT session and ``run()`` restores only the ``subscriptions`` given at
        construction. The node subscribes this way to one aggregation session's topics; a
        session does not survive a lost connection anyway (what was published meanwhile is
        lost, and the session times out).
        """
        client = self._client
        if client is None or not self.connected.is_set():
            return False
        try:
            granted = await client.subscribe(topic_filter, qos=1, timeout=self.publish_timeout_s)
        except aiomqtt.MqttError as exc:
            _log.info("%s: subscribe to %s failed: %s", self.client_id, topic_filter, exc)
            return False
        if any(_is_failure(code) for code in granted):
            self.subscribe_failures += 1
            _log.error("%s: broker refused the subscription to %s", self.client_id,
                       topic_filter)
            return False
        return True

    async def unsubscribe(self, topic_filter: str) -> bool:
        """Drop a subscription made with :meth:`subscribe`; wait for the UNSUBACK.

        True once the broker acknowledged it; False when not connected (nothing to do: the
        subscription died with its connection) or when the connection broke meanwhile.
        Messages the broker had already queued for this client may still arrive after it.
        """
        client = self._client
        if client is None or not self.connected.is_set():
            return False
        try:
            await client.unsubscribe(topic_filter, timeout=self.publish_timeout_s)
        except aiomqtt.MqttError as exc:
            _log.info("%s: unsubscribe from %s failed: %s", self.client_id, topic_filter, exc)
            return False
        return True

    # ------------------------------------------------------------------------------ inspection
    def socket_option(self, level: int, option: int) -> int | None:
        """Read an integer option of the live client socket (None when not connected).

        For tests and diagnostics, e.g. ``socket_option(IPPROTO_TCP, TCP_NODELAY)``.
        """
        client = self._client
        if client is None:
            return None
        # aiomqtt exposes no public accessor for the socket; paho's client does.
        sock = client._client.socket()
        if not isinstance(sock, socket.socket):
            return None
        return int(sock.getsockopt(level, option))
