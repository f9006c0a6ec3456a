"""Masked sessions in the node (``session_kind = "masked"``) over a real Mosquitto broker.

Issue 13, step 4: peers run peer/network/session/masked.py through the node: session topics
subscribed before the first message, every inbound message through the inbound checks,
merging and events as with the Shamir session. Scenarios: five training peers complete
sessions and agree on the plain sum; a sniffer on ``#`` sees no member's vector and exactly
one vector-sized payload per member per session; groups of 3, 5 and 8 rebuild the exact sum
while no sealed payload opens under any key the broker can derive; a member killed (SIGKILL,
separate process) right before or right after publishing its MASKED is tolerated when the
CONFIRM quorum survives and aborts the session cleanly (nothing revealed) otherwise; Shamir
and masked peers never group.
The harness is tests/test_node_mosquitto.py's.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import time
from pathlib import Path

import nacl.exceptions
import nacl.hash
import nacl.secret
import numpy as np
import pytest
from nacl.encoding import RawEncoder

from crypto.field import FixedPoint
from peer.network.node import NodeConfig
from peer.network.session import masked_messages as mm
from peer.network.session.kinds import MASKED_MODEL_SUFFIX
from protocol import messages as m
from protocol.codec import decode_message
from protocol.topics import parse_topic
from sim.idle_peer import write_identity
from tests.conftest import wait_until
from tests.dying_peer import spawn_dying_peer, victim_update
from tests.test_node_mosquitto import (  # noqa: F401  (make_trainer is a fixture)
    FAST,
    NET,
    RESOLUTION,
    ROOT,
    Network,
    ResidualTrainer,
    Sniffer,
    check_group_sums,
    make_trainer,
    start_network,
)

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(120)]

MASKED = dataclasses.replace(FAST, session_kind="masked")
#: Bodies that may travel in a masked network: no SHARE, PARTIAL or Shamir ACCEPT/START.
MASKED_NETWORK_BODIES = (m.Announce, m.Leave, m.Invite, m.Decline, m.Abort, m.MaskedAccept,
                         m.MaskedStart, m.Keys, m.Masked, m.Survivors, m.Confirm, m.Reveal)


def decoded(records: list[tuple[str, bytes]]) -> list[tuple[str, m.SignedMessage]]:
    """Every non-empty payload the sniffer saw, decoded (each must decode)."""
    return [(topic, decode_message(payload)) for topic, payload in records if payload]


def session_messages(records: list[tuple[str, bytes]], sid: bytes) -> list[m.SignedMessage]:
    return [msg for _t, msg in decoded(records) if msg.header.session == sid]


def vector_bytes(coordinates: int) -> int:
    """Sealed size of one masked vector: the coordinates and the count slot as field
    elements, the context digest, the nonce and the Poly1305 tag."""
    return 4 * (coordinates + 1) + 32 + 24 + 16


# ---------------------------------------------------------------------------- scenarios
async def test_five_masked_peers_agree_and_send_one_vector_each(
        mosquitto, make_trainer) -> None:  # noqa: F811  (the imported fixture)
    async with Sniffer(mosquitto.url) as sniffer:
        net = await start_network(mosquitto.url, 5, make_trainer, MASKED)
        try:
            await wait_until(lambda: all(p.counters.sessions_done >= 2 for p in net.peers), 60,
                             "two masked sessions per peer")
            running = [p.status() for p in net.peers]
        finally:
            await net.close()
    assert all(p.params.model_id.endswith(MASKED_MODEL_SUFFIX) for p in net.peers)
    complete = check_group_sums(net, min_complete=3)
    for st in running:
        assert st.merges_applied >= 1 or st.merges_rejected, st
        assert st.drops == {}, st.drops  # an honest run drops nothing
    for p in net.peers:
        assert not p.status().in_session
    # Every contributor of every session is a member, and every member's event says so.
    for events in net.done_events().values():
        for e in events:
            assert e.data["contributors"] == tuple(e.data["members"])

    # The wire: only masked-session kinds, no member's values in the clear...
    messages = decoded(sniffer.records)
    for topic, msg in messages:
        assert isinstance(msg.body, MASKED_NETWORK_BODIES), (topic, type(msg.body).__name__)
        if isinstance(msg.body, m.Masked | m.Confirm | m.Reveal):
            assert parse_topic(NET, topic).kind == "session"
    fp = FixedPoint()
    needles = []
    for events in net.done_events().values():
        for e in events:
            values = e.data["own_values"]
            nonzero = values[values != 0][:4]
            assert nonzero.size == 4
            needles += [nonzero.astype("<f4").tobytes(),
                        fp.encode(nonzero.astype(np.float64)).astype("<u4").tobytes()]
    for topic, payload in sniffer.records:
        for needle in needles:
            assert needle not in payload, f"a member's vector bytes on {topic}"
    # ...and exactly one vector-sized payload per member per completed session: its MASKED
    # (START and ACCEPT carry index sets, as with the Shamir session).
    checked = 0
    for sid, events in net.done_events().items():
        members = events[0].data["members"]
        if {e.peer_id for e in events} != set(members):
            continue
        size = vector_bytes(events[0].data["coordinates"].size)
        in_session = session_messages(sniffer.records, sid)
        for member in members:
            sent = [msg for msg in in_session if msg.header.sender == member
                    and not isinstance(msg.body, m.MaskedStart | m.MaskedAccept)]
            big = [msg for msg in sent if len(msg.signed_bytes) >= size]
            assert [type(msg.body) for msg in big] == [m.Masked], (member, sid.hex())
            assert len(big[0].body.sealed) == size
        checked += 1
    assert checked == complete


def members_plain_sum(ends: list) -> np.ndarray:
    """The plain sum of what the members that logged ``ends`` contributed (own update plus
    residual fill), on the session's coordinates; every member must report the same sum."""
    first = ends[0].data
    coords = first["coordinates"]
    plain = np.zeros(coords.size)
    for e in ends:
        np.testing.assert_array_equal(e.data["group_sum"], first["group_sum"])
        plain[np.searchsorted(coords, e.data["own_indices"])] += e.data["own_values"]
        plain[np.searchsorted(coords, e.data["filled_indices"])] += e.data["filled_values"]
    return plain


def offer_updates_and_start(net: Network, seed: int) -> bytes:
    """Every peer offers a random 40-of-400 update; the first invites; the session id."""
    rng = np.random.default_rng(seed)
    for p in net.peers:
        idx = np.sort(rng.choice(400, 40, replace=False)).astype(np.uint32)
        p.offer_update(idx, rng.normal(0, 0.05, idx.size).astype(np.float32), 1)
    initiator = net.peers[0]
    assert initiator.try_start_session()
    assert initiator.session is not None
    return initiator.session.session_id


def session_ends(net: Network, sid: bytes) -> list:
    """The session_done / session_aborted events of session ``sid``."""
    return [e for e in net.events if e.data.get("session_id") == sid
            and e.kind in ("session_done", "session_aborted")]


VICTIM_SEED = 5


def victim_vector(param_count: int) -> tuple[np.ndarray, np.ndarray]:
    """The victim's update (tests/dying_peer.py draws it the same way)."""
    return victim_update(param_count, VICTIM_SEED, 40, 0.05)


def start_victim(net: Network, tmp_path: Path, config: NodeConfig,
                 when: str = "after") -> subprocess.Popen[bytes]:
    """A masked peer in its own process that SIGKILLs itself right ``when`` ("before" or
    "after") it publishes its MASKED."""
    key_file, cert_file = write_identity(net.admission, "victim", tmp_path)
    trainer = net.peers[0].trainer
    return spawn_dying_peer(
        net.url, NET, key_file, cert_file, net.admission.public_key.hex(), trainer.model_id,
        trainer.param_count, f"--die-{when}", "MASKED", "--session-kind", "masked",
        "--group", str(config.group_size), "--threshold", str(config.threshold),
        "--seed", str(VICTIM_SEED), "--coords", "40", "--scale", "0.05")


@pytest.mark.parametrize(("group_size", "threshold", "peers", "tolerated", "when"),
                         [(5, 3, 4, True, "after"), (5, 3, 4, True, "before"),
                          (3, 2, 2, False, "after")])
async def test_member_killed_around_its_masked(mosquitto, tmp_path: Path, group_size: int,
                                               threshold: int, peers: int, tolerated: bool,
                                               when: str) -> None:
    """g = 5, t = 3: four survivors reach the CONFIRM quorum of 4. Killed after its MASKED,
    the victim's vector is in the sum (its self seed rebuilt from their shares); killed before,
    it is not (its ephemeral key rebuilt, its pairwise masks removed). g = 3: the quorum is
    all three, so the survivors time out in CONFIRMING and abort having revealed nothing."""
    config = dataclasses.replace(MASKED, group_size=group_size, threshold=threshold,
                                 train=False, auto_start=False)
    assert (group_size - 1 >= mm.confirm_quorum(group_size, threshold)) is tolerated
    async with Sniffer(mosquitto.url) as sniffer:
        net = await start_network(mosquitto.url, peers, ResidualTrainer, config)
        proc = start_victim(net, tmp_path, config, when)
        try:
            await wait_until(lambda: all(p.status().peers_live == peers for p in net.peers), 20,
                             "every peer to see the victim")
            initiator = net.peers[0]
            sid = offer_updates_and_start(net, seed=1)
            await wait_until(lambda: proc.poll() is not None, 20,
                             "the victim to reach its MASKED and be killed")
            out, err = proc.communicate(timeout=5)
            assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
            assert b"KILLED" in out

            timeouts = initiator.session_kind.timeouts  # type: ignore[attr-defined]
            await wait_until(lambda: {e.peer_id for e in session_ends(net, sid)}
                             >= {p.peer_id for p in net.peers},
                             timeouts.masked_s + timeouts.confirm_s + timeouts.reveal_s,
                             "every survivor to end the session with the victim")
            await wait_until(lambda: all(p.membership.get("victim") is None for p in net.peers),
                             10, "the victim's last will to remove it from every view")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            await net.close()
    assert all(p.session is None for p in net.peers)
    ends = session_ends(net, sid)
    assert len(ends) == peers and all(e.data["members"][0] == initiator.peer_id for e in ends)
    assert all(len(e.data["members"]) == group_size and "victim" in e.data["members"]
               for e in ends)
    in_session = session_messages(sniffer.records, sid)
    sent_by_victim = {type(msg.body) for msg in in_session if msg.header.sender == "victim"}
    assert m.Keys in sent_by_victim and m.Confirm not in sent_by_victim
    assert (m.Masked in sent_by_victim) is (when == "after")
    if not tolerated:
        assert {e.kind for e in ends} == {"session_aborted"}
        assert all(e.data["formed"] for e in ends)
        # The initiator times out waiting for the victim's CONFIRM; the member does too, or
        # hears the initiator's ABORT first (both deadlines are about equal).
        reasons = {e.peer_id: e.data["reason"] for e in ends}
        assert reasons.pop(initiator.peer_id) == "timeout_confirming"
        assert set(reasons.values()) <= {"timeout_confirming", "aborted_by_initiator"}
        assert not any(isinstance(msg.body, m.Reveal) for msg in in_session)  # nothing revealed
        return
    assert {e.kind for e in ends} == {"session_done"}
    first = ends[0].data
    coords = first["coordinates"]
    plain = members_plain_sum(ends)
    if when == "before":
        assert set(first["contributors"]) == set(first["members"]) - {"victim"}
    else:
        assert set(first["contributors"]) == set(first["members"])  # the victim counts
        idx, values = victim_vector(400)
        plain[np.searchsorted(coords, idx)] += values  # no sharing strategy: no fill
    np.testing.assert_allclose(first["group_sum"], plain, atol=group_size * RESOLUTION, rtol=0)


def keys_the_broker_can_derive(in_session: list[m.SignedMessage],
                               records: list[tuple[str, bytes]], sid: bytes) -> list[bytes]:
    """Every 32-byte value a broker holds or can compute without a member's secret: the
    ephemeral public keys (clear in ACCEPT and START), the peers' certificates and signatures,
    the session id and digests of it, and the all-zero key."""
    found: list[bytes] = [bytes(32), nacl.hash.blake2b(sid, digest_size=32, encoder=RawEncoder)]
    for msg in in_session:
        body = msg.body
        if isinstance(body, m.MaskedAccept):
            found.append(body.ephemeral_public)
        if isinstance(body, m.MaskedStart):
            found.extend(body.ephemeral_publics)
    for _topic, payload in records:
        for start in range(0, len(payload) - 32, 32):  # every aligned 32-byte window
            found.append(payload[start:start + 32])
    return list(dict.fromkeys(found))


@pytest.mark.parametrize(("group_size", "threshold"), [(3, 2), (5, 3), (8, 5)])
async def test_every_member_rebuilds_the_exact_sum_and_the_broker_learns_nothing(
        mosquitto, group_size: int, threshold: int) -> None:
    """One masked session of g = 3, 5, 8 over Mosquitto: every member merges the same sum,
    equal to the plain sum of the members' contributions to the fixed-point resolution. A
    sniffer on '#' holds every payload; with every key it can derive from them no sealed
    payload opens, and no member's values nor the sum appear in any payload."""
    config = dataclasses.replace(MASKED, group_size=group_size, threshold=threshold,
                                 train=False, auto_start=False)
    async with Sniffer(mosquitto.url) as sniffer:
        net = await start_network(mosquitto.url, group_size, ResidualTrainer, config)
        try:
            sid = offer_updates_and_start(net, seed=group_size)
            await wait_until(lambda: len(session_ends(net, sid)) == group_size, 30,
                             "every member to end the session")

            def masked_seen() -> int:
                return sum(isinstance(msg.body, m.Masked)
                           for msg in session_messages(sniffer.records, sid))

            # The sniffer shares the event loop with g peers and may lag behind them.
            await wait_until(lambda: masked_seen() == group_size, 20,
                             "the sniffer to record every MASKED")
        finally:
            await net.close()
    done = session_ends(net, sid)
    assert {e.kind for e in done} == {"session_done"}, [e.data.get("reason") for e in done]
    first = done[0].data
    assert len(first["members"]) == group_size
    assert set(first["contributors"]) == set(first["members"])
    plain = members_plain_sum(done)
    np.testing.assert_allclose(first["group_sum"], plain, atol=group_size * RESOLUTION, rtol=0)

    in_session = session_messages(sniffer.records, sid)
    masked = [msg for msg in in_session if isinstance(msg.body, m.Masked)]
    assert sorted(msg.header.sender for msg in masked) == sorted(first["members"])
    sealed = [msg.body.sealed for msg in masked] + [
        msg.body.sealed for msg in in_session if isinstance(msg.body, m.Reveal | m.Keys)]
    candidates = keys_the_broker_can_derive(in_session, sniffer.records, sid)
    assert len(candidates) > 100
    for blob in sealed:
        for key in candidates:
            with pytest.raises(nacl.exceptions.CryptoError):
                nacl.secret.SecretBox(key).decrypt(blob)
    fp = FixedPoint()
    total = np.asarray(first["group_sum"], dtype=np.float64)
    needles = [total[:4].astype("<f4").tobytes(), fp.encode(total[:4]).astype("<u4").tobytes()]
    for e in done:
        values = e.data["own_values"][:4].astype(np.float64)
        needles += [values.astype("<f4").tobytes(), fp.encode(values).astype("<u4").tobytes()]
    for topic, payload in sniffer.records:
        for needle in needles:
            assert needle not in payload, f"a vector or the sum in the clear on {topic}"


async def test_shamir_and_masked_peers_never_group(mosquitto) -> None:
    shamir_cfg = dataclasses.replace(FAST, train=True)
    net = await start_network(mosquitto.url, 0, ResidualTrainer)
    kinds = {}
    for i in range(6):
        config = MASKED if i % 2 else shamir_cfg
        peer = net.add(f"{config.session_kind}{i}", ResidualTrainer(i, 6), config)
        kinds[peer.peer_id] = config.session_kind
    try:
        await wait_until(lambda: all(len(p.membership.live(time.time())) == 5 for p in net.peers),
                         20, "every peer to see the five others")
        await wait_until(lambda: all(p.counters.sessions_done >= 2 for p in net.peers), 40,
                         "two sessions per peer, within its kind")
        # Each peer sees all five as live, but only the two of its own kind as eligible.
        assert all(p.status().peers_live == 2 for p in net.peers)
    finally:
        await net.close()
    ended = [e for e in net.events if e.kind in ("session_done", "session_aborted")]
    assert ended
    for e in ended:
        members = e.data["members"] or (e.peer_id,)
        assert {kinds[p] for p in members} == {kinds[e.peer_id]}, e.data["members"]
    for p in net.peers:
        # Nobody even invited a peer of the other kind (it would decline: model_mismatch).
        assert "model_mismatch" not in p.counters.declines_sent
        assert p.params.model_id.endswith(MASKED_MODEL_SUFFIX) is (kinds[p.peer_id] == "masked")
    check_group_sums(net, min_complete=4)


def test_session_kind_setting_reaches_the_node_config() -> None:
    from peer.assembly import node_config
    from peer.config import SessionConfig
    from peer.network.session.kinds import MaskedSessionKind, ShamirSessionKind, build_kind

    def kind_of(cfg: NodeConfig):  # type: ignore[no-untyped-def]
        return build_kind(cfg.session_kind, cfg.timeouts, cfg.masked_timeouts)

    assert SessionConfig().kind == NodeConfig().session_kind == "shamir"
    assert isinstance(kind_of(node_config(SessionConfig())), ShamirSessionKind)
    masked = node_config(SessionConfig(kind="masked", share_timeout_s=3.0, partial_timeout_s=4.0))
    assert masked.session_kind == "masked"
    kind = kind_of(masked)
    assert isinstance(kind, MaskedSessionKind)
    assert (kind.timeouts.keys_s, kind.timeouts.reveal_s, kind.timeouts.survivors_s) == (
        3.0, 4.0, 7.0)
    assert kind.model_id("mlp-4810") == "mlp-4810-masked"
    with pytest.raises(ValueError, match="shamir"):
        SessionConfig(kind="paillier")
    with pytest.raises(ValueError, match="masked"):
        kind_of(NodeConfig(session_kind="paillier"))
