"""The client of private predictions (`python -m peer.query`): it learns which snapshots are
served, shares and seals its feature rows to the serving peers, and rebuilds the logits
(docs/inference.md).

Security properties: the client's feature rows leave it only as Shamir shares of threshold t,
each sealed for one serving peer, so the broker and fewer than t serving peers learn nothing of
them. It accepts a SERVE only from a certificate of role ``peer`` named in that snapshot's
server list, and only with a description of the snapshot signed by the model owner it names
(``owner``; any other owner is ``untrusted_owner``, a forged or altered description
``bad_description_signature``, both counted drops that never evict a trusted description).
Without a named owner it uses only a snapshot id it was given (``--snapshot``), and refuses to
guess when two owners signed descriptions under that id. An ANSWER only from such a server, for
a query it sent, under the snapshot id it asked (otherwise ``snapshot_mismatch``, a counted
drop, never a wrong answer). It rebuilds from the first 2t - 1 answers, so a serving peer that
answers wrongly is not detected (honest-but-curious serving peers, docs/inference.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import numpy as np

from crypto.field import field_from_bytes, field_view
from crypto.identity import PublicIdentity
from crypto.inference import (
    InconsistentAnswersError,
    encode_features,
    reconstruct_logits,
    share_features,
)
from peer.errors import DroppedError, PeerError
from peer.inference.endpoint import InferenceEndpoint
from peer.inference.party import InferenceParty
from peer.inference.serving import params_of
from peer.network.broker_settings import BrokerSettings
from peer.network.transport import Incoming
from protocol.inference import MAX_QUERY_ROWS, Answer, Query, Serve, ServedModel
from protocol.limits import (
    DEFAULT_MAX_MESSAGE_BYTES,
    FIELD_ELEMENT_BYTES,
    SEAL_OVERHEAD_BYTES,
    SESSION_ENVELOPE_BYTES,
)
from protocol.messages import Kind, SequenceCounter, SignedMessage
from protocol.topics import direct_topic, inbox_filter, serve_filter

#: Snapshots a client keeps track of (SERVE announcements are retained, so this bounds memory).
MAX_KNOWN_SNAPSHOTS = 64
#: Query messages in flight at once (bounds the answers held).
MAX_IN_FLIGHT = 64


class QueryError(PeerError):
    """A prediction could not be made (no snapshot served, too few answers in time)."""


@dataclass
class KnownSnapshot:
    """A snapshot as its owner signed it, and the serving peers whose SERVE for it arrived."""

    snapshot_id: bytes
    model: ServedModel
    owner: str = ""
    servers: dict[str, PublicIdentity] = field(default_factory=dict)
    newest_seq: int = 0

    @property
    def answerable(self) -> bool:
        return len(self.servers) >= 2 * self.model.threshold - 1


@dataclass
class _Pending:
    snapshot: KnownSnapshot
    rows: int
    answers: dict[int, np.ndarray]
    done: asyncio.Future[np.ndarray]


class QueryClient(InferenceParty):
    """A client on the broker. ``predict`` returns logits; ``drops`` counts what it refused."""

    role_suffix = "query"

    def __init__(self, endpoint: InferenceEndpoint, broker: BrokerSettings, *,
                 owner: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        """``owner``: the model owner whose signed descriptions this client trusts; None
        trusts only the snapshot id given to :meth:`wait_for_snapshot`."""
        network, me = endpoint.network_id, endpoint.peer_id
        super().__init__(endpoint, broker, [serve_filter(network), inbox_filter(network, me)])
        self.owner = owner
        self.max_message_bytes = max_message_bytes
        #: Keyed by (snapshot id, owner): a description another peer signed under a real id
        #: never displaces the real owner's.
        self.snapshots: dict[tuple[bytes, str], KnownSnapshot] = {}
        self._pending: dict[int, _Pending] = {}
        self._counter = SequenceCounter()
        self._changed = asyncio.Event()
        self.bytes_sent_queries = 0

    # ------------------------------------------------------------------------------ snapshots
    async def wait_for_snapshot(self, timeout_s: float, snapshot_id: bytes | None = None, *,
                                settle_s: float = 0.5) -> KnownSnapshot:
        """The newest snapshot of the trusted owner (or ``snapshot_id``) all of whose servers
        announced it.

        Retained announcements of several snapshots arrive in no particular order, so once one
        is complete the client waits until ``settle_s`` pass without a new SERVE before it
        picks the newest (highest signed sequence number). Without an owner, ``snapshot_id``
        is required, and two owners' complete descriptions under it are a QueryError."""
        if self.owner is None and snapshot_id is None:
            raise QueryError("name the model owner (--owner or owner in the config) or the "
                             "snapshot (--snapshot): any admitted peer can announce one")
        deadline = time.monotonic() + timeout_s
        settled_at: float | None = None
        while True:
            ready = [s for s in self.snapshots.values()
                     if len(s.servers) == len(s.model.servers)
                     and snapshot_id in (None, s.snapshot_id)]
            now = time.monotonic()
            if ready and settled_at is None:
                settled_at = min(now + settle_s, deadline)
            if ready and now >= settled_at:
                if self.owner is None and len(ready) > 1:
                    owners = sorted(s.owner for s in ready)
                    raise QueryError(f"snapshot {snapshot_id.hex()} is described by owners "
                                     f"{owners}: name the owner (--owner)")
                return max(ready, key=lambda s: s.newest_seq)
            if now >= deadline:
                raise QueryError("no snapshot is served by all its serving peers")
            self._changed.clear()
            wake = settled_at if settled_at is not None else deadline
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(0.0, wake - now))
            if self._changed.is_set() and settled_at is not None:
                settled_at = min(time.monotonic() + settle_s, deadline)

    def _on_serve(self, msg: SignedMessage) -> None:
        body = msg.body
        assert isinstance(body, Serve)
        sender = msg.header.sender
        public = self.endpoint.certified(body.certificate, sender, "peer")
        self.endpoint.authenticate(msg, public)
        described = body.described
        if self.owner is not None and described.owner != self.owner:
            raise DroppedError("untrusted_owner", f"{sender}: owner {described.owner!r}")
        self.endpoint.signed_description(body.owner_certificate, described, body.description,
                                         body.owner_signature, msg.header.session)
        # The decoder checked that the sender is in the signed server list; its point is its
        # place there (+ 1), so no serving peer can claim another's point.
        key = (msg.header.session, described.owner)
        known = self.snapshots.get(key)
        if known is None:
            if len(self.snapshots) >= MAX_KNOWN_SNAPSHOTS:
                raise DroppedError("too_many_snapshots", sender)
            known = KnownSnapshot(msg.header.session, described.model, described.owner)
            self.snapshots[key] = known
        if described.model != known.model:
            # Both signed by this owner under one id: the owner contradicts itself.
            raise DroppedError("snapshot_mismatch", f"{sender} describes another model")
        known.servers[sender] = public
        known.newest_seq = max(known.newest_seq, msg.header.seq)
        self._changed.set()

    # ------------------------------------------------------------------------------- queries
    def rows_per_message(self, model: ServedModel) -> int:
        room = self.max_message_bytes - SESSION_ENVELOPE_BYTES - SEAL_OVERHEAD_BYTES
        return max(1, min(MAX_QUERY_ROWS, room // (FIELD_ELEMENT_BYTES * model.features)))

    async def predict(self, rows: np.ndarray, snapshot: KnownSnapshot, *,
                      timeout_s: float = 30.0) -> np.ndarray:
        """Logits (N x C) of ``rows`` (N x D features), privately; QueryError past the deadline.

        FeatureRangeError (before anything is sent) if a row is above the snapshot's norm bound.
        """
        params = params_of(snapshot.model)
        codes = encode_features(rows, params)
        step = self.rows_per_message(snapshot.model)
        futures: list[asyncio.Future[np.ndarray]] = []
        deadline = time.monotonic() + timeout_s
        for start in range(0, len(codes), step):
            while len(self._pending) >= MAX_IN_FLIGHT:
                await self._wait_first(deadline)
            futures.append(self._send_query(snapshot, codes[start:start + step]))
        try:
            results = await asyncio.wait_for(asyncio.gather(*futures),
                                             max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            late = {c: sorted(p.answers) for c, p in self._pending.items() if p.done in futures}
            raise QueryError(f"too few answers within {timeout_s:g} s (answered points of "
                             f"the {len(late)} unanswered queries: {list(late.values())[:4]})"
                             ) from None
        finally:
            for counter in [c for c, p in self._pending.items() if p.done in futures]:
                del self._pending[counter]
        return np.concatenate(results) if results else np.empty((0, params.classes))

    async def _wait_first(self, deadline: float) -> None:
        waiting = [p.done for p in self._pending.values()]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise QueryError("too few answers before the deadline")
        await asyncio.wait(waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)

    def _send_query(self, snapshot: KnownSnapshot, codes: np.ndarray) -> asyncio.Future:
        ep, model = self.endpoint, snapshot.model
        counter = self._counter.next()
        shares = share_features(codes, n=len(model.servers), t=model.threshold)
        for server, share in zip(model.servers, shares, strict=True):
            public = snapshot.servers.get(server)
            if public is None:
                continue  # not announced: it cannot answer; the others may still suffice
            seq = ep.seq.next()
            sealed = ep.seal_for(public, snapshot.snapshot_id, seq, field_view(share.values))
            query = Query(server, ep.certificate, counter, len(codes), sealed)
            wire = ep.frame(Kind.QUERY, snapshot.snapshot_id, query, seq=seq)
            self.bytes_sent_queries += len(wire)
            self.send(direct_topic(ep.network_id, ep.peer_id, server), wire)
        done: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._pending[counter] = _Pending(snapshot, len(codes), {}, done)
        return done

    def _on_answer(self, msg: SignedMessage) -> None:
        body = msg.body
        assert isinstance(body, Answer)
        pending = self._pending.get(body.counter)
        if pending is None or pending.done.done():
            raise DroppedError("unexpected_answer", f"counter {body.counter}")
        snapshot = pending.snapshot
        if msg.header.session != snapshot.snapshot_id:
            raise DroppedError("snapshot_mismatch", msg.header.session.hex())
        server = snapshot.servers.get(msg.header.sender)
        if server is None:
            raise DroppedError("unknown_server", msg.header.sender)
        self.endpoint.authenticate(msg, server)
        if body.rows != pending.rows:
            raise DroppedError("bad_answer", f"{body.rows} rows, asked {pending.rows}")
        try:
            values = field_from_bytes(self.endpoint.open_from(server, msg, body.sealed))
        except ValueError as exc:
            raise DroppedError("bad_answer", str(exc)) from None
        if values.size != pending.rows * snapshot.model.classes:
            raise DroppedError("bad_answer", f"{values.size} values")
        point = snapshot.model.servers.index(msg.header.sender) + 1
        pending.answers[point] = values
        if len(pending.answers) >= 2 * snapshot.model.threshold - 1:
            del self._pending[body.counter]  # frees the in-flight window
            try:
                pending.done.set_result(reconstruct_logits(
                    pending.answers, params_of(snapshot.model), t=snapshot.model.threshold))
            except (ValueError, InconsistentAnswersError) as exc:
                pending.done.set_exception(QueryError(str(exc)))

    async def on_message(self, incoming: Incoming) -> None:
        _, msg = self.endpoint.decode(incoming.topic, incoming.payload)
        if msg.header.kind is Kind.SERVE:
            self._on_serve(msg)
        elif msg.header.kind is Kind.ANSWER:
            self._on_answer(msg)
        else:
            raise DroppedError("unexpected_kind", Kind(msg.header.kind).name)
