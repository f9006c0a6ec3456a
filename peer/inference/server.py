"""The serving peer (`murmur-peer serve`): holds snapshot shares from its configured owner,
announces them, and answers clients' queries with sealed product shares (docs/inference.md).

Security properties: it accepts a snapshot only from the one owner its configuration names
(certified as a ``peer``) and only with the owner's signature over its description, which it
re-announces verbatim in its SERVE, and queries only from certificates of role ``client``; every
message passes the checks of :class:`~peer.inference.endpoint.InferenceEndpoint` before a
seal is opened; a hostile client's flood, malformed shares, stale counter or unknown snapshot
is a counted drop (:attr:`drops`) and never stops the loop. It logs counts and ids, never a
share's values.
"""

from __future__ import annotations

import contextlib
import os
import time

from crypto.field import field_view
from crypto.identity import PublicIdentity
from peer.errors import DroppedError
from peer.inference.endpoint import InferenceEndpoint
from peer.inference.party import InferenceParty
from peer.inference.serving import ServeLimits, ServingState
from peer.network.broker_settings import BrokerSettings
from peer.network.transport import Incoming
from protocol.chunks import ChunkError, ChunkReassembler, ReassemblyLimits
from protocol.inference import Answer, Query, Serve, SnapshotShare
from protocol.limits import CONNECTION_ID_BYTES
from protocol.messages import Announce, Chunk, Kind, SignedMessage
from protocol.topics import announce_topic, direct_topic, inbox_filter, serve_topic

#: The model id a serve-only peer announces: no training peer shares it, so none invites it.
SERVE_ONLY_MODEL_ID = "serve-only"


class ServingPeer(InferenceParty):
    """One serving peer on the broker; ``state`` holds its shares and client accounts."""

    role_suffix = "serve"

    def __init__(self, endpoint: InferenceEndpoint, broker: BrokerSettings, *, owner: str,
                 limits: ServeLimits | None = None, announce_presence: bool = False) -> None:
        """``announce_presence``: publish this peer's retained ANNOUNCE itself, so the owner
        finds its keys, when no training node (`murmur-peer run`) of this peer does."""
        network, me = endpoint.network_id, endpoint.peer_id
        super().__init__(endpoint, broker,
                         [inbox_filter(network, me), announce_topic(network, owner)])
        self.owner = owner
        self.owner_public: PublicIdentity | None = None
        self.state = ServingState(me, limits)
        # Chunks come from the owner only: one snapshot share at a time, at most 8 MiB.
        self.chunks = ChunkReassembler(ReassemblyLimits(max_partial_per_sender=2))
        self.queries_answered = 0
        self.announce_presence = announce_presence
        #: Wall clock at start: a SNAPSHOT_SHARE signed (seq = the owner's clock in µs) before
        #: it, less the clock skew, is a replay from before a restart (``stale_snapshot``).
        self.started_at = time.time()

    @property
    def serving(self) -> list[bytes]:
        """Ids of the snapshots this peer serves (a public read-out)."""
        return list(self.state.snapshots)

    async def on_connected(self) -> None:
        ep = self.endpoint
        if self.announce_presence:
            body = Announce(ep.certificate, SERVE_ONLY_MODEL_ID, 1, os.urandom(CONNECTION_ID_BYTES))
            self.send(announce_topic(ep.network_id, ep.peer_id),
                      ep.frame(Kind.ANNOUNCE, b"", body), retain=True)
        for snapshot_id in self.state.snapshots:
            self._announce(snapshot_id)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Clear this peer's retained SERVE (and ANNOUNCE, when it made one) before leaving:
        its shares live in memory only, so a client must not find them announced after."""
        ep = self.endpoint
        if self.transport.connected.is_set():
            for snapshot_id in self.state.snapshots:
                self.send(serve_topic(ep.network_id, ep.peer_id, snapshot_id), b"", retain=True)
            if self.announce_presence:
                self.send(announce_topic(ep.network_id, ep.peer_id), b"", retain=True)
            with contextlib.suppress(TimeoutError):
                await self.flush(min(timeout_s, 5.0))
        await super().stop(timeout_s)

    def _announce(self, snapshot_id: bytes) -> None:
        announcement = self.state.snapshots[snapshot_id].announcement
        assert announcement is not None  # set at install
        ep = self.endpoint
        wire = ep.frame(Kind.SERVE, snapshot_id, Serve(ep.certificate, *announcement))
        self.send(serve_topic(ep.network_id, ep.peer_id, snapshot_id), wire, retain=True)

    async def on_message(self, incoming: Incoming) -> None:
        _, msg = self.endpoint.decode(incoming.topic, incoming.payload)
        kind = msg.header.kind
        if kind is Kind.ANNOUNCE:
            self._on_owner_announce(msg)
        elif kind is Kind.CHUNK:
            self._on_chunk(incoming.topic, msg)
        elif kind is Kind.SNAPSHOT_SHARE:
            self._on_snapshot_share(msg)
        elif kind is Kind.QUERY:
            self._on_query(msg)
        else:
            raise DroppedError("unexpected_kind", Kind(kind).name)

    def _on_owner_announce(self, msg: SignedMessage) -> None:
        self.owner_public = self.endpoint.announced_peer(msg)

    def _on_chunk(self, topic: str, msg: SignedMessage) -> None:
        """A piece of the owner's SNAPSHOT_SHARE, authenticated before it is held."""
        if msg.header.sender != self.owner or self.owner_public is None:
            raise DroppedError("unexpected_chunk", msg.header.sender)
        self.endpoint.authenticate(msg, self.owner_public)
        assert isinstance(msg.body, Chunk)
        try:
            wire = self.chunks.add(msg.header.sender, topic, msg.header.session, msg.body,
                                   time.monotonic())
        except ChunkError as exc:
            raise DroppedError(exc.drop_reason, exc.reason) from None
        if wire is not None:
            _, inner = self.endpoint.decode(topic, wire)
            if inner.header.kind is not Kind.SNAPSHOT_SHARE:
                raise DroppedError("chunk_inconsistent", "only a snapshot share is chunked")
            self._on_snapshot_share(inner)

    def _on_snapshot_share(self, msg: SignedMessage) -> None:
        body = msg.body
        assert isinstance(body, SnapshotShare)
        if msg.header.sender != self.owner:
            raise DroppedError("not_owner", msg.header.sender)
        owner = self.endpoint.certified(body.certificate, msg.header.sender, "peer")
        self.endpoint.authenticate(msg, owner)
        if msg.header.seq / 1e6 < self.started_at - self.endpoint.clock_skew_s:
            # Held in memory only, so this peer lost it, and the clients' counters with it,
            # when it restarted: installing it again would let a client reuse its masks.
            raise DroppedError("stale_snapshot", msg.header.session.hex())
        # The owner's signature over the description it sends, which this peer re-announces
        # verbatim: a client trusts the description only under that signature.
        self.endpoint.signed_description(body.certificate, body.described, body.description,
                                         body.owner_signature, msg.header.session)
        plaintext = self.endpoint.open_from(owner, msg, body.sealed)
        snapshot = self.state.install(msg.header.session, body.model, plaintext)
        snapshot.announcement = (body.certificate, body.description, body.owner_signature)
        self._announce(msg.header.session)

    def _on_query(self, msg: SignedMessage) -> None:
        body = msg.body
        assert isinstance(body, Query)
        ep = self.endpoint
        client = ep.certified(body.certificate, msg.header.sender, "client")
        ep.authenticate(msg, client)
        snapshot_id = msg.header.session
        snapshot, account = self.state.admit(snapshot_id, client.peer_id, body, time.monotonic())
        plaintext = ep.open_from(client, msg, body.sealed)
        product = self.state.answer(snapshot, account, client.peer_id, body, plaintext)
        seq = ep.seq.next()
        sealed = ep.seal_for(client, snapshot_id, seq, field_view(product))
        answer = Answer(client.peer_id, body.counter, body.rows, sealed)
        wire = ep.frame(Kind.ANSWER, snapshot_id, answer, seq=seq)
        self.send(direct_topic(ep.network_id, ep.peer_id, client.peer_id), wire)
        self.queries_answered += 1
