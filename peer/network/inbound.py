"""The inbound checks of a peer, in order, before any message reaches a session.

topic -> size -> decode -> topic binding (the signed sender must own the topic) -> network ->
certificate (announce, in the membership view) or known sender -> signature -> recipient ->
replay window. The first check that fails raises :class:`peer.errors.DroppedError`
naming it; the node counts it (``status().drops``). Nothing a broker or a stranger publishes
gets past these checks into the session state machine, and none of them can crash the peer.

A CHUNK (docs/protocol.md section 11) passes all of them itself before the reassembler
(protocol/chunks.py) holds it. The message it completes is then checked as if it had arrived
whole on the same topic (decode, network, topic binding, its own signature, recipient) with
two differences: its sender and session must be the chunk's (``chunk_inconsistent``), and its
replay check is skipped. That is sound because every chunk that carried it passed the replay
window and a signature of that very sender, so a replay of the chunks is already dropped and
nobody but the sender can make new ones; and it is needed because the inner seq was drawn
before the chunks' seqs and may lie below the replay window by the time the last chunk lands.
A sender re-sending its own message gains nothing it could not get by signing a new one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from crypto.errors import ReplayError, SignatureError, StaleMessageError
from crypto.identity import verify_signature
from crypto.replay import ReplayWindow
from peer.errors import DroppedError
from peer.network.counters import DropCounter
from peer.network.transport import Incoming
from peer.network.view.membership import MembershipView
from protocol import messages as m
from protocol.chunks import ChunkError, ChunkReassembler
from protocol.codec import SignedMessage, decode_message
from protocol.errors import ProtocolError, SizeLimitError
from protocol.limits import MAX_PAYLOAD_BYTES
from protocol.topics import ParsedTopic, check_topic_binding, parse_topic


@dataclass
class InboundChecks:
    """Admits or drops one inbound message for peer ``peer_id`` of ``network_id``."""

    network_id: str
    peer_id: str
    membership: MembershipView
    replay: ReplayWindow
    chunks: ChunkReassembler = field(default_factory=ChunkReassembler)
    reassembled: int = 0  # messages completed from chunks and admitted

    def admit(self, incoming: Incoming, now: float) -> SignedMessage | None:
        """The checks of the module docstring, in order; DroppedError names the first that fails.

        None: the message was fully handled here (our own echo, membership traffic, a chunk
        held until its message is complete).
        """
        try:
            parsed = parse_topic(self.network_id, incoming.topic)
        except ProtocolError as exc:
            raise DroppedError("bad_topic", str(exc)) from None
        if parsed.sender == self.peer_id:
            return None  # our own retained announcement / leave echoed back
        if parsed.kind == "announce" and not incoming.payload:
            # MQTT's way to clear a retained message. Unsigned, so anyone on the broker could
            # send it: it removes nobody (only a peer's own signed LEAVE does).
            raise DroppedError("unsigned_clear", parsed.sender)
        msg = self._decode_bound(parsed, incoming.payload)
        header = msg.header
        if header.kind in (m.Kind.ANNOUNCE, m.Kind.LEAVE):
            # Membership checks certificate, signature and announce ordering itself.
            if header.kind is m.Kind.ANNOUNCE:
                self.membership.on_announce(msg, now)
            elif incoming.retain and header.sender not in self.membership:
                # The broker's retained copy of a departed peer's leave (or last will): the
                # normal state of a topic whose peer is gone, not an attack. Nothing to do.
                return None
            else:
                self.membership.on_leave(msg)
            return None
        self._authenticate(parsed, msg)
        try:
            self.replay.check(header.sender, header.seq)
        except StaleMessageError:
            raise DroppedError("stale", header.sender) from None
        except ReplayError:
            raise DroppedError("replay", header.sender) from None
        if header.kind is m.Kind.CHUNK:
            return self._on_chunk(parsed, incoming.topic, msg, now)
        return msg

    def expire_chunks(self, now: float, drops: DropCounter) -> None:
        """Forget unfinished chunked messages past their age, and count them and those the
        reassembler evicted for room since the last call as drops."""
        expired = self.chunks.expire(now)
        if expired:
            drops.drop("chunk_expired", "unfinished chunked message", expired)
        evicted = self.chunks.take_evicted()
        if evicted:
            drops.drop("chunk_evicted", "the largest sender's oldest message", evicted)

    def _decode_bound(self, parsed: ParsedTopic, payload: bytes) -> SignedMessage:
        return decode_bound(self.network_id, parsed, payload)

    def _authenticate(self, parsed: ParsedTopic, msg: SignedMessage) -> None:
        """Known sender, its signature, and a direct topic addressed to us."""
        sender = msg.header.sender
        member = self.membership.get(sender)
        if member is None:
            raise DroppedError("unknown_sender", sender)
        try:
            verify_signature(member.public.verify_key, msg.signed_bytes, msg.signature)
        except SignatureError:
            raise DroppedError("bad_signature", sender) from None
        if parsed.recipient is not None and parsed.recipient != self.peer_id:
            raise DroppedError("wrong_recipient")

    def _on_chunk(self, parsed: ParsedTopic, topic: str, chunk: SignedMessage,
                  now: float) -> SignedMessage | None:
        """Hold an authenticated chunk; the message it completes, checked (module docstring)."""
        header = chunk.header
        assert isinstance(chunk.body, m.Chunk)
        try:
            wire = self.chunks.add(header.sender, topic, header.session, chunk.body, now)
        except ChunkError as exc:
            raise DroppedError(exc.drop_reason, f"{header.sender}: {exc.reason}") from None
        if wire is None:
            return None
        inner = self._decode_bound(parsed, wire)
        if inner.header.kind is m.Kind.CHUNK:
            raise DroppedError("chunk_inconsistent", "a chunk inside a chunk")
        if (inner.header.sender, inner.header.session) != (header.sender, header.session):
            raise DroppedError("chunk_inconsistent", "inner sender or session differs")
        self._authenticate(parsed, inner)
        self.reassembled += 1
        return inner


def decode_bound(network_id: str, parsed: ParsedTopic, payload: bytes) -> SignedMessage:
    """Size, strict decode, network and topic binding of one payload on a parsed topic;
    DroppedError (oversize, malformed, foreign_network, topic_mismatch) otherwise. Shared by
    the training node and the inference parties (peer/inference/endpoint.py)."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise DroppedError("oversize")
    try:
        msg = decode_message(payload)
    except SizeLimitError as exc:
        raise DroppedError("oversize", str(exc)) from None
    except ProtocolError as exc:
        raise DroppedError("malformed", str(exc)) from None
    if msg.header.network != network_id:
        raise DroppedError("foreign_network", msg.header.network)
    try:
        check_topic_binding(parsed, msg)
    except ProtocolError as exc:
        raise DroppedError("topic_mismatch", str(exc)) from None
    return msg
