"""Memory a peer holds for others, bounded in bytes (issue 18, findings 3 and 4).

* ``protocol.limits.session_message_bound``: the largest honest session message of a model,
  pinned against the real encoder with the longest ids and every coordinate;
* ``peer.network.session.early``: messages that overtake START (both session kinds) are held
  within a byte budget per sender and in total; what honest members send for a whole model fits it;
* ``protocol.chunks``: reassembly shares its budget fairly, so two flooding senders never
  crowd out the members of the peer's session.

Tests over a real broker: tests/test_held_memory_mosquitto.py (the victim's RSS, measured).
"""

from __future__ import annotations

import gc
import os
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.identity import Identity
from peer.errors import DroppedError
from peer.network.session import masked_messages as mm
from peer.network.session.early import (
    EARLY_OVER_BUDGET,
    SMALL_MESSAGES_BYTES,
    EarlyBudget,
    EarlyBuffer,
    held_size,
)
from peer.network.session.masked import MaskedPhase
from peer.network.session.shamir import Contribution, Outgoing, Phase
from protocol import messages as m
from protocol.chunks import ChunkError, ChunkReassembler, ReassemblyLimits, split_wire
from protocol.codec import decode_message, encode_message
from protocol.limits import (
    FLOOD_SENDERS,
    MAX_MEMBERS,
    MAX_PAYLOAD_BYTES,
    MAX_SEALED_REVEAL_BYTES,
    MAX_SEQ_EXCLUSIVE,
    SEAL_OVERHEAD_BYTES,
    SEALED_KEYS_BYTES,
    SEALED_SESSION_KEY_BYTES,
    SESSION_ENVELOPE_BYTES,
    session_message_bound,
)
from tests import test_masked_session as masked_harness
from tests import test_session as shamir_harness

LONG = "p" * 64  # the longest peer and network id
MEMBERS = (LONG, *(f"{i:x}".rjust(64, "p") for i in range(1, MAX_MEMBERS)))
OTHER = MEMBERS[-1]  # a recipient with the longest id
SESSION = os.urandom(16)


# ------------------------------------------------------------------------- the bound
def largest_bodies(param_count: int, coordinates: np.ndarray) -> list[tuple[m.Kind, m.Body]]:
    """Every session body at its largest for a ``param_count`` model, with 64-character ids."""
    vector = os.urandom(SEAL_OVERHEAD_BYTES + 4 * (param_count + 1))
    publics = tuple(os.urandom(32) for _ in MEMBERS)
    return [
        (m.Kind.ACCEPT, m.Accept(coordinates)),
        (m.Kind.START, m.Start(MEMBERS, MAX_MEMBERS, coordinates)),
        (m.Kind.SHARE, m.Share(OTHER, vector)),
        (m.Kind.PARTIAL, m.Partial(OTHER, MEMBERS, vector)),
        (m.Kind.MASKED_ACCEPT, m.MaskedAccept(coordinates, publics[0])),
        (m.Kind.MASKED_START, m.MaskedStart(MEMBERS, MAX_MEMBERS, coordinates, publics, OTHER,
                                            os.urandom(SEALED_SESSION_KEY_BYTES))),
        (m.Kind.KEYS, m.Keys(OTHER, os.urandom(SEALED_KEYS_BYTES))),
        (m.Kind.MASKED, m.Masked(vector)),
        (m.Kind.CONFIRM, m.Confirm(MEMBERS)),
        (m.Kind.REVEAL, m.Reveal(os.urandom(MAX_SEALED_REVEAL_BYTES))),
    ]


def largest_wires(param_count: int, coordinates: np.ndarray) -> dict[m.Kind, bytes]:
    ident = Identity.generate(LONG)
    wires = {}
    for kind, body in largest_bodies(param_count, coordinates):
        header = m.Header(m.PROTOCOL_VERSION, LONG, kind, LONG, SESSION, MAX_SEQ_EXCLUSIVE - 1)
        wires[kind] = encode_message(header, body, ident.sign)
    return wires


@pytest.mark.parametrize("layout", ["every index", "scattered"])
def test_the_bound_covers_the_largest_message_of_every_kind(layout: str) -> None:
    param_count = 20_000
    rng = np.random.default_rng(0)
    coordinates = (np.arange(param_count, dtype=np.uint32) if layout == "every index" else
                   np.sort(rng.choice(param_count, 4000, replace=False)).astype(np.uint32))
    bound = session_message_bound(param_count)
    sizes = {kind: len(wire) for kind, wire in largest_wires(param_count, coordinates).items()}
    assert max(sizes.values()) <= bound, (sizes, bound)
    assert sizes[m.Kind.PARTIAL] > bound - SESSION_ENVELOPE_BYTES  # the vector dominates


def test_the_envelope_allowance_has_margin() -> None:
    """With one coordinate, what every kind adds around its vector or indices: about 2.2 kB
    at most (16 members, 64-character ids), inside SESSION_ENVELOPE_BYTES."""
    wires = largest_wires(1, np.zeros(1, dtype=np.uint32))
    assert 1500 < max(map(len, wires.values())) <= 2300 < SESSION_ENVELOPE_BYTES


def test_the_bound_is_capped_and_checked() -> None:
    assert session_message_bound(4810) == 4 * 4811 + SEAL_OVERHEAD_BYTES + SESSION_ENVELOPE_BYTES
    assert session_message_bound(1 << 30) == MAX_PAYLOAD_BYTES
    for bad in (0, -1, 2.5, 1 << 33):
        with pytest.raises(ValueError):
            session_message_bound(bad)  # type: ignore[arg-type]


def test_held_size_is_at_least_what_a_held_message_keeps() -> None:
    """A decoded message kept as (header, body), measured by tracemalloc, never exceeds its
    estimate: the budgets count at least the memory they hold."""
    ident = Identity.generate(LONG)
    coords = np.arange(20_000, dtype=np.uint32)
    for kind, body in largest_bodies(20_000, coords):
        header = m.Header(m.PROTOCOL_VERSION, LONG, kind, LONG, SESSION, 7)
        wire = encode_message(header, body, ident.sign)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            msg = decode_message(wire)
            kept = (msg.header, msg.body)
            del msg
            gc.collect()
            used = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert used <= held_size(kept[1]), (kind, used, held_size(kept[1]))


# -------------------------------------------------------------------------- early buffer
def test_early_buffer_bounds_each_sender_and_the_total_and_evicts_nothing() -> None:
    buffer: EarlyBuffer[str] = EarlyBuffer(EarlyBudget(per_sender_bytes=100, total_bytes=250))
    buffer.hold("alice", "a1", 60)
    buffer.hold("alice", "a2", 40)
    with pytest.raises(DroppedError) as caught:
        buffer.hold("alice", "a3", 1)  # alice's 100 bytes are spent
    assert caught.value.reason == EARLY_OVER_BUDGET
    buffer.hold("bob", "b1", 100)
    with pytest.raises(DroppedError):
        buffer.hold("carol", "c1", 51)  # the total: 200 held, 250 allowed
    buffer.hold("carol", "c2", 50)
    assert len(buffer) == 4 and buffer.held_bytes == 250
    assert buffer.held_by("alice") == 100 and buffer.held_by("carol") == 50
    assert buffer.take() == ["a1", "a2", "b1", "c2"]  # arrival order, nothing evicted
    assert len(buffer) == 0 and buffer.held_bytes == 0 and buffer.held_by("alice") == 0
    buffer.hold("alice", "a4", 100)  # taken: the budget is free again
    buffer.clear()
    assert buffer.take() == []
    with pytest.raises(ValueError):
        EarlyBudget(per_sender_bytes=10, total_bytes=9)


def test_the_early_budget_is_one_model_sized_message_per_sender() -> None:
    budget = EarlyBudget.for_session(4810, group_size=5)
    per_sender = session_message_bound(4810) + SMALL_MESSAGES_BYTES
    assert budget == EarlyBudget(per_sender, (5 - 1 + FLOOD_SENDERS) * per_sender)
    assert EarlyBudget.for_session(1 << 30, 3).per_sender_bytes == (
        MAX_PAYLOAD_BYTES + SMALL_MESSAGES_BYTES)


def shamir_waiting_for_start(group_size: int = 3) -> shamir_harness.Harness:
    """A Shamir group p0..p{g-1} of whole-model contributions whose START to the last
    member is withheld: that member waits in ACCEPTED."""
    h = shamir_harness.Harness(n=group_size, group_size=group_size, threshold=2,
                               k=shamir_harness.PARAMS_N)
    last = f"p{group_size - 1}"
    held: list[shamir_harness.Envelope] = []

    def hold_start(env: shamir_harness.Envelope) -> bool:
        if env.out.kind is m.Kind.START and env.out.recipient == last:
            held.append(env)
            return False
        return True

    h.link = hold_start
    h.start("p0", [f"p{i}" for i in range(1, group_size)])
    h.run()
    assert h.sessions[last].phase is Phase.ACCEPTED and held
    h.link = lambda env: True
    h.queue.extend(held)  # delivered by the next run()
    return h


def test_a_shamir_member_holds_early_messages_within_its_budget() -> None:
    h = shamir_waiting_for_start()
    victim = h.sessions["p2"]
    budget = EarlyBudget.for_session(shamir_harness.PARAMS_N, 3)
    seqs = iter(range(10**6, 10**7))

    def share_from(sender: str, size: int) -> list[str]:
        header = m.Header(m.PROTOCOL_VERSION, shamir_harness.NET, m.Kind.SHARE, sender,
                          victim.session_id, next(seqs))
        return victim.handle(header, m.Share("p2", os.urandom(size)), 0.0).drops

    fits = budget.per_sender_bytes - held_size(m.Share("p2", b""))  # exactly one share
    assert share_from("mallory", fits) == []  # one message of the model's size: held
    assert share_from("mallory", 1000) == [EARLY_OVER_BUDGET]  # mallory's share is spent
    assert share_from("mallory", MAX_PAYLOAD_BYTES // 2) == [EARLY_OVER_BUDGET]
    assert share_from("trudy", fits) == []  # another sender has its own share
    assert victim.phase is Phase.ACCEPTED
    # p1's real SHARE overtook START and was held too; START releases everything held
    h.run()
    shamir_harness.assert_done_and_consistent(h, ["p0", "p1", "p2"])
    assert EARLY_OVER_BUDGET not in h.drops["p2"]


def test_the_early_total_bounds_many_senders() -> None:
    h = shamir_waiting_for_start()
    victim = h.sessions["p2"]
    budget = EarlyBudget.for_session(shamir_harness.PARAMS_N, 3)
    per_message = budget.per_sender_bytes - held_size(m.Share("p2", b""))
    drops = []
    for n in range(12):
        header = m.Header(m.PROTOCOL_VERSION, shamir_harness.NET, m.Kind.SHARE, f"x{n}",
                          victim.session_id, 10**6 + n)
        drops.append(victim.handle(header, m.Share("p2", os.urandom(per_message)), 0.0).drops)
    # p1's SHARE is held already: the rest of the total takes g - 1 + FLOOD_SENDERS - 1 more
    room = budget.total_bytes // budget.per_sender_bytes - 1
    assert drops == [[]] * room + [[EARLY_OVER_BUDGET]] * (12 - room)


@pytest.mark.parametrize("g", [3, 5])
def test_what_honest_shamir_members_send_before_start_fits(g: int) -> None:
    h = shamir_waiting_for_start(g)
    h.run()
    shamir_harness.assert_done_and_consistent(h, [f"p{i}" for i in range(g)])
    assert all(EARLY_OVER_BUDGET not in d for d in h.drops.values()), h.drops


def masked_whole_model(g: int, t: int) -> masked_harness.Router:
    """A masked group whose members each contribute every coordinate (the largest MASKED)."""
    r = masked_harness.Router(g, t)
    every = np.arange(masked_harness.PARAMS_N, dtype=np.uint32)
    rng = np.random.default_rng(5)
    for i, pid in enumerate(r.members):
        values = rng.normal(0, 0.05, every.size).astype(np.float32)
        r.contrib[pid] = Contribution(every, values, round=0, fill=masked_harness.fill_of(i))
    return r


@pytest.mark.parametrize(("g", "t"), [(3, 2), (5, 3)])
def test_what_honest_masked_members_send_before_start_fits(g: int, t: int) -> None:
    """The last member's START arrives after every other member's KEYS (before it, nobody
    can mask): they are held, as are REVEALs that overtake the quorum, and the session
    completes."""
    r = masked_whole_model(g, t)
    last = f"p{g - 1}"
    held: list[Outgoing] = []
    released = False

    def link(sender: str, rcpt: str, out: Outgoing) -> bool:
        nonlocal released
        if out.kind is m.Kind.MASKED_START and rcpt == last and not released:
            held.append(out)
            return False
        if (held and not released and out.kind is m.Kind.KEYS and rcpt == last
                and sum(o.kind is m.Kind.KEYS and o.recipient == last
                        for _s, o in r.sent) == g - 1):
            released = True
            r.queue.append(("p0", held[0]))
        return True

    r.link = link
    r.start()
    r.settle()
    assert released
    masked_harness.assert_same_correct_sum(r, r.members, r.members)
    assert all(EARLY_OVER_BUDGET not in d for d in r.drops.values()), r.drops


def test_a_masked_member_holds_early_messages_within_its_budget() -> None:
    r = masked_whole_model(3, 2)
    r.link = lambda sender, rcpt, out: not (out.kind is m.Kind.MASKED_START and rcpt == "p2")
    r.start()
    r.run(0.0)
    victim = r.sessions["p2"]
    assert victim.phase is MaskedPhase.ACCEPTED
    budget = EarlyBudget.for_session(masked_harness.PARAMS_N, 3)
    fits = budget.per_sender_bytes - SMALL_MESSAGES_BYTES - held_size(m.Masked(b""))
    seqs = iter(range(10**6, 10**7))

    def send(sender: str, kind: m.Kind, body: mm.MaskedBody) -> list[str]:
        header = masked_harness.wire_header(kind, sender, victim.session_id, next(seqs))
        return victim.handle(header, body, 0.0).drops

    assert send("mallory", m.Kind.MASKED, m.Masked(os.urandom(fits))) == []
    assert send("mallory", m.Kind.KEYS, m.Keys("p2", os.urandom(SEALED_KEYS_BYTES))) == []
    assert send("mallory", m.Kind.MASKED, m.Masked(os.urandom(fits))) == [EARLY_OVER_BUDGET]
    # the members' KEYS (small) and mallory hold less than one share: three more full
    # shares fit the total of g - 1 + FLOOD_SENDERS shares, the rest do not
    # (the count cap this replaced held 64 messages of any size)
    full = budget.per_sender_bytes - held_size(m.Masked(b""))
    drops = [send(f"x{n}", m.Kind.MASKED, m.Masked(os.urandom(full))) for n in range(40)]
    assert drops == [[]] * 3 + [[EARLY_OVER_BUDGET]] * 37
    assert victim.phase is MaskedPhase.ACCEPTED


# -------------------------------------------------------------------------- reassembly
def test_reassembly_limits_follow_the_model_and_the_group() -> None:
    limits = ReassemblyLimits.for_sessions(4810, 5)
    per_sender = session_message_bound(4810)
    assert limits.max_sender_bytes == per_sender
    assert limits.max_buffered_bytes == (5 - 1 + FLOOD_SENDERS) * per_sender
    with pytest.raises(ValueError):
        ReassemblyLimits.for_sessions(4810, 1)


def test_a_message_longer_than_one_senders_share_is_refused_at_its_first_chunk() -> None:
    r = ChunkReassembler(ReassemblyLimits.for_sessions(4810, 3))
    big = m.Chunk(os.urandom(32), 0, 529, MAX_PAYLOAD_BYTES, os.urandom(15_900))
    with pytest.raises(ChunkError) as caught:
        r.add("mallory", "t", SESSION, big, 0.0)
    assert caught.value.drop_reason == "chunk_overflow"
    assert r.buffered_bytes == 0 and len(r) == 0


def honest_chunks(sender: str, length: int) -> tuple[bytes, list[m.Chunk]]:
    ident = Identity.generate(sender)
    header = m.Header(m.PROTOCOL_VERSION, "net", m.Kind.SHARE, sender, SESSION, 1)
    wire = encode_message(header, m.Share("me", os.urandom(length - 300)), ident.sign)
    return wire, split_wire(wire, 16 * 1024)


PARAM_COUNT = 12_000  # about 52 KB per message: four chunks of at most 15 872 bytes


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_flooding_senders_never_crowd_out_the_members(data: st.DataObject) -> None:
    """h hostile senders send chunks of messages of any size in any order, interleaved with
    one message from each of the g - 1 = 2 other members. Memory stays within the limits, and
    every member's message completes when it fits the fair share T / n (n = h + 2 senders);
    with h = FLOOD_SENDERS that share is a whole model-sized message."""
    limits = ReassemblyLimits.for_sessions(PARAM_COUNT, 3)
    r = ChunkReassembler(limits)
    flooders = [f"x{i}" for i in range(data.draw(st.integers(FLOOD_SENDERS, 6), label="h"))]
    share = min(limits.max_sender_bytes, limits.max_buffered_bytes // (len(flooders) + 2))
    honest = {name: honest_chunks(name, data.draw(st.integers(17_000, share),
                                                  label=f"{name} length"))
              for name in ("p1", "p2")}
    events = [(name, c) for name, (_w, chunks) in honest.items() for c in chunks]
    # a flooder's message d has a fixed length (consistent chunks that are held), except the
    # last kind, which no sender may hold whole
    lengths = [16_000 + d * (limits.max_sender_bytes - 16_000) // 4 for d in range(5)]
    lengths.append(MAX_PAYLOAD_BYTES)
    flood = data.draw(st.lists(st.tuples(
        st.sampled_from(flooders), st.integers(0, 5), st.integers(0, 7),
        st.integers(8_000, 15_872)), min_size=20, max_size=200), label="flood")
    for sender, digest, index, size in flood:
        chunk = m.Chunk(bytes([digest]) * 32, index, 529, lengths[digest], os.urandom(size))
        events.insert(data.draw(st.integers(0, len(events))), (sender, chunk))
    done = {}
    for sender, chunk in events:
        try:
            wire = r.add(sender, "t", SESSION, chunk, 0.0)
        except ChunkError as exc:
            assert sender in flooders, (sender, exc)
            continue
        if wire is not None:
            done[sender] = wire
        assert r.buffered_bytes <= limits.max_buffered_bytes
        assert all(r.held_by(s)[1] <= limits.max_sender_bytes for s in flooders)
    assert done == {name: wire for name, (wire, _c) in honest.items()}


def test_more_flooders_than_planned_get_only_their_fair_share() -> None:
    """Ten flooding senders: each holds at most what the others do, and a member whose
    message fits T / n (n the senders holding chunks) still completes it."""
    limits = ReassemblyLimits(max_buffered_bytes=12 * 16_000, max_sender_bytes=4 * 16_000)
    r = ChunkReassembler(limits)
    refused = 0
    for round_ in range(4):
        for n in range(10):
            chunk = m.Chunk(bytes([n, round_]) * 16, round_, 529, 64_000, b"x" * 16_000)
            try:
                r.add(f"x{n}", "t", SESSION, chunk, float(round_))
            except ChunkError as exc:  # that flooder would hold more than any other one
                refused += exc.drop_reason == "chunk_overflow"
    assert refused >= 20 and r.buffered_bytes <= limits.max_buffered_bytes
    shares = sorted(r.held_by(f"x{n}")[1] for n in range(10))
    assert shares[-1] - shares[0] <= 16_000  # max-min fair: within one chunk of each other
    wire, chunks = honest_chunks("p1", 17_000)  # two chunks, within 12 x 16 000 / 11
    assert [r.add("p1", "t", SESSION, c, 5.0) for c in chunks][-1] == wire
    assert r.take_evicted() >= 1
