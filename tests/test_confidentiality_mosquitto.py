"""No session secret ever crosses the broker in the clear, for either session kind.

Real peers run whole sessions over a real Mosquitto started by the test, each with an audit
tap (``NodeConfig.secret_tap``, peer/network/session_common.SecretTap) that hands the test
every secret its sessions draw or derive: the masked session key K, self seeds and ephemeral
private keys, every SHARE/PARTIAL/KEYS/REVEAL plaintext before it is sealed, the plaintext of
every K-sealed masked vector, and each member's own encoded vector. A sniffer subscribed to
``#`` holds every payload the broker carried. None of the secrets may appear at any byte
offset of any payload: whole, as any 32-byte aligned window of a longer secret (a secret cut
across chunks or truncated still shows), and, for a 32-byte secret, as the field elements it
is Shamir-shared as and as hex or base64 text.

Trust model: the broker and anyone subscribed to it are outsiders. They may see who talks to
whom and how much, never a vector, a share or a key.

Mutation checklist (each applied by hand to a scratch copy makes these tests fail):

* ``crypto.sealing.seal`` / ``open_sealed`` as identity (Box replaced by plaintext): the
  Shamir shares and partials, the masked START's K and every KEYS payload show up.
* ``masked_messages.session_seal`` / ``session_open`` as identity (SecretBox replaced by
  plaintext): every masked vector and REVEAL payload shows up.
"""

from __future__ import annotations

import base64
import dataclasses
from collections import defaultdict

import numpy as np
import pytest

from crypto.admission import AdmissionKey
from crypto.field import field_to_bytes
from crypto.masking import encode_secret
from peer.network.node import NodeConfig
from tests.conftest import wait_until
from tests.test_node_mosquitto import FAST, NET, Network, ResidualTrainer, Sniffer

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(120)]

#: Labels the tap must report for each session kind, so the test cannot pass on no secrets.
EXPECTED_LABELS = {
    "shamir": {"share_plaintext", "own_vector"},
    "masked": {"session_key", "self_seed", "ephemeral_private", "share_plaintext",
               "own_vector", "masked_plaintext"},
}
SESSIONS = 2  # per configuration, each with a different initiator
WINDOW = 32  # bytes of a longer secret looked for on their own


def secret_forms(secret: bytes) -> list[bytes]:
    """The byte strings that would betray ``secret``: itself and, for a 32-byte key or seed,
    its field-element form (crypto.masking.encode_secret, as little-endian uint32) and text."""
    forms = [secret]
    if len(secret) == 32:
        forms += [field_to_bytes(encode_secret(secret)), secret.hex().encode(),
                  secret.hex().upper().encode(), base64.b64encode(secret),
                  base64.urlsafe_b64encode(secret)]
    return forms


def secret_windows(secret: bytes) -> set[bytes]:
    """Aligned 32-byte windows of a longer secret, leaving out low-entropy ones (a run of zero
    field elements could occur anywhere); any payload holding one holds part of the secret."""
    if len(secret) <= WINDOW:
        return set()
    return {w for i in range(0, len(secret) - WINDOW + 1, WINDOW)
            if len(set(w := secret[i:i + WINDOW])) >= 12}


def leaks(secrets: list[tuple[str, str, bytes]],
          records: list[tuple[str, bytes]]) -> list[tuple[str, str, str]]:
    """(peer, label, topic) for every secret found in a sniffed payload."""
    found: list[tuple[str, str, str]] = []
    windows: dict[bytes, tuple[str, str]] = {}
    for peer, label, secret in secrets:
        for w in secret_windows(secret):
            windows[w] = (peer, label)
    for topic, payload in records:
        for peer, label, secret in secrets:
            if any(payload.find(form) != -1 for form in secret_forms(secret)):
                found.append((peer, label, topic))
        for i in range(len(payload) - WINDOW + 1):
            hit = windows.get(payload[i:i + WINDOW])
            if hit is not None:
                found.append((*hit, topic))
    return found


async def run_sessions(url: str, config: NodeConfig, taps: dict[str, list[tuple[str, bytes]]],
                       sniffer: Sniffer) -> Network:
    """g tapped peers on the broker; SESSIONS sessions started by turns, each awaited to its end
    at every member; returns the network once closed and every publish reached the sniffer."""
    g = config.group_size
    net = Network(url, AdmissionKey.generate(NET))
    for i in range(g):
        pid = f"peer{i}"
        tapped = dataclasses.replace(
            config, secret_tap=lambda label, secret, log=taps[pid]: log.append((label, secret)))
        net.add(pid, ResidualTrainer(i, g), tapped)
    try:
        await wait_until(lambda: all(p.status().peers_live == g - 1 for p in net.peers), 20,
                         "every peer to see the others")
        rng = np.random.default_rng(g)
        for n in range(SESSIONS):
            await wait_until(lambda: all(p.session is None for p in net.peers), 10,
                             "every peer to be free")
            for p in net.peers:
                idx = np.sort(rng.choice(400, 40, replace=False)).astype(np.uint32)
                p.offer_update(idx, rng.normal(0, 0.05, idx.size).astype(np.float32), n + 1)
            assert net.peers[n].try_start_session()
            await wait_until(lambda n=n: all(p.counters.sessions_done > n for p in net.peers),
                             30, f"session {n} to complete at every member")
    finally:
        await net.close()
    # Every acknowledged publish reaches the sniffer (it subscribed before any peer existed).
    await wait_until(lambda: len(sniffer.records) >= sum(p.status().messages_sent
                                                         for p in net.peers), 10,
                     "the sniffer to record every publish")
    return net


@pytest.mark.parametrize(("kind", "group_size", "threshold"),
                         [("shamir", 3, 2), ("shamir", 5, 3), ("masked", 3, 2), ("masked", 5, 3)])
async def test_no_session_secret_crosses_the_broker(mosquitto, kind: str, group_size: int,
                                                    threshold: int) -> None:
    config = dataclasses.replace(FAST, session_kind=kind, group_size=group_size,
                                 threshold=threshold, train=False, auto_start=False)
    taps: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    async with Sniffer(mosquitto.url) as sniffer:
        net = await run_sessions(mosquitto.url, config, taps, sniffer)
    for p in net.peers:
        assert p.status().sessions_done == SESSIONS, p.status()
        assert p.status().drops == {}, p.status().drops  # an honest run drops nothing
    done = net.done_events()
    assert len(done) == SESSIONS
    assert all(len(events) == group_size and len(events[0].data["members"]) == group_size
               for events in done.values())

    # The tap saw every kind of secret at every member, and as many as the sessions imply.
    for p in net.peers:
        labels = [label for label, _ in taps[p.peer_id]]
        assert set(labels) == EXPECTED_LABELS[kind], (p.peer_id, set(labels))
        assert labels.count("own_vector") == SESSIONS
        # Shamir: g - 1 shares and one partial; masked: g - 1 KEYS and one REVEAL.
        assert labels.count("share_plaintext") == SESSIONS * group_size
    if kind == "masked":
        keys = {s for log in taps.values() for label, s in log if label == "session_key"}
        assert len(keys) == SESSIONS  # one K per session, shared by its members

    secrets = [(pid, label, s) for pid, log in taps.items() for label, s in log]
    records = [(topic, payload) for topic, payload in sniffer.records if payload]
    # The sniffer saw the sessions, not only announcements: g - 1 sealed SHAREs or KEYS per
    # member per session on the members' direct topics.
    direct = [topic for topic, _ in records if "/to/" in topic]
    assert len(direct) >= SESSIONS * group_size * (group_size - 1)
    assert leaks(secrets, records) == []


def test_the_leak_check_finds_a_secret_however_it_travels() -> None:
    """The check itself: a secret whole, a 32-byte window of it inside another payload, and a
    32-byte key as hex, base64 or field elements are each found; unrelated bytes are not."""
    rng = np.random.default_rng(0)
    share = rng.integers(0, 2**31 - 1, 40, dtype=np.uint32).tobytes()
    key = rng.bytes(32)
    secrets = [("p0", "share_plaintext", share), ("p0", "session_key", key)]
    noise = rng.bytes(300)
    cases = {
        "whole": noise + share,
        "cut": share[40:120] + noise,
        "hex": noise + key.hex().encode(),
        "base64": base64.b64encode(key) + noise,
        "field": noise[:7] + field_to_bytes(encode_secret(key)),
    }
    for name, payload in cases.items():
        assert leaks(secrets, [(name, payload)]), name
    assert leaks(secrets, [("clean", noise), ("zeros", bytes(400))]) == []

