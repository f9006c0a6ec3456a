"""Real MQTT round trips through the simulation's brokers (loopback only, bounded waits)."""

from __future__ import annotations

import asyncio
import contextlib
import os

import aiomqtt
import pytest

from sim.broker import (
    LOOPBACK,
    MOSQUITTO_MAX_PACKET_BYTES,
    BrokerStartError,
    EmbeddedBroker,
    MosquittoBroker,
    wait_until_accepting,
)
from tests.conftest import require_mosquitto, wait_until

pytestmark = pytest.mark.timeout(60)


async def _round_trip(port: int, payload: bytes, topic: str = "murmur/test/a/to/b") -> bytes:
    """Publish payload with QoS 1 and return what a subscriber received (10 s bound)."""
    async with (
        aiomqtt.Client(LOOPBACK, port, identifier=f"sub-{os.urandom(4).hex()}") as sub,
        aiomqtt.Client(LOOPBACK, port, identifier=f"pub-{os.urandom(4).hex()}") as pub,
    ):
        await sub.subscribe("murmur/test/#", qos=1)
        await pub.publish(topic, payload, qos=1)
        async with asyncio.timeout(10):
            async for message in sub.messages:
                assert str(message.topic) == topic
                assert isinstance(message.payload, bytes | bytearray)
                return bytes(message.payload)
    raise AssertionError("subscriber stream ended without a message")


def _other_tasks() -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def test_embedded_broker_round_trip_and_clean_stop() -> None:
    before = _other_tasks()
    async with EmbeddedBroker() as broker:
        assert broker.port > 0
        assert broker.url == f"mqtt://{LOOPBACK}:{broker.port}"
        payload = os.urandom(1000)
        assert await _round_trip(broker.port, payload) == payload
    assert not broker.running
    # amqtt's broadcast loop and session monitor must be gone, and the port closed. (Tasks
    # finishing their cancellation end within a loop iteration or two; a leaked one never.)
    await wait_until(lambda: _other_tasks() <= before, 1.0, "amqtt's tasks to end")
    assert _other_tasks() <= before
    with pytest.raises(BrokerStartError):
        await wait_until_accepting(LOOPBACK, broker.port, timeout_s=0.3)


async def test_embedded_broker_carries_a_4_mib_payload() -> None:
    # Sealed shares go up to a few MiB; the embedded broker must carry them whole.
    async with EmbeddedBroker() as broker:
        payload = os.urandom(4 * 1024 * 1024)
        assert await _round_trip(broker.port, payload) == payload


async def test_embedded_broker_stops_with_clients_connected_and_restarts_on_same_port() -> None:
    before = _other_tasks()
    broker = EmbeddedBroker()
    await broker.start()
    port = broker.port
    client = aiomqtt.Client(LOOPBACK, port, identifier="still-connected")
    await client.__aenter__()
    try:
        await broker.stop()  # a peer is still connected: the broker must not hang or leak
        with pytest.raises(aiomqtt.MqttError):
            async with asyncio.timeout(5):
                await client.publish("murmur/test/x", b"after stop", qos=1, timeout=2)
    finally:
        with contextlib.suppress(aiomqtt.MqttError):
            await client.__aexit__(None, None, None)
    await broker.start()
    try:
        assert broker.port == port
        assert await _round_trip(port, b"back") == b"back"
    finally:
        await broker.stop()
    await wait_until(lambda: _other_tasks() <= before, 1.0, "amqtt's tasks to end")
    assert _other_tasks() <= before


async def test_two_embedded_brokers_get_distinct_ports() -> None:
    async with EmbeddedBroker() as first, EmbeddedBroker() as second:
        assert first.port != second.port


def test_embedded_broker_port_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        _ = EmbeddedBroker().port
    with pytest.raises(ValueError):
        EmbeddedBroker(port=70000)


@pytest.mark.mosquitto
async def test_mosquitto_round_trip_large_payload_and_restart_on_same_port() -> None:
    require_mosquitto()  # skips locally without the binary, fails in CI
    async with MosquittoBroker() as broker:
        assert f"max_packet_size {MOSQUITTO_MAX_PACKET_BYTES}" in broker.config_text()
        small = os.urandom(100)
        assert await _round_trip(broker.port, small) == small
        big = os.urandom(8 * 1024 * 1024)
        assert await _round_trip(broker.port, big) == big

        port = broker.port
        await broker.stop()
        assert not broker.running
        with pytest.raises(BrokerStartError):
            await wait_until_accepting(LOOPBACK, port, timeout_s=0.3)
        await broker.start()
        assert broker.port == port
        assert await _round_trip(broker.port, small) == small
        temp_dir = broker.log_path.parent if broker.log_path else None
    assert not broker.running
    assert temp_dir is not None and not temp_dir.exists()


@pytest.mark.mosquitto
async def test_mosquitto_persistence_keeps_retained_messages_across_restart() -> None:
    require_mosquitto()
    async with MosquittoBroker(persistence=True) as broker:
        async with aiomqtt.Client(LOOPBACK, broker.port) as pub:
            await pub.publish("murmur/test/p/announce", b"hello", qos=1, retain=True)
        # A graceful stop writes the persistence file; the restarted broker must still hold it.
        await broker.restart()
        async with aiomqtt.Client(LOOPBACK, broker.port) as sub:
            await sub.subscribe("murmur/test/+/announce", qos=1)
            async with asyncio.timeout(10):
                async for message in sub.messages:
                    assert message.retain
                    assert message.payload == b"hello"
                    break


@pytest.mark.mosquitto
async def test_mosquitto_missing_binary_is_a_typed_error(tmp_path) -> None:
    broker = MosquittoBroker(binary=tmp_path / "no-such-mosquitto")
    with pytest.raises(BrokerStartError, match="not found"):
        await broker.start()
    await broker.close()
