"""A bounded membership view over a real Mosquitto (issue 14, docs/design/partial-view.md).

Twenty vector-only peers with ``view_size`` 2 each follow a few announcement buckets instead
of every announcement: their views stay small, sessions complete and members agree on the
group sum, senders outside a view are looked up (nothing dropped as ``unknown_sender``), and a
short ``rotate_s`` swaps followed buckets while sessions go on. A raw client publishing as
strangers makes a peer look up at most a bounded number of ids, each message a counted drop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time

import aiomqtt
import pytest

from crypto.admission import AdmissionKey
from crypto.identity import Identity
from peer.network.node import NodeConfig, Peer
from peer.network.transport import BrokerSettings
from peer.network.view.lookup import DEFAULT_MAX_IN_FLIGHT
from peer.network.view.partial import ViewConfig
from protocol import messages as m
from protocol.codec import encode_message
from protocol.topics import direct_topic
from tests.conftest import wait_until
from tests.test_node_mosquitto import FAST, NET, Network, ResidualTrainer, check_group_sums

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(120)]

N_PEERS = 20
VIEW = ViewConfig(view_size=2, settle_s=0.3, rotate_s=3.0, lookup_s=2.0, lookup_held=16)
SMALL_VIEW = dataclasses.replace(FAST, tick_s=0.05, view=VIEW)
# A peer following buckets holds its buckets' peers (about view_size, one bucket more at
# most), the participants of its session in flight and peers looked up in the last lookup_s:
# a bound that grows with session activity, not with the network. In this busy network
# (every peer in a session all the time, 19 others) the peak is set by the lookups, the
# average by the buckets.
VIEW_BOUND = 15
MEAN_VIEW_BOUND = 8.0


async def test_small_views_stay_bounded_rotate_and_sessions_agree(mosquitto) -> None:
    net = Network(mosquitto.url, AdmissionKey.generate(NET))
    for i in range(N_PEERS):
        net.add(f"peer{i}", ResidualTrainer(i, N_PEERS), SMALL_VIEW)
    sizes: dict[str, list[int]] = {p.peer_id: [] for p in net.peers}
    ever_followed: dict[str, set[int]] = {p.peer_id: set() for p in net.peers}

    def sample() -> None:
        for p in net.peers:
            if p.view.followed_buckets > 0:
                sizes[p.peer_id].append(len(p.membership))
                ever_followed[p.peer_id].update(p.view.following.buckets)

    async def sampler() -> None:
        while True:
            sample()
            await asyncio.sleep(0.1)

    sampling = asyncio.create_task(sampler())
    try:
        await wait_until(lambda: all(p.counters.sessions_done >= 1 for p in net.peers), 40,
                         "a session per peer")
        # P(a peer of 20 decides the network is small at view_size 2) is about 2 %, but more do
        # on a loaded machine, where announcements arrive late (15 of 20 seen once in CI):
        # wait for the views with a deadline and require most of them, not all but four.
        await wait_until(lambda: sum(p.view.followed_buckets > 0 for p in net.peers)
                         >= N_PEERS - 6, 20, "bounded views")
        partial = [p for p in net.peers if p.view.followed_buckets > 0]
        assert len(partial) >= N_PEERS - 6, [p.view.followed_buckets for p in net.peers]
        followed_before = {p.peer_id: set(p.view.following.buckets) for p in partial}
        rotations_before = {p.peer_id: p.view.rotations for p in partial}

        def rotated() -> list[Peer]:
            return [p for p in partial if p.view.rotations > rotations_before[p.peer_id]]

        # (a peer may still decide, after a rotation, that the network is small: it then
        # follows every bucket and rotates no more)
        await wait_until(lambda: len(rotated()) >= len(partial) - 2, 20, "rotations")
        await net.wait_for_more_sessions(30, "after the rotations")
        statuses = [p.status() for p in net.peers]
    finally:
        sampling.cancel()
        await net.close()
    for p in partial:
        seen = sizes[p.peer_id]
        assert seen and max(seen) <= VIEW_BOUND, (p.peer_id, max(seen))
        assert sum(seen) / len(seen) <= MEAN_VIEW_BOUND, (p.peer_id, sum(seen) / len(seen))
    for p in rotated():
        # A rotation follows a bucket the peer did not follow before it (later rotations and
        # trims may come back to the same set, so compare what it ever followed).
        assert ever_followed[p.peer_id] - followed_before[p.peer_id], p.peer_id
    check_group_sums(net, min_complete=N_PEERS // 2)
    assert sum(st.lookups for st in statuses) > 0
    for st in statuses:
        assert st.view_buckets != 0  # -1 (every bucket) or the buckets followed
        # an honest run: every sender outside a view was looked up, none dropped
        assert "unknown_sender" not in st.drops, (st.peer_id, st.drops)
        assert "stale_announce" not in st.drops, (st.peer_id, st.drops)


async def test_strangers_cause_bounded_lookups_and_counted_drops(mosquitto) -> None:
    config = dataclasses.replace(SMALL_VIEW, view=dataclasses.replace(VIEW, lookup_s=1.0))
    net = Network(mosquitto.url, AdmissionKey.generate(NET))
    target = net.add("target", ResidualTrainer(0, 1), config)
    try:
        await wait_until(lambda: target.transport.connected.is_set(), 10, "the target online")
        invite = m.Invite(3, 2, target.params.model_id, target.params.param_count, 16)
        strangers = [Identity.generate(f"stranger{i}") for i in range(2 * DEFAULT_MAX_IN_FLIGHT)]

        def signed(ident: Identity, header_sender: str | None = None) -> bytes:
            header = m.Header(m.PROTOCOL_VERSION, NET, m.Kind.INVITE,
                              header_sender or ident.peer_id, os.urandom(16),
                              time.time_ns() // 1000)
            return encode_message(header, invite, ident.sign)

        # two messages from each stranger (valid binding), and a header that lies about the
        # topic's sender (not looked up: its binding is wrong)
        attacks = [(direct_topic(NET, s.peer_id, "target"), signed(s))
                   for s in strangers for _ in range(2)]
        liar = (direct_topic(NET, "stranger0", "target"), signed(strangers[1]))
        host, port, _ = BrokerSettings(url=mosquitto.url).endpoint()
        async with aiomqtt.Client(host, port, identifier="strangers",
                                  protocol=aiomqtt.ProtocolVersion.V311) as client:
            for topic, payload in [*attacks, liar]:
                await client.publish(topic, payload, qos=1)
        await wait_until(lambda: target.status().drops.get("unknown_sender", 0) == len(attacks),
                         10, "every stranger's message dropped after its lookup")
        status = target.status()
        assert status.drops.get("topic_mismatch") == 1
        # each stranger looked up at most once in the burst (at most DEFAULT_MAX_IN_FLIGHT at
        # a time, tests/test_lookup.py); the liar never
        assert 0 < status.lookups <= len(strangers)
        assert target.view.lookups.held == 0 and target.view.lookups.in_flight == []
        assert all(s.peer_id not in target.membership for s in strangers)
    finally:
        await net.close()


def test_view_size_zero_is_the_full_view() -> None:
    assert NodeConfig().view.view_size == 0
