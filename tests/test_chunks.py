"""Chunked wire messages (issue 14): protocol/chunks.py, the CHUNK body in the codec, its topic
binding, and the inbound checks a chunk and the message it completes pass
(peer/network/inbound.py), with real signatures and a real membership view."""

from __future__ import annotations

import itertools
import os
import random
import time
import tracemalloc
from collections import Counter

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.admission import AdmissionKey
from crypto.identity import Identity
from crypto.replay import ReplayWindow
from peer.assembly import node_config
from peer.config import ConfigError, SessionConfig, build_dataclass
from peer.errors import DroppedError
from peer.network.inbound import InboundChecks
from peer.network.transport import Incoming
from peer.network.view.membership import MembershipView
from protocol.chunks import (
    DROP_REASONS,
    ChunkError,
    ChunkReassembler,
    ReassemblyLimits,
    check_max_message_bytes,
    encode_chunked,
    split_wire,
    wire_digest,
)
from protocol.codec import decode_message, encode_message
from protocol.errors import FieldError, ProtocolError, SizeLimitError
from protocol.fields import chunk_span
from protocol.limits import (
    CHUNK_OVERHEAD_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_CHUNKS,
    MAX_PAYLOAD_BYTES,
    MIN_CHUNK_DATA_BYTES,
    MIN_MESSAGE_BYTES_LIMIT,
)
from protocol.messages import (
    PROTOCOL_VERSION,
    Announce,
    Chunk,
    Header,
    Kind,
    Masked,
    Share,
    SignedMessage,
)
from protocol.topics import (
    announce_topic,
    check_topic_binding,
    direct_topic,
    parse_topic,
    session_topic,
)

NET = "chunknet"
LONG_ID = "p" * 64  # the longest id: the largest chunk envelope
SESSION = bytes(range(16))
ALICE = Identity.generate("alice")


def share_of_length(length: int, *, ident: Identity = ALICE, recipient: str = "me",
                    session: bytes = SESSION, seq: int = 1, network: str = NET) -> bytes:
    """A signed SHARE whose wire form is exactly ``length`` bytes."""
    sealed_len = max(40, length - 200)
    for _ in range(4):  # the bin header width may change once near 256 / 65536
        header = Header(PROTOCOL_VERSION, network, Kind.SHARE, ident.peer_id, session, seq)
        wire = encode_message(header, Share(recipient, os.urandom(sealed_len)), ident.sign)
        if len(wire) == length:
            return wire
        sealed_len += length - len(wire)
    raise AssertionError(f"cannot build a {length}-byte SHARE")


def chunked(wire: bytes, limit: int, *, ident: Identity = ALICE, session: bytes = SESSION,
            seq_start: int = 10**15, network: str = NET) -> list[bytes]:
    seqs = itertools.count(seq_start)
    return encode_chunked(wire, max_message_bytes=limit, network=network, sender=ident.peer_id,
                          session=session, sign=ident.sign, next_seq=lambda: next(seqs))


# ------------------------------------------------------------------------------ splitting
@pytest.mark.parametrize("limit", [MIN_MESSAGE_BYTES_LIMIT, 65_536, DEFAULT_MAX_MESSAGE_BYTES])
@pytest.mark.parametrize("offset", ["limit-1", "limit", "limit+1", "2chunks", "2chunks+1",
                                    "5.3chunks"])
def test_round_trip_around_the_boundary(limit: int, offset: str) -> None:
    per_chunk = limit - CHUNK_OVERHEAD_BYTES
    length = {"limit-1": limit - 1, "limit": limit, "limit+1": limit + 1,
              "2chunks": 2 * per_chunk, "2chunks+1": 2 * per_chunk + 1,
              "5.3chunks": int(5.3 * per_chunk)}[offset]
    long_sender = Identity.generate(LONG_ID)
    wire = share_of_length(length, ident=long_sender, network=LONG_ID)
    parts = chunked(wire, limit, ident=long_sender, seq_start=(1 << 63) - 10_000,
                    network=LONG_ID)
    if length <= limit:
        assert parts == [wire]  # fits: sent whole, untouched
        return
    assert len(parts) == -(-length // per_chunk) >= 2
    assert max(map(len, parts)) <= limit
    decoded = [decode_message(p) for p in parts]
    assert [d.header.kind for d in decoded] == [Kind.CHUNK] * len(parts)
    assert all(d.header.session == SESSION and d.header.sender == LONG_ID for d in decoded)
    seqs = [d.header.seq for d in decoded]
    assert seqs == sorted(set(seqs))  # a fresh seq per chunk, in order
    # in order and in reverse, the last chunk in completes exactly the original bytes
    for order in (decoded, decoded[::-1]):
        reassembler = ChunkReassembler()
        results = [reassembler.add(LONG_ID, "t", SESSION, d.body, 0.0) for d in order]
        assert results[:-1] == [None] * (len(parts) - 1)
        assert results[-1] == wire
        assert len(reassembler) == 0 and reassembler.buffered_bytes == 0


def test_largest_message_splits_into_max_chunks_that_each_fit() -> None:
    wire = share_of_length(MAX_PAYLOAD_BYTES)
    bodies = split_wire(wire, MIN_MESSAGE_BYTES_LIMIT)
    assert len(bodies) == MAX_CHUNKS == 529
    assert b"".join(b.data for b in bodies) == wire
    assert {b.digest for b in bodies} == {wire_digest(wire)}
    reassembler = ChunkReassembler()
    assert [reassembler.add("alice", "t", SESSION, b, 0.0) for b in bodies][-1] == wire


def test_chunk_overhead_bound_holds_for_the_worst_case_envelope() -> None:
    """64-character network and sender, the largest seq, index and count, 8 MiB total."""
    ident = Identity.generate(LONG_ID)
    count = MAX_CHUNKS
    start, end = chunk_span(count - 1, count, MAX_PAYLOAD_BYTES)
    body = Chunk(os.urandom(32), count - 1, count, MAX_PAYLOAD_BYTES, os.urandom(end - start))
    header = Header(PROTOCOL_VERSION, LONG_ID, Kind.CHUNK, LONG_ID, SESSION, (1 << 63) - 1)
    overhead = len(encode_message(header, body, ident.sign)) - len(body.data)
    assert overhead == 281  # docs/protocol.md section 11 and protocol/limits.py say so
    assert overhead <= CHUNK_OVERHEAD_BYTES


@given(total=st.integers(1, 10**7), count=st.integers(1, 600))
@settings(max_examples=300, deadline=None)
def test_chunk_span_is_an_even_cover(total: int, count: int) -> None:
    count = min(count, total)
    spans = [chunk_span(i, count, total) for i in range(count)]
    assert spans[0][0] == 0 and spans[-1][1] == total
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    sizes = {end - start for start, end in spans}
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert max(sizes) == -(-total // count)


def test_split_refuses_what_needs_no_or_cannot_have_chunks() -> None:
    with pytest.raises(ValueError, match="no chunks"):
        split_wire(b"x" * MIN_MESSAGE_BYTES_LIMIT, MIN_MESSAGE_BYTES_LIMIT)
    with pytest.raises(ValueError, match="MAX_PAYLOAD_BYTES"):
        split_wire(b"x" * (MAX_PAYLOAD_BYTES + 1), MIN_MESSAGE_BYTES_LIMIT)
    with pytest.raises(ValueError, match="max_message_bytes"):
        split_wire(b"x" * 100_000, MIN_MESSAGE_BYTES_LIMIT - 1)


@pytest.mark.parametrize("value", [MIN_MESSAGE_BYTES_LIMIT - 1, MAX_PAYLOAD_BYTES + 1, 0, -1,
                                   True, 65_536.0, "65536"])
def test_max_message_bytes_is_validated(value: object) -> None:
    with pytest.raises(ValueError, match="max_message_bytes"):
        check_max_message_bytes(value)  # type: ignore[arg-type]


def test_max_message_bytes_config_key() -> None:
    assert check_max_message_bytes(MIN_MESSAGE_BYTES_LIMIT) == MIN_MESSAGE_BYTES_LIMIT
    assert SessionConfig().max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES == 262_144
    session = build_dataclass(SessionConfig, {"max_message_bytes": 65_536}, "session")
    assert node_config(session).max_message_bytes == 65_536
    with pytest.raises(ConfigError, match="max_message_bytes must be an integer in 16384"):
        build_dataclass(SessionConfig, {"max_message_bytes": 4096}, "session")
    with pytest.raises(ConfigError, match=r"session\.max_message_bytes: expected an integer"):
        build_dataclass(SessionConfig, {"max_message_bytes": "256k"}, "session")


# ------------------------------------------------------------------------------ codec
def raw_chunk(body: list[object], session: bytes = SESSION) -> bytes:
    signed = msgpack.packb([PROTOCOL_VERSION, NET, int(Kind.CHUNK), "alice", session, 7, body],
                           use_bin_type=True)
    return msgpack.packb([signed, ALICE.sign(signed)], use_bin_type=True)


TOTAL = 3 * MIN_CHUNK_DATA_BYTES  # three chunks of MIN_CHUNK_DATA_BYTES
VALID = [b"d" * 32, 1, 3, TOTAL, b"c" * MIN_CHUNK_DATA_BYTES]

CODEC_CASES = [
    ("digest-short", 0, b"d" * 31, FieldError, "chunk.digest"),
    ("digest-long", 0, b"d" * 33, SizeLimitError, "chunk.digest"),
    ("digest-str", 0, "d" * 32, FieldError, "chunk.digest"),
    ("index-negative", 1, -1, FieldError, "chunk.index"),
    ("index-equals-count", 1, 3, FieldError, "chunk.index"),
    ("index-bool", 1, True, FieldError, "chunk.index"),
    ("count-one", 2, 1, FieldError, "chunk.count"),
    ("count-tiny-chunks", 2, 4, FieldError, "chunk.count"),  # > ceil(total / MIN_CHUNK_DATA)
    ("count-float", 2, 3.0, FieldError, "chunk.count"),
    ("total-fits-one-chunk", 3, MIN_CHUNK_DATA_BYTES, FieldError, "chunk.total_bytes"),
    ("total-too-large", 3, MAX_PAYLOAD_BYTES + 1, FieldError, "chunk.total_bytes"),
    ("data-short", 4, b"c" * (MIN_CHUNK_DATA_BYTES - 1), FieldError, "chunk.data"),
    ("data-long", 4, b"c" * (MIN_CHUNK_DATA_BYTES + 1), SizeLimitError, "chunk.data"),
    ("data-str", 4, "c" * 10, FieldError, "chunk.data"),
]


def test_valid_raw_chunk_decodes() -> None:
    msg = decode_message(raw_chunk(VALID))
    assert msg.body == Chunk(b"d" * 32, 1, 3, TOTAL, b"c" * MIN_CHUNK_DATA_BYTES)


@pytest.mark.parametrize(("case", "position", "value", "error", "field"), CODEC_CASES,
                         ids=[c[0] for c in CODEC_CASES])
def test_bad_chunk_fields_are_typed_errors(case: str, position: int, value: object,
                                           error: type[ProtocolError], field: str) -> None:
    body = list(VALID)
    body[position] = value
    with pytest.raises(error) as caught:
        decode_message(raw_chunk(body))
    assert type(caught.value) is error
    assert caught.value.field == field


def test_chunk_shape_and_session_are_checked() -> None:
    with pytest.raises(FieldError) as caught:
        decode_message(raw_chunk(VALID[:4]))
    assert caught.value.field == "chunk"
    with pytest.raises(FieldError) as caught:
        decode_message(raw_chunk(VALID, session=b""))
    assert caught.value.field == "header.session"
    # the count bound follows the total: at 8 MiB, MAX_CHUNKS and not one more
    assert decode_message(raw_chunk([b"d" * 32, 0, MAX_CHUNKS, MAX_PAYLOAD_BYTES,
                                     b"c" * (chunk_span(0, MAX_CHUNKS, MAX_PAYLOAD_BYTES)[1])]))
    start, end = chunk_span(0, MAX_CHUNKS + 1, MAX_PAYLOAD_BYTES)
    with pytest.raises(FieldError) as caught:
        decode_message(raw_chunk([b"d" * 32, 0, MAX_CHUNKS + 1, MAX_PAYLOAD_BYTES,
                                  b"c" * (end - start)]))
    assert caught.value.field == "chunk.count"


def test_encoder_refuses_an_invalid_chunk() -> None:
    header = Header(PROTOCOL_VERSION, NET, Kind.CHUNK, "alice", SESSION, 1)
    with pytest.raises(FieldError) as caught:
        encode_message(header, Chunk(b"d" * 32, 3, 3, TOTAL, b"c" * MIN_CHUNK_DATA_BYTES),
                       ALICE.sign)
    assert caught.value.field == "chunk.index"


def test_mutated_chunks_raise_only_protocol_errors() -> None:
    """A small fuzz of CHUNK messages (tests/test_protocol_fuzz.py keeps kinds 1-16)."""
    wire = chunked(share_of_length(40_000), MIN_MESSAGE_BYTES_LIMIT)[0]
    signed = msgpack.unpackb(wire)[0]
    rng = random.Random(1414)
    outcomes: Counter[str] = Counter()
    for case in range(3000):
        source = wire if case % 2 else signed
        buf = bytearray(source)
        for _ in range(rng.randrange(1, 4)):
            # mostly the header and body fields (the first ~200 bytes), sometimes anywhere
            pos = rng.randrange(min(len(buf), 200) if rng.random() < 0.8 else len(buf))
            op = rng.randrange(3)
            if op == 0:
                buf[pos] ^= 1 << rng.randrange(8)
            elif op == 1:
                buf[pos] = rng.choice([0x00, 0x01, 0x02, 0x7F, 0xC0, 0xC4, 0xCD, 0xCE, 0xFF])
            else:
                del buf[pos:pos + rng.randrange(1, 4)]
        data = bytes(buf) if source is wire else msgpack.packb([bytes(buf), bytes(64)])
        try:
            decode_message(data)
            outcomes["ok"] += 1
        except ProtocolError as exc:
            outcomes[str(exc.field)] += 1
    assert {"chunk.index", "chunk.count", "chunk.total_bytes", "chunk.data"} <= set(outcomes)


# ------------------------------------------------------------------------------ topics
def test_chunk_travels_on_the_topic_of_its_message() -> None:
    message = decode_message(chunked(share_of_length(40_000), MIN_MESSAGE_BYTES_LIMIT)[0])
    check_topic_binding(parse_topic(NET, direct_topic(NET, "alice", "me")), message)
    check_topic_binding(parse_topic(NET, session_topic(NET, "alice", SESSION)), message)
    for topic in (announce_topic(NET, "alice"), session_topic(NET, "alice", bytes(16))):
        with pytest.raises(FieldError):
            check_topic_binding(parse_topic(NET, topic), message)


# ------------------------------------------------------------------------------ reassembly
def bodies(length: int = 40_000, limit: int = MIN_MESSAGE_BYTES_LIMIT) -> tuple[bytes, list[Chunk]]:
    wire = share_of_length(length)
    return wire, split_wire(wire, limit)


def refused(reassembler: ChunkReassembler, reason: str, *args: object) -> ChunkError:
    with pytest.raises(ChunkError) as caught:
        reassembler.add(*args)  # type: ignore[arg-type]
    assert caught.value.drop_reason == reason
    return caught.value


def test_every_drop_reason() -> None:
    assert set(DROP_REASONS) == {"chunk_inconsistent", "chunk_duplicate", "chunk_overflow",
                                 "chunk_evicted", "chunk_expired", "chunk_digest"}
    wire, parts = bodies()
    first, second, third = parts
    r = ChunkReassembler()
    assert r.add("alice", "t", SESSION, first, 0.0) is None
    # duplicate index
    refused(r, "chunk_duplicate", "alice", "t", SESSION, first, 0.0)
    # inconsistent with the first chunk: another count / size, topic or session
    other_total = Chunk(first.digest, 1, 3, first.total_bytes + 3, second.data + b"x")
    refused(r, "chunk_inconsistent", "alice", "t", SESSION, other_total, 0.0)
    refused(r, "chunk_inconsistent", "alice", "other-topic", SESSION, second, 0.0)
    refused(r, "chunk_inconsistent", "alice", "t", bytes(16), second, 0.0)
    # none of them disturbed the message: it still completes
    assert r.add("alice", "t", SESSION, second, 0.0) is None
    assert r.add("alice", "t", SESSION, third, 0.0) == wire
    # a digest that does not match the bytes: the whole message is dropped
    forged = [Chunk(b"\x00" * 32, c.index, c.count, c.total_bytes, c.data) for c in parts]
    assert r.add("alice", "t", SESSION, forged[0], 0.0) is None
    assert r.add("alice", "t", SESSION, forged[1], 0.0) is None
    refused(r, "chunk_digest", "alice", "t", SESSION, forged[2], 0.0)
    assert len(r) == 0 and r.buffered_bytes == 0
    # overflow: a fifth unfinished message of one sender
    for n in range(4):
        _w, other = bodies(40_000 + n)
        assert r.add("alice", "t", SESSION, other[0], 0.0) is None
    refused(r, "chunk_overflow", "alice", "t", SESSION, first, 0.0)
    assert r.add("bob", "t", SESSION, first, 0.0) is None  # other senders are not affected
    # expiry: an unfinished message is forgotten max_age_s after its first chunk
    assert r.expire(30.0) == 0
    assert r.expire(30.5) == 5
    assert len(r) == 0 and r.buffered_bytes == 0


def test_a_full_buffer_evicts_only_a_sender_holding_more_than_the_newcomer() -> None:
    wire, parts = bodies(60_000)  # four chunks of 15 000 bytes
    _other, other_parts = bodies(60_001)
    size = len(parts[0].data)
    r = ChunkReassembler(ReassemblyLimits(max_buffered_bytes=6 * size + 10,
                                          max_sender_bytes=4 * size + 10))
    for chunk in parts[:3]:
        assert r.add("alice", "t", SESSION, chunk, 0.0) is None
    assert r.add("alice", "t", SESSION, other_parts[0], 0.0) is None
    # alice's second message would pass her own bound: that message goes, her first stays
    refused(r, "chunk_overflow", "alice", "t", SESSION, other_parts[1], 0.0)
    assert len(r) == 1 and r.buffered_bytes == 3 * size
    for chunk in parts[:3]:
        assert r.add("bob", "t", SESSION, chunk, 1.0) is None
    assert r.buffered_bytes == 6 * size  # full
    # carol needs room: alice and bob each hold more than carol would, the first of the two
    # largest (alice) loses her oldest unfinished message
    assert r.add("carol", "t", SESSION, parts[0], 2.0) is None
    assert r.held_by("alice") == (0, 0) and r.held_by("bob") == (1, 3 * size)
    assert r.take_evicted() == 1 and r.take_evicted() == 0 and r.evicted_total == 1
    for chunk in parts[1:3]:
        assert r.add("carol", "t", SESSION, chunk, 2.0) is None
    # full again, and bob would hold more than anybody else: refused (his whole message
    # goes), nobody is evicted for him
    refused(r, "chunk_overflow", "bob", "t", SESSION, parts[3], 3.0)
    assert r.held_by("bob") == (0, 0) and r.held_by("carol") == (1, 3 * size)
    assert r.take_evicted() == 0
    assert r.add("carol", "t", SESSION, parts[3], 3.0) == wire
    assert len(r) == 0 and r.buffered_bytes == 0


def test_expired_message_does_not_complete_late() -> None:
    _wire, parts = bodies()
    r = ChunkReassembler(ReassemblyLimits(max_age_s=5.0))
    r.add("alice", "t", SESSION, parts[0], 100.0)
    r.add("alice", "t", SESSION, parts[1], 104.0)  # progress does not extend the life
    assert r.expire(105.0) == 0
    assert r.expire(105.1) == 1
    # the last chunk arrives after expiry: it starts over, and nothing completes
    assert r.add("alice", "t", SESSION, parts[2], 106.0) is None
    assert len(r) == 1 and r.buffered_bytes == len(parts[2].data)


def test_memory_stays_bounded_under_a_flood_of_distinct_digests() -> None:
    """60 admitted senders each start many large messages and never finish one: what the
    reassembler holds stays within its bound (measured by tracemalloc, not only by its own
    count), every refused chunk and every evicted message is a counted drop, and expiry
    frees everything."""
    limits = ReassemblyLimits()
    r = ChunkReassembler(limits)
    total = MAX_PAYLOAD_BYTES
    count = -(-total // (DEFAULT_MAX_MESSAGE_BYTES - CHUNK_OVERHEAD_BYTES))
    size = chunk_span(0, count, total)[1]
    drops: Counter[str] = Counter()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        for n in range(600):
            sender = f"s{n % 60}"
            digest = n.to_bytes(32, "big")
            for index in range(2):  # two chunks of each message: never complete
                chunk = Chunk(digest, index, count, total, bytes([n % 251]) * size)
                try:
                    assert r.add(sender, "t", SESSION, chunk, 0.0) is None
                except ChunkError as exc:
                    drops[exc.drop_reason] += 1
                drops["chunk_evicted"] += r.take_evicted()
                del chunk
                assert r.buffered_bytes <= limits.max_buffered_bytes
        held = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert held <= limits.max_buffered_bytes + 1024 * 1024, held
    assert r.buffered_bytes > limits.max_buffered_bytes - 2 * size  # the buffer did fill
    # 1200 chunks, at most 64 held at the end: the rest were refused or evicted (a message
    # evicted or refused half-way frees its first chunk)
    assert set(drops) == {"chunk_overflow", "chunk_evicted"}
    assert drops["chunk_overflow"] + drops["chunk_evicted"] >= 500
    unfinished = len(r)
    assert unfinished > 0 and r.expire(31.0) == unfinished
    assert r.buffered_bytes == 0 and len(r) == 0
    # and an honest message goes through once the flood expired
    wire, parts = bodies()
    assert [r.add("honest", "t", SESSION, c, 32.0) for c in parts][-1] == wire


# ------------------------------------------------------------------------------ inbound
class Net:
    """A receiver "me" whose membership view knows alice and bob (real certificates)."""

    def __init__(self) -> None:
        self.admission = AdmissionKey.generate(NET)
        self.membership = MembershipView(NET, self.admission.public_key, "me",
                                         silence_expiry_s=600, clock_skew_s=300)
        self.inbound = InboundChecks(NET, "me", self.membership, ReplayWindow())
        self.bob = Identity.generate("bob")
        for ident in (ALICE, self.bob):
            cert = self.admission.issue(ident.public, valid_for_s=3600, now=time.time())
            header = Header(PROTOCOL_VERSION, NET, Kind.ANNOUNCE, ident.peer_id, b"", 1)
            wire = encode_message(header, Announce(cert.to_bytes(), "m", 10, bytes(16)),
                                  ident.sign)
            self.admit(announce_topic(NET, ident.peer_id), wire)

    def admit(self, topic: str, payload: bytes) -> SignedMessage | None:
        return self.inbound.admit(Incoming(topic, payload, False), time.time())

    def deliver(self, topic: str, parts: list[bytes]) -> SignedMessage | None:
        results = [self.admit(topic, p) for p in parts]
        assert results[:-1] == [None] * (len(parts) - 1)
        return results[-1]

    def dropped(self, reason: str, topic: str, payload: bytes) -> None:
        with pytest.raises(DroppedError) as caught:
            self.admit(topic, payload)
        assert caught.value.reason == reason, caught.value


INBOX = direct_topic(NET, "alice", "me")


def test_a_chunked_message_is_admitted_as_if_whole() -> None:
    net = Net()
    wire = share_of_length(50_000)
    inner = net.deliver(INBOX, chunked(wire, MIN_MESSAGE_BYTES_LIMIT))
    assert inner == decode_message(wire)
    assert net.inbound.reassembled == 1
    # a MASKED on alice's session topic, chunked there
    header = Header(PROTOCOL_VERSION, NET, Kind.MASKED, "alice", SESSION, 5)
    masked = encode_message(header, Masked(os.urandom(72 + 4 * 10_000)), ALICE.sign)
    inner = net.deliver(session_topic(NET, "alice", SESSION),
                        chunked(masked, MIN_MESSAGE_BYTES_LIMIT, seq_start=2 * 10**15))
    assert inner is not None and isinstance(inner.body, Masked)
    assert net.inbound.reassembled == 2


def test_inner_replay_check_is_skipped_where_the_window_could_not_hold_it() -> None:
    """The chunks' seqs are far above the inner seq (more than the 1024-wide window): the
    inner message is still admitted, because every chunk carrying it passed the window."""
    net = Net()
    wire = share_of_length(50_000, seq=1000)
    assert net.deliver(INBOX, chunked(wire, MIN_MESSAGE_BYTES_LIMIT, seq_start=50_000))
    net.dropped("stale", INBOX, share_of_length(1000, seq=1001))  # whole: checked as ever


def test_forged_and_replayed_chunks_are_dropped_before_buffering() -> None:
    net = Net()
    mallory = Identity.generate("alice")  # claims alice's name with its own key
    forged = chunked(share_of_length(50_000, ident=mallory), MIN_MESSAGE_BYTES_LIMIT,
                     ident=mallory)
    net.dropped("bad_signature", INBOX, forged[0])
    assert len(net.inbound.chunks) == 0 and net.inbound.chunks.buffered_bytes == 0
    parts = chunked(share_of_length(50_000), MIN_MESSAGE_BYTES_LIMIT)
    assert net.admit(INBOX, parts[0]) is None
    net.dropped("replay", INBOX, parts[0])
    assert net.inbound.chunks.buffered_bytes == len(decode_message(parts[0]).body.data)
    # a chunk of alice's on the wrong peer's inbox, or naming another sender
    net.dropped("topic_mismatch", direct_topic(NET, "bob", "me"), parts[1])


def test_the_completed_message_passes_its_own_checks() -> None:
    net = Net()
    # inner signed by bob, chunked by alice: bob's message does not belong on alice's topic
    bobs = share_of_length(50_000, ident=net.bob)
    parts = chunked(bobs, MIN_MESSAGE_BYTES_LIMIT, seq_start=10**14)
    for p in parts[:-1]:
        assert net.admit(INBOX, p) is None
    net.dropped("topic_mismatch", INBOX, parts[-1])
    # inner claims alice but is signed by another key
    mallory = Identity.generate("alice")
    parts = chunked(share_of_length(50_000, ident=mallory), MIN_MESSAGE_BYTES_LIMIT,
                    seq_start=2 * 10**14)
    for p in parts[:-1]:
        assert net.admit(INBOX, p) is None
    net.dropped("bad_signature", INBOX, parts[-1])
    # inner of another session than its chunks
    parts = chunked(share_of_length(50_000, session=bytes(16)), MIN_MESSAGE_BYTES_LIMIT,
                    seq_start=3 * 10**14)
    for p in parts[:-1]:
        assert net.admit(INBOX, p) is None
    net.dropped("chunk_inconsistent", INBOX, parts[-1])
    # a chunk inside a chunk
    inner_chunk = chunked(share_of_length(3 * MIN_MESSAGE_BYTES_LIMIT), 2 * MIN_MESSAGE_BYTES_LIMIT,
                          seq_start=4 * 10**14)[0]
    parts = chunked(inner_chunk, MIN_MESSAGE_BYTES_LIMIT, seq_start=5 * 10**14)
    for p in parts[:-1]:
        assert net.admit(INBOX, p) is None
    net.dropped("chunk_inconsistent", INBOX, parts[-1])
    # garbage reassembled correctly is still garbage
    junk = b"\x93" + os.urandom(40_000)
    parts = chunked(junk, MIN_MESSAGE_BYTES_LIMIT, seq_start=6 * 10**14)
    for p in parts[:-1]:
        assert net.admit(INBOX, p) is None
    net.dropped("malformed", INBOX, parts[-1])
    assert net.inbound.reassembled == 0
    assert len(net.inbound.chunks) == 0 and net.inbound.chunks.buffered_bytes == 0
