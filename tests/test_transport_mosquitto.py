"""peer.network.transport against a real Mosquitto on a loopback port
(no fake broker, bounded waits)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from peer.network.inbound_queue import IncomingQueue
from peer.network.transport import (
    BrokerSettings,
    Incoming,
    NotConnectedError,
    PayloadTooLargeError,
    Transport,
    TransportError,
    backoff_delay,
)
from sim.broker import MosquittoBroker
from tests.conftest import wait_until

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(60)]

REPO_ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 10.0


@dataclass
class Inbox:
    """Collects what a transport's handler receives."""

    items: list[Incoming] = field(default_factory=list)

    async def handle(self, incoming: Incoming) -> None:
        self.items.append(incoming)

    async def wait_for(self, predicate: Callable[[Incoming], bool],
                       what: str = "a matching message") -> Incoming:
        """The first item that matches, once one has arrived (bounded by WAIT_S)."""
        await wait_until(lambda: any(predicate(item) for item in self.items), WAIT_S, what)
        return next(item for item in self.items if predicate(item))


@contextlib.asynccontextmanager
async def running(
    transport: Transport, handler: Callable[[Incoming], Awaitable[None]]
) -> AsyncIterator[asyncio.Task[None]]:
    """Run a transport in a task; stop it cleanly (bounded) on exit."""
    stop = asyncio.Event()
    task = asyncio.create_task(transport.run(handler, stop))
    try:
        yield task
    finally:
        stop.set()
        async with asyncio.timeout(WAIT_S):
            await task


def _transport(url: str, name: str, subscriptions: list[str], *, mqtt_version: str = "3.1.1",
               **kwargs: Any) -> Transport:
    options: dict[str, Any] = {"will": None, "on_connected": None, "max_payload": 1 << 20}
    options.update(kwargs)
    return Transport(
        BrokerSettings(url=url, keepalive_s=10, mqtt_version=mqtt_version),
        client_id=f"{name}-{os.urandom(3).hex()}",
        subscriptions=subscriptions,
        backoff_initial_s=0.05,
        backoff_max_s=0.5,
        **options,
    )


async def _connected(transport: Transport) -> None:
    async with asyncio.timeout(WAIT_S):
        await transport.connected.wait()


@pytest.mark.parametrize("mqtt_version", ["3.1.1", "5"])
async def test_publish_subscribe_round_trip_and_counters(
    mosquitto: MosquittoBroker, mqtt_version: str,
) -> None:
    inbox = Inbox()
    receiver = _transport(mosquitto.url, "rx", ["murmur/t/+/to/rx"], mqtt_version=mqtt_version)
    sender = _transport(mosquitto.url, "tx", [], mqtt_version=mqtt_version)
    async with running(receiver, inbox.handle), running(sender, Inbox().handle):
        await _connected(receiver)
        await _connected(sender)
        payload = os.urandom(5000)
        await sender.publish("murmur/t/tx/to/rx", payload)
        got = await inbox.wait_for(lambda m: m.topic == "murmur/t/tx/to/rx")
        assert got.payload == payload
        assert got.retain is False
        assert sender.messages_sent == 1 and sender.bytes_sent == 5000
        assert receiver.messages_received == 1 and receiver.bytes_received == 5000
    assert not receiver.connected.is_set()


async def test_tcp_nodelay_is_set_on_the_live_socket(
    mosquitto: MosquittoBroker,
) -> None:
    transport = _transport(mosquitto.url, "nodelay", [])
    assert transport.socket_option(socket.IPPROTO_TCP, socket.TCP_NODELAY) is None
    async with running(transport, Inbox().handle):
        await _connected(transport)
        assert transport.socket_option(socket.IPPROTO_TCP, socket.TCP_NODELAY) not in (None, 0)


async def test_publish_refuses_oversized_payload_and_when_not_connected(
    mosquitto: MosquittoBroker,
) -> None:
    transport = _transport(mosquitto.url, "big", [], max_payload=1000)
    with pytest.raises(NotConnectedError):
        await transport.publish("murmur/t/big/x", b"x")
    async with running(transport, Inbox().handle):
        await _connected(transport)
        with pytest.raises(PayloadTooLargeError):
            await transport.publish("murmur/t/big/x", b"x" * 1001)
        await transport.publish("murmur/t/big/x", b"x" * 1000)  # exactly the limit passes
        assert transport.messages_sent == 1
    assert issubclass(PayloadTooLargeError, TransportError)
    with pytest.raises(NotConnectedError):
        await transport.publish("murmur/t/big/x", b"x")


async def test_retained_message_reaches_late_subscriber_and_on_connected_runs(
    mosquitto: MosquittoBroker,
) -> None:
    topic = f"murmur/t/ret{os.urandom(2).hex()}/announce"
    calls: list[str] = []
    holder: dict[str, Transport] = {}

    async def announce() -> None:
        calls.append("connected")
        await holder["t"].publish(topic, b"signed-announcement", retain=True)

    announcer = _transport(mosquitto.url, "ann", [], on_connected=announce)
    holder["t"] = announcer
    async with running(announcer, Inbox().handle):
        await _connected(announcer)
        await wait_until(lambda: announcer.messages_sent > 0, WAIT_S, "the announcement")
        late = Inbox()
        async with running(_transport(mosquitto.url, "late", [topic]), late.handle):
            got = await late.wait_for(lambda m: m.topic == topic)
            assert got.payload == b"signed-announcement" and got.retain is True
        await announcer.publish(topic, b"", retain=True)  # clear it for other tests
    assert calls == ["connected"]


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from peer.network.transport import BrokerSettings, Transport

    async def main() -> None:
        url, client_id, topic = sys.argv[1:4]
        holder = {}

        async def announce() -> None:
            await holder["t"].publish(topic, b"alive", retain=True)
            print("READY", flush=True)

        async def ignore(_incoming) -> None:
            return None

        t = Transport(BrokerSettings(url=url, keepalive_s=10), client_id=client_id,
                      subscriptions=[], will=(topic, b"", True), on_connected=announce,
                      max_payload=1024)
        holder["t"] = t
        await t.run(ignore, asyncio.Event())

    asyncio.run(main())
    """
)


async def test_last_will_clears_retained_announce_when_the_process_dies(
    mosquitto: MosquittoBroker,
) -> None:
    topic = f"murmur/t/dying{os.urandom(2).hex()}/announce"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, mosquitto.url, f"dying-{os.urandom(3).hex()}", topic],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), timeout=30)
        assert line.strip() == b"READY", child.stderr.read() if child.stderr else line
        watcher_inbox = Inbox()
        async with running(_transport(mosquitto.url, "watch", [topic]), watcher_inbox.handle):
            alive = await watcher_inbox.wait_for(lambda m: m.payload == b"alive")
            assert alive.retain is True
            # SIGKILL: no DISCONNECT packet, the kernel just closes the socket.
            os.kill(child.pid, signal.SIGKILL)
            gone = await watcher_inbox.wait_for(lambda m: m.payload == b"")
            assert gone.topic == topic
        # The will was retained (empty): it deleted the announcement for later subscribers.
        # A retained message reaches a subscriber right after its subscription, so before
        # anything it publishes itself later: its own marker arriving means nothing retained is.
        after = Inbox()
        late = _transport(mosquitto.url, "after", [topic])
        async with running(late, after.handle) as task:
            await _connected(late)
            await late.publish(topic, b"marker")
            await after.wait_for(lambda m: m.payload == b"marker", "the late subscriber's marker")
            assert not task.done()
        assert [m.payload for m in after.items] == [b"marker"]
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)


async def test_clean_stop_does_not_publish_the_will(
    mosquitto: MosquittoBroker,
) -> None:
    topic = f"murmur/t/clean{os.urandom(2).hex()}/announce"
    watcher_inbox = Inbox()
    async with running(_transport(mosquitto.url, "watch", [topic]), watcher_inbox.handle):
        leaver = _transport(mosquitto.url, "leaver", [], will=(topic, b"will", False))
        async with running(leaver, Inbox().handle):
            await _connected(leaver)
        # The leaver's disconnect reached the broker before a new client even connects; a will
        # would be queued for the watcher then, ahead of the new client's marker.
        probe = _transport(mosquitto.url, "probe", [])
        async with running(probe, Inbox().handle):
            await _connected(probe)
            await probe.publish(topic, b"marker")
            await watcher_inbox.wait_for(lambda m: m.payload == b"marker", "the probe's marker")
    assert [m.payload for m in watcher_inbox.items] == [b"marker"]


async def test_reconnects_and_resubscribes_after_broker_restart(
    mosquitto: MosquittoBroker,
) -> None:
    inbox = Inbox()
    connects: list[int] = []

    async def on_connected() -> None:
        connects.append(1)

    receiver = _transport(mosquitto.url, "rx", ["murmur/t/+/to/rx2"], on_connected=on_connected)
    async with running(receiver, inbox.handle) as task:
        await _connected(receiver)
        await mosquitto.stop()
        await wait_until(lambda: not receiver.connected.is_set(), WAIT_S,
                         "the receiver to notice the broker is gone")
        with pytest.raises(NotConnectedError):
            await receiver.publish("murmur/t/rx/x", b"x")
        failures = receiver.connect_failures
        await wait_until(lambda: receiver.connect_failures >= failures + 3, WAIT_S,
                         "a few failed connection attempts against the closed port")
        assert not task.done()
        await mosquitto.start()
        await _connected(receiver)
        assert receiver.reconnects == 1
        sender = _transport(mosquitto.url, "tx", [])
        async with running(sender, Inbox().handle):
            await _connected(sender)
            await sender.publish("murmur/t/tx/to/rx2", b"after restart")
            got = await inbox.wait_for(lambda m: m.payload == b"after restart")
            assert got.topic == "murmur/t/tx/to/rx2"
    assert len(connects) == 2


async def test_dynamic_subscriptions_last_for_one_connection(
    mosquitto: MosquittoBroker,
) -> None:
    """subscribe()/unsubscribe() on the live client: False when not connected; a granted
    subscription delivers until it is dropped, and a reconnect does not restore it."""
    session = "murmur/t/+/session/" + "ab" * 16
    on_session = "murmur/t/tx/session/" + "ab" * 16
    inbox = Inbox()
    receiver = _transport(mosquitto.url, "rx", ["murmur/t/+/to/rx3"])
    assert await receiver.subscribe(session) is False  # not connected: nothing happens
    assert await receiver.unsubscribe(session) is False

    async def marker(sender: Transport, text: bytes) -> None:
        # One publisher's messages reach a subscriber in order: once this marker on the static
        # subscription has arrived, any earlier session message would have arrived too.
        await sender.publish("murmur/t/tx/to/rx3", text)
        await inbox.wait_for(lambda m: m.payload == text, f"marker {text!r}")

    def on_session_topic() -> list[bytes]:
        return [m.payload for m in inbox.items if m.topic == on_session]

    sender = _transport(mosquitto.url, "tx", [])
    async with running(receiver, inbox.handle), running(sender, Inbox().handle):
        await _connected(receiver)
        await _connected(sender)
        await sender.publish(on_session, b"before")  # nobody subscribed yet: not delivered
        assert await receiver.subscribe(session) is True
        await sender.publish(on_session, b"during")
        await marker(sender, b"m1")
        assert on_session_topic() == [b"during"]
        assert await receiver.unsubscribe(session) is True
        await sender.publish(on_session, b"after unsubscribe")
        await marker(sender, b"m2")
        assert on_session_topic() == [b"during"]
        assert await receiver.subscribe(session) is True
        await mosquitto.stop()
        await wait_until(lambda: not receiver.connected.is_set(), WAIT_S,
                         "the receiver to notice the broker is gone")
        assert await receiver.subscribe(session) is False
        await mosquitto.start()
        await _connected(receiver)
        await _connected(sender)
        await sender.publish(on_session, b"after reconnect")
        await marker(sender, b"m3")
        assert on_session_topic() == [b"during"]  # the static subscription came back, not it
    assert receiver.subscribe_failures == 0


async def test_handler_exception_is_counted_and_the_loop_goes_on(
    mosquitto: MosquittoBroker,
) -> None:
    seen: list[bytes] = []
    got_second = asyncio.Event()

    async def fragile(incoming: Incoming) -> None:
        seen.append(incoming.payload)
        if incoming.payload == b"boom":
            raise ValueError("hostile payload")
        got_second.set()

    receiver = _transport(mosquitto.url, "fragile", ["murmur/t/+/to/fragile"])
    sender = _transport(mosquitto.url, "tx", [])
    async with running(receiver, fragile), running(sender, Inbox().handle):
        await _connected(receiver)
        await _connected(sender)
        await sender.publish("murmur/t/tx/to/fragile", b"boom")
        await sender.publish("murmur/t/tx/to/fragile", b"fine")
        async with asyncio.timeout(WAIT_S):
            await got_second.wait()
    assert seen == [b"boom", b"fine"]
    assert receiver.handler_errors == 1


async def test_stop_while_broker_is_unreachable_returns_promptly() -> None:
    port = MosquittoBroker().port  # a free port with nothing listening
    transport = _transport(f"mqtt://127.0.0.1:{port}", "nobody", [])
    stop = asyncio.Event()
    task = asyncio.create_task(transport.run(Inbox().handle, stop))
    await wait_until(lambda: transport.connect_failures >= 1, WAIT_S, "a failed connection")
    assert transport.connect_failures >= 1 and not transport.connected.is_set()
    stop.set()
    async with asyncio.timeout(5):
        await task


def test_backoff_is_capped_jittered_and_grows() -> None:
    rng = random.Random(7)
    delays = [[backoff_delay(a, 0.2, 10.0, rng) for _ in range(200)] for a in range(12)]
    assert all(0.02 <= d <= 10.0 for row in delays for d in row)
    assert max(delays[0]) <= 0.2
    assert max(delays[11]) > 5.0  # the cap is reached, with jitter below it
    assert len({round(d, 6) for d in delays[11]}) > 150  # jittered, not lock-step


def test_broker_settings_validate_urls() -> None:
    assert BrokerSettings().endpoint() == ("127.0.0.1", 1883, False)
    assert BrokerSettings(url="mqtts://broker.example").endpoint() == ("broker.example", 8883, True)
    assert BrokerSettings(url="mqtt://[::1]:1999").endpoint() == ("::1", 1999, False)
    for bad in ("http://x", "mqtt://", "mqtt://u:p@host", "mqtt://h:99999", "mqtt://h/path"):
        with pytest.raises(ValueError):
            BrokerSettings(url=bad)
    with pytest.raises(ValueError):
        BrokerSettings(password="secret")
    with pytest.raises(ValueError):
        BrokerSettings(keepalive_s=1)
    with pytest.raises(ValueError):
        BrokerSettings(mqtt_version="3.1")
    assert BrokerSettings().tls_context() is None
    assert BrokerSettings(url="mqtts://h").tls_context() is not None


async def test_missing_ca_file_is_a_transport_error(tmp_path: Path) -> None:
    settings = BrokerSettings(url="mqtts://127.0.0.1:1", ca_file=tmp_path / "nope.pem")
    transport = Transport(settings, client_id="tls", subscriptions=[], will=None,
                          on_connected=None, max_payload=10)
    with pytest.raises(TransportError, match="TLS"):
        await transport.run(Inbox().handle, asyncio.Event())


async def test_cancelling_run_leaves_no_task_behind(
    mosquitto: MosquittoBroker,
) -> None:
    before = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
    transport = _transport(mosquitto.url, "cancel", ["murmur/t/+/to/cancel"])
    task = asyncio.create_task(transport.run(Inbox().handle, asyncio.Event()))
    await _connected(transport)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    def others() -> set[asyncio.Task[Any]]:
        return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}

    # Tasks that are finishing their cancellation end within a few loop iterations; a task
    # left behind would still be there after a second.
    await wait_until(lambda: others() <= before, 1.0, "the transport's tasks to end")
    after = others()
    assert after <= before
    assert not transport.connected.is_set()
    with pytest.raises(NotConnectedError):
        await transport.publish("murmur/t/cancel/x", b"x")


async def test_inbound_backlog_is_bounded_in_bytes_and_refusals_are_counted(
    mosquitto: MosquittoBroker,
) -> None:
    """A handler that stalls while a sender floods: the queue refuses what would take it past
    its byte budget, reports each refusal, and hands over the rest once the handler goes on."""
    refused: list[tuple[str, int]] = []
    release = asyncio.Event()
    seen: list[int] = []

    async def stalled(incoming: Incoming) -> None:
        await release.wait()
        seen.append(len(incoming.payload))

    receiver = _transport(mosquitto.url, "slow", ["murmur/t/+/to/slow"],
                          max_queued_incoming_bytes=300_000,
                          on_refused=lambda reason, size: refused.append((reason, size)))
    sender = _transport(mosquitto.url, "tx", [], max_payload=1 << 20)
    async with running(receiver, stalled), running(sender, Inbox().handle):
        await _connected(receiver)
        await _connected(sender)
        for _ in range(12):  # 12 x 100 kB against a 300 kB budget (one more is in the handler)
            await sender.publish("murmur/t/tx/to/slow", os.urandom(100_000))
        await wait_until(lambda: receiver.incoming_refused >= 8, WAIT_S, "refusals")
        assert refused and {reason for reason, _ in refused} == {"inbound_over_budget"}
        assert all(size == 100_000 for _, size in refused)
        release.set()
        await wait_until(lambda: len(seen) + receiver.incoming_refused == 12, WAIT_S,
                         "every message handled or refused")
    assert 1 <= len(seen) <= 4  # the budget's three plus the one the handler held


def test_incoming_queue_refuses_oversized_and_over_budget_messages() -> None:
    """The queue alone: its byte count follows puts and gets, and refusals are reported."""
    refused: list[int] = []
    queue = IncomingQueue(0, max_bytes=250, max_message_bytes=200, on_refused=refused.append)

    def message(size: int) -> aiomqtt.Message:
        return aiomqtt.Message("t", bytes(size), qos=1, retain=False, mid=1, properties=None)

    queue.put_nowait(message(100))
    queue.put_nowait(message(100))
    with pytest.raises(asyncio.QueueFull):
        queue.put_nowait(message(100))  # 300 > 250
    with pytest.raises(asyncio.QueueFull):
        queue.put_nowait(message(201))  # larger than any receiver accepts
    assert refused == [100, 201] and queue.queued_bytes == 200
    assert len(queue.get_nowait().payload) == 100
    assert queue.queued_bytes == 100
    queue.put_nowait(message(150))
    assert queue.queued_bytes == 250 and queue.qsize() == 2
