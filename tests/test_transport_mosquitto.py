"""peer.transport against a real Mosquitto on a loopback port (no fake broker, bounded waits)."""

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

import pytest

from peer.transport import (
    BrokerSettings,
    Incoming,
    NotConnectedError,
    PayloadTooLargeError,
    Transport,
    TransportError,
    backoff_delay,
)
from sim.broker import MosquittoBroker

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(60)]

REPO_ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 10.0


@pytest.fixture
def broker(mosquitto: MosquittoBroker) -> MosquittoBroker:
    """The shared Mosquitto of tests/conftest.py (restartable on the same port)."""
    return mosquitto


@dataclass
class Inbox:
    """Collects what a transport's handler receives."""

    items: list[Incoming] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, incoming: Incoming) -> None:
        self.items.append(incoming)
        self.arrived.set()

    async def wait_for(self, predicate: Callable[[Incoming], bool]) -> Incoming:
        async with asyncio.timeout(WAIT_S):
            while True:
                for item in self.items:
                    if predicate(item):
                        return item
                self.arrived.clear()
                await self.arrived.wait()


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
    broker: MosquittoBroker, mqtt_version: str,
) -> None:
    inbox = Inbox()
    receiver = _transport(broker.url, "rx", ["murmur/t/+/to/rx"], mqtt_version=mqtt_version)
    sender = _transport(broker.url, "tx", [], mqtt_version=mqtt_version)
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
    broker: MosquittoBroker,
) -> None:
    transport = _transport(broker.url, "nodelay", [])
    assert transport.socket_option(socket.IPPROTO_TCP, socket.TCP_NODELAY) is None
    async with running(transport, Inbox().handle):
        await _connected(transport)
        assert transport.socket_option(socket.IPPROTO_TCP, socket.TCP_NODELAY) not in (None, 0)


async def test_publish_refuses_oversized_payload_and_when_not_connected(
    broker: MosquittoBroker,
) -> None:
    transport = _transport(broker.url, "big", [], max_payload=1000)
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
    broker: MosquittoBroker,
) -> None:
    topic = f"murmur/t/ret{os.urandom(2).hex()}/announce"
    calls: list[str] = []
    holder: dict[str, Transport] = {}

    async def announce() -> None:
        calls.append("connected")
        await holder["t"].publish(topic, b"signed-announcement", retain=True)

    announcer = _transport(broker.url, "ann", [], on_connected=announce)
    holder["t"] = announcer
    async with running(announcer, Inbox().handle):
        await _connected(announcer)
        async with asyncio.timeout(WAIT_S):
            while announcer.messages_sent == 0:
                await asyncio.sleep(0.01)
        late = Inbox()
        async with running(_transport(broker.url, "late", [topic]), late.handle):
            got = await late.wait_for(lambda m: m.topic == topic)
            assert got.payload == b"signed-announcement" and got.retain is True
        await announcer.publish(topic, b"", retain=True)  # clear it for other tests
    assert calls == ["connected"]


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from peer.transport import BrokerSettings, Transport

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
    broker: MosquittoBroker,
) -> None:
    topic = f"murmur/t/dying{os.urandom(2).hex()}/announce"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, broker.url, f"dying-{os.urandom(3).hex()}", topic],
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
        async with running(_transport(broker.url, "watch", [topic]), watcher_inbox.handle):
            alive = await watcher_inbox.wait_for(lambda m: m.payload == b"alive")
            assert alive.retain is True
            # SIGKILL: no DISCONNECT packet, the kernel just closes the socket.
            os.kill(child.pid, signal.SIGKILL)
            gone = await watcher_inbox.wait_for(lambda m: m.payload == b"")
            assert gone.topic == topic
        # The will was retained (empty): it deleted the announcement for later subscribers.
        after = Inbox()
        async with running(_transport(broker.url, "after", [topic]), after.handle) as task:
            await asyncio.sleep(0.3)
            assert not task.done()
        assert after.items == []
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)


async def test_clean_stop_does_not_publish_the_will(
    broker: MosquittoBroker,
) -> None:
    topic = f"murmur/t/clean{os.urandom(2).hex()}/announce"
    watcher_inbox = Inbox()
    async with running(_transport(broker.url, "watch", [topic]), watcher_inbox.handle):
        leaver = _transport(broker.url, "leaver", [], will=(topic, b"will", False))
        async with running(leaver, Inbox().handle):
            await _connected(leaver)
        await asyncio.sleep(0.3)
    assert [m.payload for m in watcher_inbox.items] == []


async def test_reconnects_and_resubscribes_after_broker_restart(
    broker: MosquittoBroker,
) -> None:
    inbox = Inbox()
    connects: list[int] = []

    async def on_connected() -> None:
        connects.append(1)

    receiver = _transport(broker.url, "rx", ["murmur/t/+/to/rx2"], on_connected=on_connected)
    async with running(receiver, inbox.handle) as task:
        await _connected(receiver)
        await broker.stop()
        async with asyncio.timeout(WAIT_S):
            while receiver.connected.is_set():
                await asyncio.sleep(0.02)
        with pytest.raises(NotConnectedError):
            await receiver.publish("murmur/t/rx/x", b"x")
        await asyncio.sleep(0.5)  # a few failed connection attempts against a closed port
        assert not task.done()
        await broker.start()
        await _connected(receiver)
        assert receiver.reconnects == 1
        sender = _transport(broker.url, "tx", [])
        async with running(sender, Inbox().handle):
            await _connected(sender)
            await sender.publish("murmur/t/tx/to/rx2", b"after restart")
            got = await inbox.wait_for(lambda m: m.payload == b"after restart")
            assert got.topic == "murmur/t/tx/to/rx2"
    assert len(connects) == 2


async def test_handler_exception_is_counted_and_the_loop_goes_on(
    broker: MosquittoBroker,
) -> None:
    seen: list[bytes] = []
    got_second = asyncio.Event()

    async def fragile(incoming: Incoming) -> None:
        seen.append(incoming.payload)
        if incoming.payload == b"boom":
            raise ValueError("hostile payload")
        got_second.set()

    receiver = _transport(broker.url, "fragile", ["murmur/t/+/to/fragile"])
    sender = _transport(broker.url, "tx", [])
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
    await asyncio.sleep(0.3)
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
    broker: MosquittoBroker,
) -> None:
    before = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
    transport = _transport(broker.url, "cancel", ["murmur/t/+/to/cancel"])
    task = asyncio.create_task(transport.run(Inbox().handle, asyncio.Event()))
    await _connected(transport)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    after = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
    assert after <= before
    assert not transport.connected.is_set()
    with pytest.raises(NotConnectedError):
        await transport.publish("murmur/t/cancel/x", b"x")
