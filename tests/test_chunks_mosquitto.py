"""Chunked messages (issue 14) between real peers over a real Mosquitto whose own
``max_packet_size`` is set just above the peers' ``max_message_bytes`` (16 KiB), so the broker
itself would refuse any message that was not chunked.

Peers share their whole model (top-k fraction 1.0, 4810 parameters): every SHARE and PARTIAL
(Shamir) or MASKED (masked session) is about 19 KB and must travel as CHUNKs. Sessions
complete and the members agree on the plain sum; the sniffer sees no payload above the limit.
An admitted attacker's forged, duplicated, replayed, inconsistent, mis-hashed, smuggled and
flooding chunks are each one counted drop, and the peers keep completing sessions. The harness
is tests/test_node_mosquitto.py's.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable

import aiomqtt
import msgpack
import pytest

from crypto.identity import Identity
from peer.network.node import Peer
from peer.network.transport import BrokerSettings
from protocol import messages as m
from protocol.chunks import ChunkReassembler, encode_chunked, split_wire
from protocol.codec import decode_message, encode_message
from protocol.fields import chunk_span
from protocol.limits import CHUNK_OVERHEAD_BYTES, MAX_PAYLOAD_BYTES, MIN_MESSAGE_BYTES_LIMIT
from protocol.topics import announce_topic, direct_topic, parse_topic
from sim.broker import MosquittoBroker
from tests.conftest import running_mosquitto, wait_until
from tests.test_node_mosquitto import (
    FAST,
    NET,
    Network,
    Sniffer,
    check_group_sums,
    shard_trainer_factory,
    start_network,
)

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(120)]

LIMIT = MIN_MESSAGE_BYTES_LIMIT
#: Room for the MQTT fixed header, topic and packet id around a LIMIT-byte payload.
PACKET_SLACK = 512
CHUNKED = dataclasses.replace(FAST, max_message_bytes=LIMIT)
#: The bodies that carry a whole-model vector (index sets travel compactly encoded, so START
#: and ACCEPT stay small): each must have been chunked.
LARGE_BODIES = {"shamir": {m.Share, m.Partial}, "masked": {m.Masked}}


@pytest.fixture
async def small_broker() -> AsyncIterator[MosquittoBroker]:
    """Mosquitto refusing every packet larger than LIMIT + PACKET_SLACK bytes (the later
    ``max_packet_size`` line overrides the generated one)."""
    async with running_mosquitto(f"max_packet_size {LIMIT + PACKET_SLACK}") as broker:
        yield broker


@pytest.fixture
def make_full_trainer(digits_source, one_torch_thread) -> Callable[[int, int], object]:
    """make(index, n): a real LocalTrainer (MLP on digits, DP-SGD) sharing its whole model
    (top-k fraction 1.0), so that every session message carrying a vector exceeds LIMIT."""
    return shard_trainer_factory(digits_source, topk_fraction=1.0)


async def assert_broker_refuses_unchunked(broker: MosquittoBroker, sniffer: Sniffer) -> None:
    """A payload just above LIMIT + PACKET_SLACK never reaches a subscriber; a marker
    published after it does."""
    host, port, _ = BrokerSettings(url=broker.url).endpoint()
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(host, port, identifier="too-big") as client:
            await client.publish("probe/big", b"x" * (LIMIT + PACKET_SLACK), qos=1, timeout=1)
    async with aiomqtt.Client(host, port, identifier="marker") as client:
        await client.publish("probe/marker", b"m" * LIMIT, qos=1)
    await wait_until(lambda: any(t == "probe/marker" for t, _p in sniffer.records), 10,
                     "the marker at the sniffer")
    assert not any(t == "probe/big" for t, _p in sniffer.records)


def reassembled(records: list[tuple[str, bytes]]) -> list[tuple[str, m.SignedMessage, int]]:
    """Every message the sniffer saw in chunks, reassembled: (topic, inner, chunk count)."""
    reassembler = ChunkReassembler()
    out = []
    for topic, payload in records:
        if not payload or topic.startswith("probe/"):
            continue
        msg = decode_message(payload)
        if msg.header.kind is m.Kind.CHUNK:
            assert isinstance(msg.body, m.Chunk)
            wire = reassembler.add(msg.header.sender, topic, msg.header.session, msg.body, 0.0)
            if wire is not None:
                inner = decode_message(wire)
                assert (inner.header.sender, inner.header.session) == (
                    msg.header.sender, msg.header.session)
                out.append((topic, inner, msg.body.count))
    return out


# ---------------------------------------------------------------------------- scenarios
@pytest.mark.parametrize("kind", ["shamir", "masked"])
async def test_sessions_complete_through_a_broker_that_refuses_large_packets(
        small_broker: MosquittoBroker, make_full_trainer, kind: str) -> None:
    config = dataclasses.replace(CHUNKED, session_kind=kind)
    async with Sniffer(small_broker.url) as sniffer:
        await assert_broker_refuses_unchunked(small_broker, sniffer)
        net = await start_network(small_broker.url, 3, make_full_trainer, config)
        try:
            await wait_until(lambda: all(p.counters.sessions_done >= 2 for p in net.peers), 60,
                             f"two {kind} sessions per peer")
            running = [p.status() for p in net.peers]
        finally:
            await net.close()
    check_group_sums(net, min_complete=2)
    for st in running:
        assert st.drops == {}, st.drops  # an honest run drops nothing
        assert st.chunked_sent >= 2 and st.chunked_received >= 2, st
    payloads = [(t, p) for t, p in sniffer.records if not t.startswith("probe/")]
    assert max(len(p) for _t, p in payloads) <= LIMIT
    whole = reassembled(payloads)
    assert {type(inner.body) for _t, inner, _n in whole} >= LARGE_BODIES[kind]
    assert all(count == 2 for _t, _inner, count in whole)  # ~19 KB each, in two chunks
    if kind == "masked":  # MASKED is chunked on its session topic, like the message itself
        assert any(parse_topic(NET, t).kind == "session" and isinstance(inner.body, m.Masked)
                   for t, inner, _n in whole)


async def test_hostile_chunks_are_counted_drops_and_peers_keep_working(
        small_broker: MosquittoBroker, make_full_trainer) -> None:
    async with Sniffer(small_broker.url) as sniffer:
        net = await start_network(small_broker.url, 3, make_full_trainer, CHUNKED)
        try:
            await wait_until(lambda: sum(p.counters.sessions_done for p in net.peers) >= 3, 40,
                             "sessions before the attack")
            await attack(net, small_broker, sniffer)
            await net.wait_for_more_sessions(40, "after the attack")
        finally:
            await net.close()
    check_group_sums(net, min_complete=2)


async def test_sessions_complete_while_two_admitted_senders_flood_chunks(
        small_broker: MosquittoBroker, make_full_trainer) -> None:
    """Two admitted senders send every peer unfinished messages that together filled the
    whole 16 MiB reassembly used to allow (for its 30 s), and two model-sized ones they never
    finish. Each holds at most one sender's share at each peer (one message of this model),
    every refused chunk is counted, and the peers keep completing chunked sessions well
    within those 30 s."""
    net = await start_network(small_broker.url, 3, make_full_trainer, CHUNKED)
    try:
        await wait_until(lambda: sum(p.counters.sessions_done for p in net.peers) >= 3, 40,
                         "sessions before the flood")
        before = [p.status().drops.get("chunk_overflow", 0) for p in net.peers]
        host, port, _ = BrokerSettings(url=small_broker.url).endpoint()
        for name in ("mallory", "trudy"):
            ident = Identity.generate(name)
            cert = net.admission.issue(ident.public, valid_for_s=3600, now=time.time())
            seqs = itertools.count(time.time_ns() // 1000)

            def signed(kind: m.Kind, body: m.Body, session: bytes, ident: Identity = ident,
                       seqs: itertools.count[int] = seqs) -> bytes:
                header = m.Header(m.PROTOCOL_VERSION, NET, kind, ident.peer_id, session,
                                  next(seqs))
                return encode_message(header, body, ident.sign)

            async with aiomqtt.Client(host, port, identifier=name) as client:
                announce = signed(m.Kind.ANNOUNCE, m.Announce(cert.to_bytes(), "other-model",
                                                              10, os.urandom(16)), b"")
                await client.publish(announce_topic(NET, name), announce, qos=1, retain=True)
                await wait_until(lambda n=name: all(p.membership.get(n) is not None
                                                    for p in net.peers), 10,
                                 f"{name} admitted everywhere")
                for target in net.peers:
                    for payload in flood_chunks(signed):
                        await client.publish(direct_topic(NET, name, target.peer_id), payload,
                                             qos=1)
        await net.wait_for_more_sessions(20, "while two senders hold all they can")
        refused = 2 * BIG_COUNT  # each chunk of the two longer messages, from each flooder
        await wait_until(lambda: all(p.status().drops.get("chunk_overflow", 0) - b == refused
                                     for p, b in zip(net.peers, before, strict=True)), 20,
                         "every chunk of the messages longer than a sender's share refused")
        for p in net.peers:  # the flooders still hold their share, and no more
            limits = p.inbound.chunks.limits
            assert all(0 < p.inbound.chunks.held_by(n)[1] <= limits.max_sender_bytes
                       for n in ("mallory", "trudy"))
    finally:
        await net.close()
    check_group_sums(net, min_complete=2)


#: The chunk count of an 8 MiB message in chunks that fit LIMIT.
BIG_COUNT = -(-MAX_PAYLOAD_BYTES // (LIMIT - CHUNK_OVERHEAD_BYTES))


def flood_chunks(signed: Callable[[m.Kind, m.Body, bytes], bytes]) -> list[bytes]:
    """What one flooder sends one peer, each message for a session id of its own: all but the
    last chunk of an 8 MiB message, then one chunk of a message exactly as long as two of
    that last chunk (together exactly MAX_PAYLOAD_BYTES, all that one sender could hold
    before; two flooders held the whole 16 MiB), then the first chunk of two model-sized
    messages."""
    last = chunk_span(BIG_COUNT - 1, BIG_COUNT, MAX_PAYLOAD_BYTES)
    plan = [(MAX_PAYLOAD_BYTES, BIG_COUNT, BIG_COUNT - 1), (2 * (last[1] - last[0]), 2, 1),
            (20_000, 2, 1), (20_001, 2, 1)]
    out = []
    for total, count, sent in plan:
        session, digest = os.urandom(16), os.urandom(32)
        for index in range(sent):
            start, end = chunk_span(index, count, total)
            out.append(signed(m.Kind.CHUNK, m.Chunk(digest, index, count, total,
                                                    os.urandom(end - start)), session))
    return out


async def attack(net: Network, broker: MosquittoBroker, sniffer: Sniffer) -> None:
    """Mallory, admitted with a real certificate (but another model, so nobody invites it),
    sends the target one attack per drop reason; each is counted exactly once."""
    honest, target = net.peers[0], net.peers[1]
    mallory = Identity.generate("mallory")
    cert = net.admission.issue(mallory.public, valid_for_s=3600, now=time.time())
    seqs = itertools.count(time.time_ns() // 1000)
    inbox = direct_topic(NET, "mallory", target.peer_id)

    def signed(kind: m.Kind, body: m.Body, session: bytes, sender: str = "mallory") -> bytes:
        header = m.Header(m.PROTOCOL_VERSION, NET, kind, sender, session, next(seqs))
        return encode_message(header, body, mallory.sign)

    def share(size: int) -> tuple[bytes, bytes]:
        session = os.urandom(16)
        return session, signed(m.Kind.SHARE, m.Share(target.peer_id, os.urandom(size)), session)

    def chunks_of(session: bytes, bodies: list[m.Chunk], sender: str = "mallory") -> list[bytes]:
        return [signed(m.Kind.CHUNK, body, session, sender) for body in bodies]

    # a real chunked message of the honest peer to the target, captured from the broker
    def captured_now() -> list[m.SignedMessage]:
        return [inner for t, inner, _n in reassembled(sniffer.records)
                if t == direct_topic(NET, honest.peer_id, target.peer_id)]

    await wait_until(lambda: bool(captured_now()), 20, "a chunked message at the sniffer")
    captured = captured_now()[0]
    announce = signed(m.Kind.ANNOUNCE, m.Announce(cert.to_bytes(), "mallory-model", 10,
                                                  os.urandom(16)), b"")
    # Messages within what one sender may hold (session_message_bound of this 4810-parameter
    # model, about 23 KB): two chunks each.
    s1, w1 = share(17_000)
    c1 = split_wire(w1, LIMIT)
    first = chunks_of(s1, c1[:1])[0]
    start, end = chunk_span(1, c1[1].count, c1[1].total_bytes - 1)
    shorter = dataclasses.replace(c1[1], total_bytes=c1[1].total_bytes - 1,
                                  data=c1[1].data[:end - start])
    s2, w2 = share(17_000)
    bad_digest = [dataclasses.replace(c, digest=bytes(32)) for c in split_wire(w2, LIMIT)]
    smuggled = encode_chunked(captured_wire(captured), max_message_bytes=LIMIT, network=NET,
                              sender="mallory", session=captured.header.session,
                              sign=mallory.sign, next_seq=lambda: next(seqs))
    flood = [chunks_of(s, split_wire(w, LIMIT)[:1])[0] for s, w in (share(17_000 + n)
                                                                      for n in range(2))]
    s3, w3 = share(40_000)  # longer than one sender may hold: refused at its first chunk
    oversized = chunks_of(s3, split_wire(w3, LIMIT)[:1])[0]
    attacks = [
        # a chunk signed by mallory in the honest peer's name, on its topic
        (direct_topic(NET, honest.peer_id, target.peer_id),
         chunks_of(s1, c1[:1], sender=honest.peer_id)[0], "bad_signature"),
        # whole messages first (mallory may hold only about one message of this model)
        *[(inbox, p, None) for p in chunks_of(s2, bad_digest[:-1])],
        (inbox, chunks_of(s2, bad_digest[-1:])[0], "chunk_digest"),
        # the honest peer's message, re-chunked under mallory's name
        *[(inbox, p, None) for p in smuggled[:-1]],
        (inbox, smuggled[-1], "topic_mismatch"),
        (inbox, first, None),  # held
        (inbox, chunks_of(s1, c1[:1])[0], "chunk_duplicate"),  # index 0 again, fresh seq
        (inbox, first, "replay"),  # the same bytes again
        # index 1 of the same digest, valid in itself, but one byte shorter in total
        (inbox, chunks_of(s1, [shorter])[0], "chunk_inconsistent"),
        # mallory holds one unfinished message; one more fills its byte share, the third
        # overflows, and so does any message too long to hold
        (inbox, flood[0], None),
        (inbox, flood[1], "chunk_overflow"),
        (inbox, oversized, "chunk_overflow"),
        (inbox, b"\x93\x01marker\xff", "malformed"),  # handled last: all the above are counted
    ]
    expected = Counter(reason for _t, _p, reason in attacks if reason is not None)
    host, port, _ = BrokerSettings(url=broker.url).endpoint()
    async with aiomqtt.Client(host, port, identifier="mallory") as client:
        await client.publish(announce_topic(NET, "mallory"), announce, qos=1, retain=True)
        await wait_until(lambda: target.membership.get("mallory") is not None, 10,
                         "mallory admitted at the target")
        before = target.status().drops
        for topic, payload, _reason in attacks:
            assert len(payload) <= LIMIT
            await client.publish(topic, payload, qos=1)

    def counted() -> bool:
        drops = target.status().drops
        return all(drops.get(k, 0) - before.get(k, 0) >= v for k, v in expected.items())

    await wait_until(counted, 10, f"drops {expected} at the target")
    after = target.status().drops
    changed = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}
    assert {k: v for k, v in changed.items() if v} == expected  # each counted, nothing else
    # mallory's unfinished messages stay held (within its bounds) until they expire
    assert target.inbound.chunks.held_by("mallory") == (
        2, sum(len(decode_message(p).body.data) for p in [first, flood[0]]))
    assert target.inbound.chunks.held_by("mallory")[1] <= (
        target.inbound.chunks.limits.max_sender_bytes)
    assert_peer_unharmed(target)


def captured_wire(message: m.SignedMessage) -> bytes:
    """The wire bytes of a decoded message, as its sender signed them."""
    return msgpack.packb([message.signed_bytes, message.signature], use_bin_type=True)


def assert_peer_unharmed(peer: Peer) -> None:
    assert peer.membership.get("mallory") is not None  # admitted: the drops were not its cert
    assert peer.transport.connected.is_set()

