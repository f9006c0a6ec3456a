"""The inbound checks of a peer, in order, before any message reaches a session.

topic -> size -> decode -> topic binding (the signed sender must own the topic) -> network ->
certificate (announce, in the membership view) or known sender -> signature -> recipient ->
replay window. The first check that fails raises :class:`peer.network.membership.DropError`
naming it; the node counts it (``status().drops``). Nothing a broker or a stranger publishes
gets past these checks into the session state machine, and none of them can crash the peer.
"""

from __future__ import annotations

from dataclasses import dataclass

from crypto.errors import ReplayError, SignatureError, StaleMessageError
from crypto.identity import verify_signature
from crypto.replay import ReplayWindow
from peer.network.membership import DropError, MembershipView
from peer.network.transport import Incoming
from protocol import messages as m
from protocol.codec import SignedMessage, decode_message
from protocol.errors import ProtocolError, SizeLimitError
from protocol.limits import MAX_PAYLOAD_BYTES
from protocol.topics import check_topic_binding, parse_topic


@dataclass
class InboundChecks:
    """Admits or drops one inbound message for peer ``peer_id`` of ``network_id``."""

    network_id: str
    peer_id: str
    membership: MembershipView
    replay: ReplayWindow

    def admit(self, incoming: Incoming, now: float) -> SignedMessage | None:
        """The checks of the module docstring, in order; DropError names the first that fails.

        None: the message was fully handled here (our own echo, membership traffic).
        """
        try:
            parsed = parse_topic(self.network_id, incoming.topic)
        except ProtocolError as exc:
            raise DropError("bad_topic", str(exc)) from None
        if parsed.sender == self.peer_id:
            return None  # our own retained announcement / leave echoed back
        if parsed.kind == "announce" and not incoming.payload:
            # MQTT's way to clear a retained message. Unsigned, so anyone on the broker could
            # send it: it removes nobody (only a peer's own signed LEAVE does).
            raise DropError("unsigned_clear", parsed.sender)
        if len(incoming.payload) > MAX_PAYLOAD_BYTES:
            raise DropError("oversize")
        try:
            msg = decode_message(incoming.payload)
        except SizeLimitError as exc:
            raise DropError("oversize", str(exc)) from None
        except ProtocolError as exc:
            raise DropError("malformed", str(exc)) from None
        header = msg.header
        if header.network != self.network_id:
            raise DropError("foreign_network", header.network)
        try:
            check_topic_binding(parsed, msg)
        except ProtocolError as exc:
            raise DropError("topic_mismatch", str(exc)) from None
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
        member = self.membership.get(header.sender)
        if member is None:
            raise DropError("unknown_sender", header.sender)
        try:
            verify_signature(member.public.verify_key, msg.signed_bytes, msg.signature)
        except SignatureError:
            raise DropError("bad_signature", header.sender) from None
        if parsed.recipient is not None and parsed.recipient != self.peer_id:
            raise DropError("wrong_recipient")
        try:
            self.replay.check(header.sender, header.seq)
        except StaleMessageError:
            raise DropError("stale", header.sender) from None
        except ReplayError:
            raise DropError("replay", header.sender) from None
        return msg
