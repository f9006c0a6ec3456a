"""Only a peer can take itself out of the network (issue 10), over a real Mosquitto.

An MQTT client that knows nothing of Murmur's keys publishes on a live peer's announce topic:
an empty retained payload (MQTT's "clear"), the peer's own last will captured from an earlier
connection, and a LEAVE forged with another key. None of them removes the peer from anyone's
view, each is dropped under its own reason, and sessions with the peer keep completing. The
genuine will of the current connection still removes a peer that died.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiomqtt
import pytest

from crypto.admission import Certificate
from crypto.identity import Identity
from peer.daemon import build_peer
from peer.network.transport import BrokerSettings
from protocol import messages as m
from protocol.codec import decode_message, encode_message
from protocol.topics import announce_topic
from sim.idle_peer import spawn_idle_peer, write_identity
from tests.conftest import wait_until
from tests.test_node_mosquitto import FAST, NET, Sniffer, make_trainer, start_network

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
