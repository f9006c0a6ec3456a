"""Membership is decided by signatures and the admission key alone, over a real Mosquitto.

Only a peer can take itself out of the network (issue 10): an MQTT client that knows nothing
of Murmur's keys publishes on a live peer's announce topic an empty retained payload (MQTT's
"clear"), the peer's own last will captured from an earlier connection, and a LEAVE forged with
another key. None of them removes the peer from anyone's view, each is dropped under its own
reason, and sessions with the peer keep completing. The genuine will of the current connection
still removes a peer that died.

Only an admitted key can bring a peer in: an ANNOUNCE with a genuine certificate but a
signature its certified key did not make, and one whose certificate the network's admission key
did not sign, are counted drops (``bad_signature``, ``bad_certificate``) and never put their
sender in a view, while a genuine newcomer announced by the same client is admitted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import pytest

from crypto.admission import AdmissionKey, Certificate
from crypto.identity import Identity
from peer.assembly import build_peer
from peer.network.transport import BrokerSettings
from protocol import messages as m
from protocol.codec import decode_message, encode_message
from protocol.topics import announce_topic
from sim.idle_peer import spawn_idle_peer, write_identity
from tests.conftest import wait_until
from tests.test_node_mosquitto import (
    FAST,
    NET,
    ResidualTrainer,
    Sniffer,
    make_trainer,
    start_network,
)

__all__ = ["make_trainer"]  # the fixture, imported for pytest

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(150)]

def _is_leave_of(payload: bytes, peer_id: str) -> bool:
    if not payload:
        return False
    msg = decode_message(payload)
    return msg.header.kind is m.Kind.LEAVE and msg.header.sender == peer_id


async def test_only_the_peer_itself_can_leave(mosquitto, make_trainer, tmp_path: Path) -> None:
    net = await start_network(mosquitto.url, 3, make_trainer)
    # A first incarnation of the victim (an idle peer process) is SIGKILLed by the test, so
    # the broker publishes the will it signed for that connection.
    key_file, cert_file = write_identity(net.admission, "victim", tmp_path)
    victim, cert = Identity.load(key_file), Certificate.from_bytes(cert_file.read_bytes())
    topic = announce_topic(NET, victim.peer_id)
    trainer = net.peers[0].trainer
    async with Sniffer(mosquitto.url) as sniffer:
        try:
            # --- first life: the will of the connection that died removes the victim ----------
            proc = spawn_idle_peer(mosquitto.url, NET, key_file, cert_file,
                                   net.admission.public_key.hex(), model_id=trainer.model_id,
                                   param_count=trainer.param_count, announce_interval_s=2.0)
            try:
                await wait_until(lambda: all(p.membership.get("victim") is not None
                                             for p in net.peers), 30, "the victim's first life")
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
            await wait_until(lambda: any(t == topic and _is_leave_of(p, "victim")
                                         for t, p in sniffer.records), 60,
                             "the broker to publish the victim's will")
            old_will = next(p for t, p in sniffer.records
                            if t == topic and _is_leave_of(p, "victim"))
            await wait_until(lambda: all(p.membership.get("victim") is None
                                         for p in net.peers), 10,
                             "the genuine will to remove the dead victim")

            # --- second life: a new connection, a new connection id -------------------------
            second = build_peer(identity=victim, certificate=cert,
                                admission_public_key=net.admission.public_key, network_id=NET,
                                trainer=make_trainer(3, 4), broker=BrokerSettings(mosquitto.url),
                                node=FAST, on_event=net.events.append)
            net.peers.append(second)
            net.stops.append(asyncio.Event())
            net.tasks.append(asyncio.create_task(second.run(net.stops[-1])))
            others = net.peers[:3]
            await wait_until(lambda: all(p.membership.get("victim") is not None
                                         for p in others), 30, "the victim's second life")
            current = others[0].membership.get("victim")
            assert current is not None
            assert decode_message(old_will).body.connection != current.connection

            # --- the attack: clear, replayed will, forged leave ------------------------------
            mallory = Identity.generate("victim")  # same name, not the certified key
            forged = encode_message(
                m.Header(m.PROTOCOL_VERSION, NET, m.Kind.LEAVE, "victim", b"",
                         m.SequenceCounter().next()),
                m.Leave("forged", current.connection), mallory.sign)
            host, port, _ = BrokerSettings(url=mosquitto.url).endpoint()
            attack_started = time.time()
            async with aiomqtt.Client(host, port, identifier="mallory") as client:
                for payload in (b"", old_will, forged):
                    await client.publish(topic, payload, qos=1, retain=True)
            for reason in ("unsigned_clear", "stale_leave", "bad_signature"):
                await wait_until(lambda r=reason: all(p.drops.snapshot().get(r, 0) >= 1
                                                      for p in others), 20,
                                 f"every peer to drop the {reason} message")
            assert all(p.membership.get("victim") is not None for p in others)
            # ... and sessions with the victim keep completing after the attack.
            await wait_until(
                lambda: any(e.kind == "session_done" and e.time > attack_started
                            and "victim" in e.data["members"] and e.peer_id != "victim"
                            for e in net.events),
                60, "a session with the victim after the attack",
            )
            assert all(p.membership.get("victim") is not None for p in others)
        finally:
            await net.close()


def announce(ident: Identity, cert: Certificate, model_id: str, param_count: int,
             sign: Callable[[bytes], bytes] | None = None) -> bytes:
    """A retained ANNOUNCE of ``ident`` carrying ``cert``, signed by ``sign`` (default: the
    identity's own key)."""
    header = m.Header(m.PROTOCOL_VERSION, NET, m.Kind.ANNOUNCE, ident.peer_id, b"",
                      time.time_ns() // 1000)
    body = m.Announce(cert.to_bytes(), model_id, param_count, os.urandom(16))
    return encode_message(header, body, sign or ident.sign)


async def test_forged_announcements_are_dropped_and_never_admitted(mosquitto) -> None:
    config = dataclasses.replace(FAST, train=False, auto_start=False)
    net = await start_network(mosquitto.url, 2, ResidualTrainer, config)
    model_id, param_count = net.peers[0].params.model_id, net.peers[0].params.param_count
    now = time.time()
    # "forger" holds a genuine certificate (it leaked, or was copied off the wire) but not the
    # key it certifies; "rogue" signs with its own key under a certificate from a rogue
    # admission key that claims this network's name.
    forger = Identity.generate("forger")
    forger_cert = net.admission.issue(forger.public, valid_for_s=3600, now=now)
    impostor = Identity.generate("forger")
    rogue = Identity.generate("rogue")
    rogue_cert = AdmissionKey.generate(NET).issue(rogue.public, valid_for_s=3600, now=now)
    newcomer = Identity.generate("newcomer")
    newcomer_cert = net.admission.issue(newcomer.public, valid_for_s=3600, now=now)

    def flipped(data: bytes) -> bytes:  # the forger's own signature, one bit changed
        signature = bytearray(forger.sign(data))
        signature[0] ^= 1
        return bytes(signature)

    attacks = [
        (forger, announce(forger, forger_cert, model_id, param_count, impostor.sign)),
        (forger, announce(forger, forger_cert, model_id, param_count, flipped)),
        (rogue, announce(rogue, rogue_cert, model_id, param_count)),
    ]
    control = announce(newcomer, newcomer_cert, model_id, param_count)  # genuine: admitted
    before = [p.status().drops for p in net.peers]
    try:
        host, port, _ = BrokerSettings(url=mosquitto.url).endpoint()
        async with aiomqtt.Client(host, port, identifier="mallory") as client:
            for ident, payload in attacks:
                await client.publish(announce_topic(NET, ident.peer_id), payload, qos=1,
                                     retain=True)
            await client.publish(announce_topic(NET, "newcomer"), control, qos=1, retain=True)
        expected = {"bad_signature": 2, "bad_certificate": 1}

        def counted(i: int) -> dict[str, int]:
            drops = net.peers[i].status().drops
            return {k: drops.get(k, 0) - before[i].get(k, 0) for k in expected}

        await wait_until(lambda: all(counted(i) == expected for i in range(len(net.peers)))
                         and all(p.membership.get("newcomer") is not None for p in net.peers),
                         10, f"every peer to count {expected} and admit the newcomer")
        for p in net.peers:
            assert p.membership.get("forger") is None and p.membership.get("rogue") is None
            assert p.status().view_peers == 2  # the other peer and the newcomer, no forger
    finally:
        await net.close()
    assert all(counted(i) == expected for i in range(len(net.peers)))  # each counted once
