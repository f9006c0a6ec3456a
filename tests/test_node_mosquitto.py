"""Murmur peers (peer/network/node.py) over a real Mosquitto broker on a loopback port.

Scenarios of issue 4: peers complete sessions and agree on the group sum; a member killed
(SIGKILL, separate process) after its shares are out; the broker stopped and restarted; a raw
MQTT client sending garbage, replays, forged senders and foreign certificates; a subscriber on
``#`` proving no payload carries a member's vector. Peers train the MLP on the digits data set
with tiny local rounds (the real LocalTrainer, DP-SGD included), except in the residual-fill
test, whose hand-written ResidualTrainer says why it stands in for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import numpy as np
import pytest

from crypto.admission import AdmissionKey
from crypto.field import FixedPoint
from crypto.identity import Identity
from peer.assembly import build_peer
from peer.network.node import NodeConfig, Peer, PeerEvent
from peer.network.session.shamir import SessionTimeouts
from peer.network.transport import BrokerSettings
from peer.sharing import DeltaSharing
from protocol import messages as m
from protocol.codec import decode_message, encode_message
from protocol.topics import announce_topic, direct_topic
from sim.idle_peer import write_identity
from tests.conftest import wait_until
from tests.dying_peer import spawn_dying_peer

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(120)]

NET = "nodetest"
ROOT = Path(__file__).resolve().parent.parent
RESOLUTION = 2.0**-16
FAST_STEPS = 2  # local steps per round of make_trainer's peers

FAST = NodeConfig(
    group_size=3,
    threshold=2,
    timeouts=SessionTimeouts(invite_s=1.0, start_s=2.0, share_s=2.0, partial_s=2.0),
    announce_interval_s=2.0,
    silence_expiry_s=20.0,
    checkpoint_interval_s=3600.0,
    start_jitter_s=0.2,
    tick_s=0.02,
    round_pause_s=0.5,
    evaluate_every=4,
    cooldown_s=0.0,
)


# ---------------------------------------------------------------------------- trainers
@pytest.fixture
def make_trainer(digits_source, one_torch_thread) -> Callable[[int, int], object]:
    """make(index, n): a real LocalTrainer, MLP on a 1/n shard of digits, DP-SGD, top-10 %,
    tiny rounds. Many peers in one process: one intra-op torch thread (tests/conftest.py)."""
    return shard_trainer_factory(digits_source, topk_fraction=0.1)


def shard_trainer_factory(digits_source, *, topk_fraction: float
                          ) -> Callable[[int, int], object]:
    """make(index, n) for a 1/n shard of digits: MLP, DP-SGD, tiny rounds, top-k as given."""
    from peer.training.data import split_holdout
    from peer.training.trainer import LocalTrainer, TrainerConfig

    train, _test = digits_source

    def make(index: int, n: int) -> LocalTrainer:
        shard = train.subset(np.arange(index, len(train.y), n))
        local, holdout = split_holdout(shard, 0.2, index)
        config = TrainerConfig(
            model="mlp", lr=0.1, batch_size=32, local_steps=FAST_STEPS, dp=True,
            noise_multiplier=1.0, delta=1e-5, max_grad_norm=1.0, budget_epsilon=1e6,
            topk_fraction=topk_fraction, seed=7, share="delta",
        )
        return LocalTrainer(config, local, holdout, None)

    return make


# ---------------------------------------------------------------------------- harness
@dataclass
class Network:
    url: str
    admission: AdmissionKey
    peers: list[Peer] = field(default_factory=list)
    events: list[PeerEvent] = field(default_factory=list)
    stops: list[asyncio.Event] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def add(self, peer_id: str, trainer: object, config: NodeConfig = FAST,
            totals_path: Path | None = None) -> Peer:
        ident = Identity.generate(peer_id)
        cert = self.admission.issue(ident.public, valid_for_s=3600, now=time.time())
        peer = build_peer(identity=ident, certificate=cert,
                          admission_public_key=self.admission.public_key, network_id=NET,
                          trainer=trainer, broker=BrokerSettings(url=self.url), node=config,
                          on_event=self.events.append, totals_path=totals_path)
        self.peers.append(peer)
        stop = asyncio.Event()
        self.stops.append(stop)
        self.tasks.append(asyncio.create_task(peer.run(stop)))
        return peer

    async def wait_for_more_sessions(self, timeout_s: float, when: str) -> None:
        """Wait until every peer has completed one more session than it has now."""
        done_before = [p.counters.sessions_done for p in self.peers]
        await wait_until(
            lambda: all(p.counters.sessions_done > b
                        for p, b in zip(self.peers, done_before, strict=True)),
            timeout_s, f"peers to keep completing sessions {when}",
        )

    async def close(self) -> None:
        for stop in self.stops:
            stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), timeout=30)

    def done_events(self) -> dict[bytes, list[PeerEvent]]:
        out: dict[bytes, list[PeerEvent]] = {}
        for e in self.events:
            if e.kind == "session_done":
                out.setdefault(e.data["session_id"], []).append(e)
        return out


async def start_network(url: str, n: int, make: Callable[[int, int], object],
                        config: NodeConfig = FAST) -> Network:
    net = Network(url, AdmissionKey.generate(NET))
    for i in range(n):
        net.add(f"peer{i}", make(i, n), config)
    await wait_until(lambda: all(p.status().peers_live == n - 1 for p in net.peers), 20,
                     "every peer to see the others")
    return net


class Sniffer:
    """A plain MQTT client subscribed to '#' recording every (topic, payload)."""

    def __init__(self, url: str) -> None:
        host, port, _ = BrokerSettings(url=url).endpoint()
        self.client = aiomqtt.Client(host, port, identifier="sniffer",
                                     protocol=aiomqtt.ProtocolVersion.V311)
        self.records: list[tuple[str, bytes]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Sniffer:
        await self.client.__aenter__()
        await self.client.subscribe("#", qos=1)
        self._task = asyncio.create_task(self._collect())
        return self

    async def _collect(self) -> None:
        async for msg in self.client.messages:
            payload = msg.payload if isinstance(msg.payload, bytes) else b""
            self.records.append((str(msg.topic), payload))

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.client.__aexit__(None, None, None)


def check_group_sums(net: Network, min_complete: int) -> int:
    """Every member of a session rebuilt the same sum, equal to the plain sum of the members'
    noised top-k vectors (to fixed-point resolution). Returns the number of sessions checked."""
    checked = 0
    for sid, events in net.done_events().items():
        members = events[0].data["members"]
        by_peer = {e.peer_id: e for e in events}
        first = events[0].data
        for e in events[1:]:
            np.testing.assert_array_equal(e.data["coordinates"], first["coordinates"])
            np.testing.assert_array_equal(e.data["group_sum"], first["group_sum"])
        if set(by_peer) != set(members):
            continue  # a member did not finish (tolerated); the others agree, checked above
        coords = first["coordinates"]
        plain = np.zeros(coords.size)
        for peer_id in members:
            data = by_peer[peer_id].data
            pos = np.searchsorted(coords, data["own_indices"])
            np.testing.assert_array_equal(coords[pos], data["own_indices"])
            plain[pos] += data["own_values"].astype(np.float64)
            # values shared from the residual outside the top-k set (when the trainer can)
            plain[np.searchsorted(coords, data["filled_indices"])] += data["filled_values"]
        np.testing.assert_allclose(first["group_sum"], plain,
                                   atol=len(members) * RESOLUTION, rtol=0, err_msg=sid.hex())
        checked += 1
    assert checked >= min_complete, f"only {checked} fully completed sessions"
    return checked


def assert_no_vector_on_the_wire(net: Network, records: list[tuple[str, bytes]]) -> None:
    """No payload contains any member's vector, raw float32 or fixed-point encoded."""
    fp = FixedPoint()
    needles: list[bytes] = []
    for events in net.done_events().values():
        for e in events:
            values = e.data["own_values"]
            nonzero = values[values != 0]
            if nonzero.size >= 4:
                needles.append(nonzero[:4].astype("<f4").tobytes())
                needles.append(fp.encode(nonzero[:4].astype(np.float64)).astype("<u4").tobytes())
    assert needles, "no vectors to look for"
    assert records, "the sniffer saw nothing"
    decoded = 0
    for topic, payload in records:
        for needle in needles:
            assert needle not in payload, f"a member's vector bytes on {topic}"
        if not payload:
            continue  # a cleared retained announcement
        msg = decode_message(payload)
        decoded += 1
        body = msg.body
        # only index sets, ids and ciphertext travel; no body holds model values in the clear
        assert isinstance(body, m.Announce | m.Leave | m.Invite | m.Accept | m.Decline
                          | m.Start | m.Share | m.Partial | m.Abort)
    assert decoded > 0


# ---------------------------------------------------------------------------- scenarios
async def test_five_peers_complete_sessions_and_agree(mosquitto, make_trainer) -> None:
    async with Sniffer(mosquitto.url) as sniffer:
        net = await start_network(mosquitto.url, 5, make_trainer)
        try:
            await wait_until(lambda: all(p.counters.sessions_done >= 2 for p in net.peers), 60,
                             "two sessions per peer")
            running = [p.status() for p in net.peers]
        finally:
            await net.close()
        # Each peer's last publish on the way out is its signed, retained LEAVE.
        def left(peer_id: str) -> bool:
            return any(t == announce_topic(NET, peer_id) and p
                       and decode_message(p).header.kind is m.Kind.LEAVE
                       for t, p in sniffer.records)

        await wait_until(lambda: all(left(p.peer_id) for p in net.peers), 10,
                         "the sniffer to see every peer's signed leave")
    check_group_sums(net, min_complete=3)
    for st in running:
        assert st.merges_applied >= 1 or st.merges_rejected, st
        assert st.round >= 1 and st.epsilon is not None
        assert st.peers_live == 4
        # an honest run drops nothing: no attack, no bug
        assert st.drops == {}, st.drops
    for p in net.peers:
        assert not p.status().in_session  # every session settled on the way out
    assert_no_vector_on_the_wire(net, sniffer.records)


async def test_broker_restart_mid_run(mosquitto, make_trainer) -> None:
    net = await start_network(mosquitto.url, 4, make_trainer)
    try:
        await wait_until(lambda: sum(p.counters.sessions_done for p in net.peers) >= 3, 40,
                         "sessions before the restart")
        await mosquitto.stop()
        await wait_until(lambda: not any(p.transport.connected.is_set() for p in net.peers), 10,
                         "peers to notice the broker is gone")
        steps_offline = [p.trainer.ledger.steps for p in net.peers]
        failures = [p.transport.connect_failures for p in net.peers]
        await wait_until(lambda: all(p.transport.connect_failures >= f + 4
                                     for p, f in zip(net.peers, failures, strict=True)), 30,
                         "four failed reconnects each")
        # Cut off, a peer spends no budget: at most the round already in flight finishes.
        for p, steps in zip(net.peers, steps_offline, strict=True):
            assert p.trainer.ledger.steps <= steps + FAST_STEPS, (p.peer_id, steps)
            assert p.status().state == "offline"
        before = [p.counters.sessions_done for p in net.peers]
        await mosquitto.start()
        await wait_until(lambda: all(p.transport.connected.is_set() for p in net.peers), 30,
                         "every peer to reconnect")
        await wait_until(
            lambda: all(p.counters.sessions_done > b
                        for p, b in zip(net.peers, before, strict=True)),
            60, "every peer to complete a session after the restart",
        )
        assert all(p.transport.reconnects >= 1 for p in net.peers)
    finally:
        await net.close()
    check_group_sums(net, min_complete=1)


async def test_member_killed_after_its_shares_are_out(mosquitto, make_trainer,
                                                      tmp_path: Path) -> None:
    net = await start_network(mosquitto.url, 4, make_trainer)
    victim_id = "victim"
    key_file, cert_file = write_identity(net.admission, victim_id, tmp_path)
    trainer = net.peers[0].trainer
    proc = spawn_dying_peer(
        mosquitto.url, NET, key_file, cert_file, net.admission.public_key.hex(),
        trainer.model_id, trainer.param_count, "--die-before", "PARTIAL", "--auto-start",
        "--coords", str(max(4, trainer.param_count // 10)), "--scale", "0.01")
    try:
        await wait_until(lambda: proc.poll() is not None, 60,
                         "the victim to join a session and be killed")
        out, err = proc.communicate(timeout=5)
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
        assert b"KILLED" in out
        # Every survivor that was in the victim's session finishes it: done with >= t
        # partials, or aborted by timeout, within the share and partial timeouts. Nobody hangs.
        def ended_with_victim() -> set[bytes]:
            return {
                e.data["session_id"] for e in net.events
                if e.kind in ("session_done", "session_aborted")
                and victim_id in (e.data.get("members") or ())
            }

        await wait_until(
            lambda: bool(ended_with_victim()) and not any(
                p.session is not None and victim_id in p.session.members for p in net.peers),
            FAST.timeouts.share_s + FAST.timeouts.partial_s + 0.5,
            "every survivor to finish its session with the victim",
        )
        victim_sessions = ended_with_victim()
        assert victim_sessions, "no survivor recorded a session with the victim"
        assert not any(p.session is not None and p.session.session_id in victim_sessions
                       for p in net.peers)
        done_with_victim = [e for e in net.events if e.kind == "session_done"
                            and e.data["session_id"] in victim_sessions]
        for e in done_with_victim:
            assert victim_id in e.data["contributors"]  # its shares were out: it counts
        before = [p.counters.sessions_done for p in net.peers]
        await wait_until(
            lambda: all(p.counters.sessions_done > b
                        for p, b in zip(net.peers, before, strict=True)),
            60, "survivors to keep completing sessions",
        )
        await wait_until(lambda: all(p.membership.get(victim_id) is None for p in net.peers), 10,
                         "the victim's last will to remove it from every view")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await net.close()
    check_group_sums(net, min_complete=1)


async def test_hostile_client_is_dropped_and_counted(mosquitto, make_trainer) -> None:
    async with Sniffer(mosquitto.url) as sniffer:
        net = await start_network(mosquitto.url, 3, make_trainer)
        target = net.peers[1]
        try:
            await wait_until(lambda: sum(p.counters.sessions_done for p in net.peers) >= 3, 40,
                             "sessions before the attack")
            captured = next(
                (t, p) for t, p in sniffer.records
                if t.endswith(f"/to/{target.peer_id}") and p
            )
            sender = net.peers[0].peer_id
            mallory = Identity.generate("mallory")
            foreign = AdmissionKey.generate("othernet")
            rogue_ca = AdmissionKey.generate(NET)  # right network name, wrong admission key
            now = time.time()

            def signed(ident: Identity, kind: m.Kind, body: m.Body, network: str = NET,
                       header_sender: str | None = None) -> bytes:
                header = m.Header(m.PROTOCOL_VERSION, network, kind,
                                  header_sender or ident.peer_id,
                                  b"" if kind is m.Kind.ANNOUNCE else os.urandom(16),
                                  time.time_ns() // 1000)
                return encode_message(header, body, ident.sign)

            invite = m.Invite(3, 2, target.params.model_id, target.params.param_count, 16)
            host, port, _ = BrokerSettings(url=mosquitto.url).endpoint()
            attacks = [
                # garbage bytes on a valid inbox topic
                (direct_topic(NET, sender, target.peer_id), b"\x93\x01garbage\xff"),
                # a captured message, published again
                captured,
                # mallory signs an invite but claims to be peer0 (topic and header say peer0)
                (direct_topic(NET, sender, target.peer_id),
                 signed(mallory, m.Kind.INVITE, invite, header_sender=sender)),
                # header names another sender than the topic
                (direct_topic(NET, sender, target.peer_id),
                 signed(mallory, m.Kind.INVITE, invite)),
                # a validly signed message from a peer nobody admitted
                (direct_topic(NET, "mallory", target.peer_id),
                 signed(mallory, m.Kind.INVITE, invite)),
                # a certificate from another network's admission key
                (announce_topic(NET, "mallory"),
                 signed(mallory, m.Kind.ANNOUNCE, m.Announce(
                     foreign.issue(mallory.public, valid_for_s=3600, now=now).to_bytes(),
                     target.params.model_id, target.params.param_count, os.urandom(16)))),
                # a certificate for this network name signed by a rogue key
                (announce_topic(NET, "mallory"),
                 signed(mallory, m.Kind.ANNOUNCE, m.Announce(
                     rogue_ca.issue(mallory.public, valid_for_s=3600, now=now).to_bytes(),
                     target.params.model_id, target.params.param_count, os.urandom(16)))),
                # a message of another network on this network's topic
                (direct_topic(NET, "mallory", target.peer_id),
                 signed(mallory, m.Kind.INVITE, invite, network="othernet")),
            ]
            # A last garbage message after the attacks: one client's publishes reach the target
            # in order and it handles them one at a time, so once this marker is counted every
            # attack has been handled (and counted) - a double count would show by then.
            marker = (direct_topic(NET, sender, target.peer_id), b"\x93\x01marker\xff")
            before = target.status().drops
            async with aiomqtt.Client(host, port, identifier="mallory",
                                      protocol=aiomqtt.ProtocolVersion.V311) as client:
                for topic, payload in [*attacks, marker]:
                    await client.publish(topic, payload, qos=1)
            # foreign_network twice: the foreign certificate and the foreign header network
            expected = {"malformed": 1, "replay": 1, "bad_signature": 1, "topic_mismatch": 1,
                        "unknown_sender": 1, "bad_certificate": 1, "foreign_network": 2}
            with_marker = {**expected, "malformed": expected["malformed"] + 1}

            def counted() -> bool:
                drops = target.status().drops
                return all(drops.get(k, 0) - before.get(k, 0) >= v
                           for k, v in with_marker.items())

            await wait_until(counted, 10, f"drops {expected} and the marker at the target")
            after = target.status().drops
            for reason, count in with_marker.items():  # each attack counted once, no more
                assert after.get(reason, 0) - before.get(reason, 0) == count, (reason, after)
            assert all(p.membership.get("mallory") is None for p in net.peers)
            await net.wait_for_more_sessions(40, "after the attack")
        finally:
            await net.close()


class RecordingSharing(DeltaSharing):
    """The real delta strategy, remembering every settlement the node makes."""

    def __init__(self, param_count: int) -> None:
        super().__init__(0.1, param_count)
        self.settled: list[tuple[np.ndarray, np.ndarray]] = []

    def settle(self, indices: np.ndarray, values: np.ndarray) -> None:
        self.settled.append((indices.copy(), values.copy()))
        super().settle(indices, values)


class ResidualTrainer:
    """A vector-only trainer whose sharing strategy holds an error-feedback residual
    (the node's residual fill, docs/sessions.md "Sparse supports").

    It stands for :class:`peer.training.trainer.LocalTrainer` on the node's side of the
    interface only: ``train_round`` returns a 40-of-400 sparse update, the real delta sharing
    strategy fills and settles a residual that is non-zero on every coordinate (so every
    session exercises the fill), and nothing is trained. The tests that use it check the
    session protocol itself, so they need what a real trainer cannot give them: vectors known
    in advance (a killed victim process redraws its update from a seed, the masked exact-sum
    and confidentiality tests compare against the plain sum or the tapped secrets), sessions
    started by hand on updates offered by the test, and many peers in one process (the
    partial-view tests run 20) at 20 ms per round. A LocalTrainer's update
    carries DP noise from the kernel CSPRNG, which no seed reproduces, and costs a torch
    model and DP-SGD steps per peer per round on a shared 2-core machine.

    The real trainer runs end to end over Mosquitto in the tests built on ``make_trainer``
    or ``shard_trainer_factory``: for Shamir sessions
    ``test_five_peers_complete_sessions_and_agree``, ``test_broker_restart_mid_run``,
    ``test_member_killed_after_its_shares_are_out`` and
    ``test_hostile_client_is_dropped_and_counted`` here; for masked sessions
    ``test_five_masked_peers_agree_and_send_one_vector_each`` (tests/test_masked_mosquitto.py);
    for both kinds, sharing the whole model in CHUNKs,
    tests/test_chunks_mosquitto.py; and the provisioned TLS peers of
    tests/test_secured_broker.py, the bridged brokers of tests/test_bridge_mosquitto.py and
    the budget tests of tests/test_budget_mosquitto.py.
    """

    def __init__(self, index: int, n: int) -> None:
        self.param_count = 400
        self.model_id = "vectors-400"
        self.rng = np.random.default_rng(100 + index)
        self.sharing = RecordingSharing(self.param_count)
        self.sharing.restore(self.rng.normal(0, 0.01, self.param_count).astype(np.float32))
        self.round = 0

    def train_round(self):
        from peer.training.trainer import LocalUpdate

        time.sleep(0.02)
        self.round += 1
        idx = np.sort(self.rng.choice(self.param_count, 40, replace=False)).astype(np.uint32)
        residual = self.sharing.state
        residual[idx] = 0.0  # the top-k part leaves through the update
        self.sharing.restore(residual)
        values = self.rng.normal(0, 0.05, idx.size).astype(np.float32)
        return LocalUpdate(indices=idx, values=values, steps=1, epsilon=0.0, round=self.round)

    def apply_update(self, indices: np.ndarray, values: np.ndarray) -> None:
        return None

    def evaluate(self) -> float:
        return 0.0

    def save_checkpoint(self) -> None:
        return None


async def test_residual_fill_is_shared_and_settled(mosquitto) -> None:
    net = await start_network(mosquitto.url, 3, ResidualTrainer)
    try:
        await wait_until(lambda: all(p.counters.sessions_done >= 2 for p in net.peers), 30,
                         "two sessions per peer")
        # Settlement runs in a task after the merge: wait until it caught up with every fill.
        def fills(peer: Peer) -> int:
            return sum(1 for e in net.events if e.kind == "session_done"
                       and e.peer_id == peer.peer_id and e.data["filled_indices"].size)

        await wait_until(lambda: all(len(p.trainer.sharing.settled) == fills(p)
                                     for p in net.peers), 10, "every residual fill to be settled")
    finally:
        await net.close()
    check_group_sums(net, min_complete=2)
    for p in net.peers:
        done = [e for e in net.events if e.kind == "session_done" and e.peer_id == p.peer_id]
        filled = [e.data["filled_indices"] for e in done if e.data["filled_indices"].size]
        assert filled, "no session used the residual fill"
        settled = p.trainer.sharing.settled
        assert len(settled) == len(filled)
        for (idx, _values), expected in zip(settled, filled, strict=True):
            np.testing.assert_array_equal(idx, expected)


async def test_invitation_nobody_joins_is_logged_as_not_formed(mosquitto, caplog) -> None:
    """Invitees without an update decline, so the invitation never fixes its members: it is
    counted and logged as not formed ("aborted" is for formed sessions, as on the status
    line), and its session_aborted event says formed False."""
    config = dataclasses.replace(FAST, train=False, auto_start=False)
    net = await start_network(mosquitto.url, 3, ResidualTrainer, config)
    caplog.set_level(logging.INFO, logger="peer.network.session.seat")
    initiator = net.peers[0]
    try:
        initiator.offer_update(np.arange(40, dtype=np.uint32), np.full(40, 0.01, np.float32))
        assert initiator.try_start_session()
        assert initiator.session is not None
        sid = initiator.session.session_id
        await wait_until(lambda: initiator.session is None, 10, "the invitation to end")
    finally:
        await net.close()
    assert (initiator.counters.sessions_not_formed, initiator.counters.sessions_aborted) == (1, 0)
    lines = [r.getMessage() for r in caplog.records if sid.hex()[:8] in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{initiator.peer_id}: invitation {sid.hex()[:8]} not formed: ")
    ends = [e for e in net.events if e.kind == "session_aborted" and e.data["session_id"] == sid]
    assert [(e.peer_id, e.data["formed"]) for e in ends] == [(initiator.peer_id, False)]
