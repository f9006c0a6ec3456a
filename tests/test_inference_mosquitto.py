"""Private predictions end to end on a real Mosquitto (docs/inference.md).

Three serving peers, a model owner and a client, each with its own identity and certificate,
talk only through a Mosquitto started by the test. The client computes the public ScatterNet
features of Fashion-MNIST test images itself; the private logits must equal the plaintext
fixed-point logits exactly and give the plaintext float model's class on every image. A
sniffer on ``#`` must see no feature and no weight value. A hostile client's floods and
malformed queries are counted drops, and an honest client is still answered afterwards. Rogue
admitted peers announcing a competing snapshot, or other descriptions under the real snapshot
id, are counted drops at a client that names its model owner, which still uses the owner's.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import pytest

from crypto.admission import ROLE_CLIENT
from crypto.field import PRIME, field_to_bytes
from crypto.inference import (
    SnapshotParams,
    encode_features,
    encode_snapshot,
    fit_snapshot,
    fixed_point_logits,
    share_features,
)
from peer.inference.client import QueryClient, QueryError
from peer.inference.endpoint import InferenceEndpoint
from peer.inference.local import LocalServing, local_serving, make_endpoint
from peer.inference.serving import ServeLimits
from peer.network.transport import BrokerSettings
from peer.training.data import DEFAULT_FASHION_MNIST_ROOT, load_fashion_mnist
from protocol.inference import (
    Query,
    Serve,
    SnapshotDescription,
    decode_description,
    encode_description,
)
from protocol.messages import Kind
from protocol.topics import direct_topic, serve_topic
from tests.conftest import require_installed, wait_until
from tests.test_confidentiality_mosquitto import leaks, secret_windows
from tests.test_node_mosquitto import Sniffer

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(300)]

TEST_IMAGES = 100
TRAIN_IMAGES = 600


def fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images) of the CI-sized subset."""
    require_installed(Path(DEFAULT_FASHION_MNIST_ROOT).is_dir(), "Fashion-MNIST",
                      "dataset-fashion-mnist")
    train = load_fashion_mnist(train=True)
    test = load_fashion_mnist(train=False)
    return train.x[:TRAIN_IMAGES], train.y[:TRAIN_IMAGES], test.x[:TEST_IMAGES]


async def test_private_predictions_match_plaintext_and_the_wire_shows_no_values(mosquitto):
    from peer.inference.features import client_features, train_reference_head

    train_x, train_y, test_x = fashion_mnist()
    weights, bias = train_reference_head(client_features(train_x), train_y, 10)
    snapshot = fit_snapshot(weights, bias)
    features = client_features(test_x)
    broker = BrokerSettings(url=mosquitto.url)
    async with Sniffer(mosquitto.url) as sniffer, local_serving(broker, snapshot) as serving:
        logits = await serving.client.predict(features, serving.snapshot, timeout_s=60)
    assert np.array_equal(logits, fixed_point_logits(snapshot, features))
    plain = features @ weights.T + bias
    assert np.array_equal(logits.argmax(axis=1), plain.argmax(axis=1))  # 100 % agreement

    secrets = {
        "feature codes": field_to_bytes(encode_features(features, snapshot.params).reshape(-1)),
        "features float32": features.astype(np.float32).tobytes(),
        "features float64": features.tobytes(),
        "weight codes": field_to_bytes(snapshot.codes),
        "weights float32": weights.astype(np.float32).tobytes(),
    }
    kinds_seen = {topic.split("/")[3] for topic, _ in sniffer.records}
    assert {"to", "serve", "announce"} <= kinds_seen  # shares, queries, answers, SERVEs seen
    assert all(secret_windows(secret) for secret in secrets.values())
    assert leaks([("client", label, s) for label, s in secrets.items()], sniffer.records) == []


def _hostile_query(client: InferenceEndpoint, serving: LocalServing, server: str, *,
                   counter: int, rows: int, payload: bytes,
                   snapshot_id: bytes | None = None) -> tuple[str, bytes]:
    """A QUERY signed and sealed correctly by ``client`` whose content is what it chooses."""
    public = serving.snapshot.servers[server]
    sid = serving.snapshot.snapshot_id if snapshot_id is None else snapshot_id
    seq = client.seq.next()
    sealed = client.seal_for(public, sid, seq, payload)
    wire = client.frame(Kind.QUERY, sid, Query(server, client.certificate, counter, rows, sealed),
                        seq=seq)
    return direct_topic(client.network_id, client.peer_id, server), wire


async def test_a_hostile_client_gets_counted_drops_and_stalls_nobody(mosquitto):
    rng = np.random.default_rng(3)
    params = SnapshotParams.for_unit_variance(10, 64, max_rows_per_client=40)
    weights, bias = rng.normal(0, 0.1, (10, 64)), rng.normal(0, 0.1, 10)
    snapshot = encode_snapshot(weights, bias, params)
    rows = rng.normal(0, 1, (4, 64))
    rows /= np.sqrt((rows * rows).mean(axis=1, keepdims=True))
    broker = BrokerSettings(url=mosquitto.url)
    limits = ServeLimits(rows_per_minute=10_000)
    async with local_serving(broker, snapshot, limits=limits) as serving:
        from peer.inference.party import InferenceParty

        server = serving.servers[0]
        name = server.endpoint.peer_id
        mallory = make_endpoint(serving.admission, "mallory", ROLE_CLIENT)
        posing_peer = make_endpoint(serving.admission, "trudy")  # role peer
        # mallory uses a bare party for sending raw wire bytes
        sender = InferenceParty(mallory, broker, [])
        await sender.start()
        try:
            good = field_to_bytes(share_features(encode_features(rows[:1], params), n=3,
                                                 t=2)[0].values)
            out_of_field = np.full(64, PRIME, dtype=np.uint32).tobytes()
            attempts = [
                _hostile_query(mallory, serving, name, counter=1, rows=1, payload=good,
                               snapshot_id=bytes(16)),                      # unknown snapshot
                _hostile_query(mallory, serving, name, counter=2, rows=1,
                               payload=good + good[:4]),                    # not whole rows
                _hostile_query(mallory, serving, name, counter=3, rows=1,
                               payload=out_of_field),                       # not field elements
                _hostile_query(posing_peer, serving, name, counter=4, rows=1, payload=good),
                (direct_topic(serving.admission.network_id, "mallory", name), b"\x93garbage"),
            ]
            for counter in range(10, 60):  # a flood: past the quota of 40 rows
                attempts.append(_hostile_query(mallory, serving, name, counter=counter,
                                               rows=1, payload=good))
            for counter in (5, 6, 7):  # stale counters after the flood
                attempts.append(_hostile_query(mallory, serving, name, counter=counter,
                                               rows=1, payload=good))
            for topic, wire in attempts:
                sender.send(topic, wire)
            expected = {"unknown_snapshot": 1, "bad_shares": 2, "wrong_role": 1,
                        "malformed": 1, "quota": 10, "stale_counter": 3}

            def all_counted() -> bool:
                drops = server.drops
                return all(drops.get(k, 0) >= v for k, v in expected.items())

            await wait_until(all_counted, 30, f"drops {expected} at {name}")
            assert server.state.rows_served == 40
            # the honest client is still served, exactly
            logits = await serving.client.predict(rows, serving.snapshot, timeout_s=30)
            assert np.array_equal(logits, fixed_point_logits(snapshot, rows))
        finally:
            await sender.stop()


async def test_rogue_peers_announcements_are_drops_and_the_owners_snapshot_is_used(mosquitto):
    """Three admitted peers announce a newer snapshot of their own (complete: all its servers
    announce it), one announces its own description under the real id, one the owner's
    description altered to list it, under the owner's signature. A client naming the owner
    counts each as a drop and is answered exactly from the owner's snapshot."""
    from peer.inference.party import InferenceParty

    rng = np.random.default_rng(5)
    params = SnapshotParams.for_unit_variance(10, 64)
    snapshot = encode_snapshot(rng.normal(0, 0.1, (10, 64)), rng.normal(0, 0.1, 10), params)
    rows = rng.normal(0, 1, (3, 64))
    rows /= np.sqrt((rows * rows).mean(axis=1, keepdims=True))
    broker = BrokerSettings(url=mosquitto.url)
    async with local_serving(broker, snapshot, network="rogue") as serving:
        real = serving.snapshot
        network = serving.admission.network_id
        # the owner's signed description, as every real SERVE on the broker carries it
        owner_cert, description, signature = (
            serving.servers[0].state.snapshots[real.snapshot_id].announcement)
        genuine = decode_description(description)
        rogues = [make_endpoint(serving.admission, n) for n in ("mallory", "rogue-2", "rogue-3")]
        mallory = rogues[0]
        sender = InferenceParty(mallory, broker, [])
        await sender.start()
        sent: list[str] = []

        def announce(rogue: InferenceEndpoint, snapshot_id: bytes, raw: bytes, sig: bytes,
                     signer_cert: bytes) -> None:
            topic = serve_topic(network, rogue.peer_id, snapshot_id)
            body = Serve(rogue.certificate, signer_cert, raw, sig)
            sender.send(topic, rogue.frame(Kind.SERVE, snapshot_id, body), retain=True)
            sent.append(topic)

        client = QueryClient(make_endpoint(serving.admission, "erin", ROLE_CLIENT), broker,
                             owner="owner")
        try:
            # 1. a competing, newer snapshot described and signed by mallory, served by rogues
            rogue_id = os.urandom(16)
            rogue_model = dataclasses.replace(genuine.model,
                                              servers=tuple(r.peer_id for r in rogues))
            raw, sig = mallory.sign_description(SnapshotDescription(
                network, "mallory", rogue_id, time.time_ns() // 1000, rogue_model))
            for rogue in rogues:
                announce(rogue, rogue_id, raw, sig, mallory.certificate)
            # 2. mallory's own description under the real id, listing mallory first
            conflict = dataclasses.replace(genuine, owner="mallory", model=dataclasses.replace(
                genuine.model, servers=("mallory", *genuine.model.servers[1:])))
            raw, sig = mallory.sign_description(conflict)
            announce(mallory, real.snapshot_id, raw, sig, mallory.certificate)
            # 3. the owner's description altered to list rogue-2, under the owner's signature
            altered = encode_description(dataclasses.replace(genuine, model=dataclasses.replace(
                genuine.model, servers=(genuine.model.servers[0], "rogue-2",
                                        genuine.model.servers[2]))))
            announce(rogues[1], real.snapshot_id, altered, signature, owner_cert)
            await sender.flush(10)

            with pytest.raises(QueryError, match="owner"):  # neither owner nor snapshot named
                await QueryClient(client.endpoint, broker).wait_for_snapshot(1)
            await client.start()
            expected = {"untrusted_owner": 4, "bad_description_signature": 1}
            await wait_until(lambda: all(client.drops.get(k, 0) >= v
                                         for k, v in expected.items()),
                             30, f"client drops {expected}")
            known = await client.wait_for_snapshot(30)
            assert (known.snapshot_id, known.owner) == (real.snapshot_id, "owner")
            assert set(known.servers) == set(genuine.model.servers)
            logits = await client.predict(rows, known, timeout_s=30)
            assert np.array_equal(logits, fixed_point_logits(snapshot, rows))
        finally:
            await client.stop()
            for topic in sent:  # clear the rogue retained announcements
                sender.send(topic, b"", retain=True)
            await sender.flush(10)
            await sender.stop()
