"""Every party of private predictions in one process, on one broker: a fresh admission key,
g serve-only serving peers, a model owner and a client, each with its own identity and
certificate. Used by `murmur-sim --serve-check`, bench/inference_bench.py and the tests; the
parties talk only through the broker, exactly as separate processes would.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from crypto.admission import ROLE_CLIENT, ROLE_PEER, AdmissionKey
from crypto.identity import Identity
from crypto.inference import SnapshotCodes
from peer.inference.client import KnownSnapshot, QueryClient
from peer.inference.endpoint import InferenceEndpoint
from peer.inference.owner import SnapshotPublisher
from peer.inference.server import ServingPeer
from peer.inference.serving import ServeLimits
from peer.network.broker_settings import BrokerSettings
from protocol.limits import DEFAULT_MAX_MESSAGE_BYTES

DAY_S = 86_400.0


def make_endpoint(admission: AdmissionKey, name: str, role: str = ROLE_PEER) -> InferenceEndpoint:
    """A fresh identity of ``name`` with a certificate of ``role`` from ``admission``."""
    identity = Identity.generate(name)
    cert = admission.issue(identity.public, valid_for_s=DAY_S, now=time.time(), role=role)
    return InferenceEndpoint(identity, cert.to_bytes(), admission.network_id,
                             admission.public_key)


@dataclass
class LocalServing:
    """The running parties and the snapshot the client found."""

    admission: AdmissionKey
    servers: list[ServingPeer]
    client: QueryClient
    snapshot: KnownSnapshot


@contextlib.asynccontextmanager
async def local_serving(broker: BrokerSettings, snapshot: SnapshotCodes, *, network: str = "serve",
                        servers: int = 3, threshold: int = 2,
                        limits: ServeLimits | None = None,
                        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                        timeout_s: float = 30.0) -> AsyncIterator[LocalServing]:
    """Start the parties, share ``snapshot`` and wait until the client sees it served."""
    admission = AdmissionKey.generate(network)
    names = [f"server-{i + 1}" for i in range(servers)]
    peers = [ServingPeer(make_endpoint(admission, name), broker, owner="owner", limits=limits,
                         announce_presence=True) for name in names]
    owner = SnapshotPublisher(make_endpoint(admission, "owner"), broker, names,
                              max_message_bytes=max_message_bytes)
    client = QueryClient(make_endpoint(admission, "client", ROLE_CLIENT), broker, owner="owner",
                         max_message_bytes=max_message_bytes)
    started: list[ServingPeer | SnapshotPublisher | QueryClient] = []
    try:
        for party in (*peers, owner, client):
            await party.start(timeout_s)
            started.append(party)
        snapshot_id = await owner.publish(snapshot, threshold=threshold, timeout_s=timeout_s)
        known = await client.wait_for_snapshot(timeout_s, snapshot_id)
        yield LocalServing(admission, peers, client, known)
    finally:
        for party in reversed(started):
            await party.stop()
