"""Murmur across two bridged Mosquitto brokers (issue 14, first step).

Broker B bridges to broker A for ``murmur/#`` in both directions at QoS 1, with the stanza of
`sim.broker.mosquitto_bridge_config` (the one docs/deploy/scaling.md ships). Peers sit on both
brokers, train the MLP on digits, and must behave as on one broker:

(a) every peer sees every other; each peer's retained announcement is held by *both* brokers,
    and a newcomer on B learns the peers of A from B's retained copies alone;
(b) sessions whose members sit on both brokers complete and every member rebuilds the same
    group sum;
(c) a peer on B killed with SIGKILL (a real process) leaves every view on A through its signed
    last will, which B publishes and the bridge carries over;
(d) an unsigned empty payload published on A to a B-peer's announce topic (MQTT's "clear")
    crosses the bridge and removes nobody on either side.

Loopback only; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiomqtt
import pytest

from crypto.admission import AdmissionKey
from peer.network.node import Peer
from protocol import messages as m
from protocol.codec import decode_message
from protocol.topics import announce_filter, announce_topic
from sim.broker import LOOPBACK, MosquittoBroker, mosquitto_bridge_config
from sim.idle_peer import spawn_idle_peer, write_identity
from tests.conftest import require_mosquitto, wait_until
from tests.test_node_mosquitto import (
    FAST,
    NET,
    Network,
    Sniffer,
    check_group_sums,
    make_trainer,
)

__all__ = ["make_trainer"]  # the fixture, imported for pytest

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(150)]

BRIDGE_NAME = "murmur-b-to-a"

# Periodic announcements far apart: during the test a peer announces only when it connects,
# so a newcomer that learns an established peer can only have read the retained copy, and
# nobody is forgotten for silence (removal below can only be a LEAVE, i.e. the last will).
QUIET = dataclasses.replace(FAST, announce_interval_s=600.0, silence_expiry_s=1800.0)


@dataclasses.dataclass
class BridgedBrokers:
    a: MosquittoBroker  # the remote end of the bridge
    b: MosquittoBroker  # runs the bridge to a


async def _crosses(src: MosquittoBroker, dst: MosquittoBroker, timeout_s: float) -> None:
    """Return once a QoS 1 probe published on src reaches a subscriber on dst (the bridge is
    up in that direction); AssertionError after timeout_s. Each attempt is one probe and a
    0.5 s wait with fresh clients (no publisher task left to cancel). The probe topic is under
    ``murmur/`` (so bridged) but in no peer's network."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        topic = f"murmur/bridgeprobe/{os.urandom(4).hex()}/probe"
        async with (
            aiomqtt.Client(LOOPBACK, dst.port, identifier=f"probe-sub-{topic[-14:-6]}") as sub,
            aiomqtt.Client(LOOPBACK, src.port, identifier=f"probe-pub-{topic[-14:-6]}") as pub,
        ):
            await sub.subscribe(topic, qos=1)
            await pub.publish(topic, b"probe", qos=1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    async for msg in sub.messages:
                        if str(msg.topic) == topic:
                            return
    raise AssertionError(f"the bridge carried nothing from :{src.port} to :{dst.port} within"
                         f" {timeout_s:g} s: {dst.log_tail()}")


@pytest.fixture
async def bridged() -> AsyncIterator[BridgedBrokers]:
    """Brokers A and B on loopback, B bridged to A; yields once the bridge carries QoS 1
    messages both ways."""
    require_mosquitto()
    a = MosquittoBroker()
    b = MosquittoBroker(extra_config=mosquitto_bridge_config(BRIDGE_NAME, LOOPBACK, a.port))
    try:
        await a.start()
        await b.start()
        await _crosses(b, a, 15)
        await _crosses(a, b, 15)
        yield BridgedBrokers(a, b)
    finally:
        await b.close()
        await a.close()


async def _retained_on(broker: MosquittoBroker, expected: set[str],
                      timeout_s: float) -> dict[str, bytes]:
    """{topic: payload} of the retained messages on announce topics that a fresh subscription
    to broker gets, once the topics of ``expected`` peers are among them; AssertionError after
    timeout_s. Only messages flagged retained count (a fresh subscription gets the retained
    copies with the flag set, live ones without), and each attempt is a new client, so a
    message still on its way over the bridge is found by a later attempt."""
    wanted = {announce_topic(NET, peer) for peer in expected}
    deadline = time.monotonic() + timeout_s
    found: dict[str, bytes] = {}
    while time.monotonic() < deadline:
        found = {}
        async with aiomqtt.Client(LOOPBACK, broker.port,
                                  identifier=f"retained-{os.urandom(4).hex()}") as client:
            await client.subscribe(announce_filter(NET), qos=1)
            # Retained copies come right after SUBACK; 0.5 s is plenty on loopback.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    async for msg in client.messages:
                        if msg.retain and isinstance(msg.payload, bytes):
                            found[str(msg.topic)] = msg.payload
        if wanted <= set(found):
            return found
    raise AssertionError(f"broker :{broker.port} holds retained messages on {sorted(found)},"
                         f" expected {sorted(wanted)}")


def _sees(peers: list[Peer], ids: set[str]) -> Callable[[], bool]:
    return lambda: all(p.membership.get(other) is not None
                       for p in peers for other in ids - {p.peer_id})


def _cross_broker_sessions(net: Network) -> list[bytes]:
    """Sessions every member finished whose members sit on both brokers."""
    out = []
    for sid, events in net.done_events().items():
        members = set(events[0].data["members"])
        finished = {e.peer_id for e in events}
        if (finished == members and any(x.startswith("a") for x in members)
                and any(x.startswith("b") for x in members)):
            out.append(sid)
    return out


def _await_chain(task: asyncio.Task[None]) -> str:
    """Where a pending task waits: file:line of every coroutine on its await chain."""
    where = []
    awaited: object = task.get_coro()
    while awaited is not None and len(where) < 20:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
        if frame is None:
            where.append(repr(awaited)[:120])
            break
        where.append(f"{frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
    return " <- ".join(reversed(where))


async def _close(*nets: Network, timeout_s: float = 30.0) -> None:
    """Stop every peer of every network at once; AssertionError naming the peers that did
    not stop within timeout_s, with where each one is stuck."""
    for net in nets:
        for stop in net.stops:
            stop.set()
    tasks = {task: peer.peer_id for net in nets
             for peer, task in zip(net.peers, net.tasks, strict=True)}
    _done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    if pending:
        stuck = {tasks[t]: _await_chain(t) for t in pending}
        for task in pending:
            task.cancel()
        raise AssertionError(f"peers still running {timeout_s:g} s after stop: {stuck}")
    for task in tasks:
        task.result()  # a peer that crashed fails the test


# ---------------------------------------------------------------------------- the bridge
def test_bridge_stanza_is_checked() -> None:
    stanza = mosquitto_bridge_config("x", LOOPBACK, 1883).splitlines()
    assert stanza[0] == "connection x"  # a bridge section starts with its connection line
    assert "topic murmur/# both 1" in stanza  # QoS 1 written out (the default would be 0)
    for bad in ({"name": "two words"}, {"port": 0}, {"qos": 3}, {"restart_timeout_s": 0},
                {"topic": "murmur/# out"}):
        args = {"name": "x", "host": LOOPBACK, "port": 1883, **bad}
        with pytest.raises(ValueError):
            mosquitto_bridge_config(**args)


async def test_bridge_stanza_carries_qos1_and_retained_both_ways(bridged) -> None:
    a, b = bridged.a, bridged.b
    stanza = mosquitto_bridge_config(BRIDGE_NAME, LOOPBACK, a.port)
    assert b.config_text().endswith(stanza)  # appended last: it is one bridge section
    assert "connection" not in a.config_text()
    # A retained message published on either broker is retained on both.
    for src, sender in ((a, "ra"), (b, "rb")):
        async with aiomqtt.Client(LOOPBACK, src.port, identifier=f"pub-{sender}") as pub:
            await pub.publish(announce_topic(NET, sender), sender.encode(), qos=1, retain=True)
    for broker in (a, b):
        held = await _retained_on(broker, {"ra", "rb"}, 10)
        assert held == {announce_topic(NET, "ra"): b"ra", announce_topic(NET, "rb"): b"rb"}


# ---------------------------------------------------------------------------- Murmur
async def test_murmur_across_two_bridged_brokers(bridged, make_trainer, tmp_path: Path) -> None:
    a, b = bridged.a, bridged.b
    admission = AdmissionKey.generate(NET)
    on_a = Network(a.url, admission)
    on_b = Network(b.url, admission, events=on_a.events)  # one event log for both sides
    n_trainers = 7
    for i in range(3):
        on_a.add(f"a{i}", make_trainer(i, n_trainers), QUIET)
        on_b.add(f"b{i}", make_trainer(3 + i, n_trainers), QUIET)
    first = on_a.peers + on_b.peers
    first_ids = {p.peer_id for p in first}
    proc: subprocess.Popen[bytes] | None = None
    async with Sniffer(a.url) as sniffer_a:
        try:
            # --- (a) every peer sees every other, across the bridge ----------------------
            await wait_until(_sees(first, first_ids), 30, "every peer to see the other five")
            # Both brokers hold every peer's signed announcement as a retained message.
            for broker in (a, b):
                held = await _retained_on(broker, first_ids, 10)
                for peer_id in first_ids:
                    msg = decode_message(held[announce_topic(NET, peer_id)])
                    assert msg.header.kind is m.Kind.ANNOUNCE, (broker.port, peer_id)
                    assert msg.header.sender == peer_id
            # A newcomer on B learns A's peers from B's retained copies: they announce only
            # when they connect (QUIET), long before it starts.
            newcomer = on_b.add("b3", make_trainer(6, n_trainers), QUIET)
            everyone = [*first, newcomer]
            all_ids = first_ids | {"b3"}
            await wait_until(_sees([newcomer], all_ids), 20,
                             "the newcomer on B to learn every peer from retained copies")
            await wait_until(_sees(everyone, all_ids), 20, "every peer to see the newcomer")

            # --- (b) sessions across the bridge complete and agree ------------------------
            await wait_until(lambda: len(_cross_broker_sessions(on_a)) >= 2, 90,
                             "two completed sessions with members on both brokers")

            # --- (c) a peer on B killed: its signed will crosses the bridge ---------------
            # An idle peer in its own process on B; SIGKILLed, B publishes its signed will.
            key_file, cert_file = write_identity(admission, "victim", tmp_path)
            trainer = on_a.peers[0].trainer
            proc = spawn_idle_peer(b.url, NET, key_file, cert_file, admission.public_key.hex(),
                                   model_id=trainer.model_id, param_count=trainer.param_count,
                                   announce_interval_s=600.0, silence_expiry_s=1800.0)
            await wait_until(lambda: all(p.membership.get("victim") is not None
                                         for p in everyone), 30,
                             "every peer to see the victim on B")
            member = on_a.peers[0].membership.get("victim")
            assert member is not None
            connection = member.connection
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            assert proc.returncode == -signal.SIGKILL
            # Silence expiry is 30 min (QUIET): within 10 s only the will can remove it.
            await wait_until(lambda: all(p.membership.get("victim") is None
                                         for p in on_a.peers), 10,
                             "the victim's will to remove it from the views on A")
            await wait_until(lambda: all(p.membership.get("victim") is None
                                         for p in on_b.peers), 10,
                             "the victim's will to remove it from the views on B")
            def wills_on_a() -> list[m.SignedMessage]:
                on_topic = [decode_message(p) for t, p in sniffer_a.records
                            if t == announce_topic(NET, "victim") and p]
                return [msg for msg in on_topic if msg.header.kind is m.Kind.LEAVE]

            # The sniffer is one more subscriber on A, served in its own time.
            await wait_until(lambda: bool(wills_on_a()), 5, "the sniffer on A to see the will")
            wills = wills_on_a()
            # B published the will the victim signed for that very connection.
            assert all(w.body.connection == connection for w in wills)
            assert all(w.body.reason == "connection lost" for w in wills)

            # --- (d) an unsigned clear published on A removes nobody ----------------------
            target = "b0"
            # The target ignores its own announce topic (its own retained copy echoed back).
            others = [p for p in everyone if p.peer_id != target]
            before = [p.drops.snapshot().get("unsigned_clear", 0) for p in others]
            async with aiomqtt.Client(LOOPBACK, a.port, identifier="mallory") as mallory:
                await mallory.publish(announce_topic(NET, target), b"", qos=1, retain=True)
            await wait_until(
                lambda: all(p.drops.snapshot().get("unsigned_clear", 0) > n
                            for p, n in zip(others, before, strict=True)),
                10, "every other peer, on A and on B, to drop the unsigned clear")
            assert all(p.membership.get(target) is not None for p in others)
            assert _sees(everyone, all_ids)()

            # Sessions across the bridge keep completing after all this.
            done = len(_cross_broker_sessions(on_a))
            await wait_until(lambda: len(_cross_broker_sessions(on_a)) > done, 60,
                             "another cross-broker session after the attack and the kill")
            drops = {p.peer_id: p.drops.snapshot() for p in everyone}
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            await _close(on_a, on_b)
    # The members of every completed session, on either broker, rebuilt the same sum.
    check_group_sums(on_a, min_complete=3)
    assert len(_cross_broker_sessions(on_a)) >= 3
    # Nothing but the one attack was dropped: the bridge duplicates or mangles nothing that
    # a peer would count (a QoS 1 duplicate would show as "replay").
    for peer_id, counts in drops.items():
        assert set(counts) <= {"unsigned_clear"}, (peer_id, counts)
