"""The model owner's step (`murmur-peer publish-snapshot`): take a serving snapshot of a
trained ``scatter`` model's linear layer and Shamir-share it to the serving peers
(docs/inference.md).

Security properties: each share is sealed for one serving peer, whose key comes from its
retained, signed ANNOUNCE checked against the admission key and the role ``peer``; the mask seed
is fresh per sharing and travels only inside those seals; any t - 1 shares are independent of
the weights. The owner signs the snapshot's public description (id, ordered server list, t,
public parameters, content hash, issue time) with its identity key; every serving peer re-
announces exactly those bytes and that signature, and a client trusts a snapshot only under the
signature of an owner it names (docs/inference.md). Only the scatter model is served: its secret
part is one linear layer. Models with nonlinearities between secret layers are refused
(:class:`UnsupportedModelError`) because they need secure comparisons, i.e. an MPC runtime, and
MPyC's runs over direct TCP connections between parties, not over a broker.
"""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np

from crypto.field import field_to_bytes
from crypto.identity import PublicIdentity
from crypto.inference import SnapshotCodes, share_snapshot
from crypto.masking import SEED_BYTES
from peer.errors import DroppedError, PeerError
from peer.inference.endpoint import InferenceEndpoint
from peer.inference.party import InferenceParty
from peer.network.broker_settings import BrokerSettings
from peer.network.transport import Incoming
from protocol.chunks import encode_chunked
from protocol.inference import ServedModel, SnapshotDescription, SnapshotShare
from protocol.limits import DEFAULT_MAX_MESSAGE_BYTES, SESSION_ID_BYTES
from protocol.messages import Kind
from protocol.topics import announce_topic, direct_topic

SERVABLE_MODELS = ("scatter",)


class UnsupportedModelError(PeerError, ValueError):
    """The model cannot be served privately (module docstring and docs/inference.md)."""


def check_servable(model_name: str) -> None:
    if model_name not in SERVABLE_MODELS:
        raise UnsupportedModelError(
            f"model {model_name!r} cannot be served privately: only {SERVABLE_MODELS} "
            "(public features + one secret linear layer). mlp and cnn need secure comparisons "
            "for their nonlinearities, i.e. an MPC runtime; MPyC's connects parties by direct "
            "TCP, not over MQTT (docs/inference.md)")


class SnapshotPublisher(InferenceParty):
    """The owner on the broker: learns the serving peers' keys, then sends the shares."""

    role_suffix = "owner"

    def __init__(self, endpoint: InferenceEndpoint, broker: BrokerSettings,
                 servers: list[str], *,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        network = endpoint.network_id
        super().__init__(endpoint, broker, [announce_topic(network, s) for s in servers])
        self.servers = list(servers)
        self.max_message_bytes = max_message_bytes
        self.keys: dict[str, PublicIdentity] = {}
        self._all_known = asyncio.Event()

    async def on_message(self, incoming: Incoming) -> None:
        _, msg = self.endpoint.decode(incoming.topic, incoming.payload)
        if msg.header.kind is not Kind.ANNOUNCE or msg.header.sender not in self.servers:
            raise DroppedError("unexpected_kind", Kind(msg.header.kind).name)
        self.keys[msg.header.sender] = self.endpoint.announced_peer(msg)
        if set(self.keys) == set(self.servers):
            self._all_known.set()

    async def publish(self, snapshot: SnapshotCodes, *, threshold: int,
                      timeout_s: float = 30.0) -> bytes:
        """Share ``snapshot`` to the serving peers; returns the fresh snapshot id."""
        try:
            await asyncio.wait_for(self._all_known.wait(), timeout_s)
        except TimeoutError:
            missing = sorted(set(self.servers) - set(self.keys))
            raise PeerError(f"no announcement from serving peers {missing}") from None
        p = snapshot.params
        model = ServedModel(tuple(self.servers), threshold, p.classes, p.features, p.frac_w,
                            p.frac_x, p.feature_norm_bound, p.max_rows_per_client,
                            snapshot.content_hash)
        snapshot_id = os.urandom(SESSION_ID_BYTES)
        mask_seed = os.urandom(SEED_BYTES)
        ep = self.endpoint
        description, signature = ep.sign_description(SnapshotDescription(
            ep.network_id, ep.peer_id, snapshot_id, time.time_ns() // 1000, model))
        shares = share_snapshot(snapshot, n=len(self.servers), t=threshold)
        for server, share in zip(self.servers, shares, strict=True):
            seq = ep.seq.next()
            sealed = ep.seal_for(self.keys[server], snapshot_id, seq,
                                 mask_seed + field_to_bytes(share.values))
            wire = ep.frame(Kind.SNAPSHOT_SHARE, snapshot_id,
                            SnapshotShare(server, ep.certificate, description, signature,
                                          sealed), seq=seq)
            topic = direct_topic(ep.network_id, ep.peer_id, server)
            for payload in encode_chunked(wire, max_message_bytes=self.max_message_bytes,
                                          network=ep.network_id, sender=ep.peer_id,
                                          session=snapshot_id, sign=ep.identity.sign,
                                          next_seq=ep.seq.next):
                self.send(topic, payload)
        await self.flush(timeout_s)
        return snapshot_id


def linear_layer(model: object, model_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of a scatter model's final linear layer as float64 arrays."""
    check_servable(model_name)
    layer = model[-1]  # type: ignore[index]  # nn.Sequential: features, flatten, linear
    weight = layer.weight.detach().cpu().numpy().astype(np.float64)
    bias = layer.bias.detach().cpu().numpy().astype(np.float64)
    return weight, bias
