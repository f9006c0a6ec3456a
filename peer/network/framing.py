"""A peer's outgoing messages framed and signed: header, Ed25519 signature, chunks, topic.

:class:`Framer` turns a body into the signed bytes of one wire message (header: version,
network, kind, sender, session, seq; protocol/codec.py) and queues a session's messages on the
:class:`peer.network.outbox.Outbox`: on the sender's session topic when meant for every member,
on the recipient's direct topic otherwise. A message above ``max_message_bytes`` goes out as
signed CHUNKs in order on the same topic (protocol/chunks.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from crypto.identity import Identity
from peer.network.counters import SessionCounters
from peer.network.outbox import Outbox
from peer.network.session.common import Outgoing
from protocol import messages as m
from protocol.chunks import encode_chunked
from protocol.codec import encode_message
from protocol.topics import direct_topic, session_topic


@dataclass
class Framer:
    """Signs this peer's messages and queues its sessions' messages, chunked when too large."""

    network_id: str
    identity: Identity
    seq: m.SequenceCounter
    max_message_bytes: int
    outbox: Outbox
    counters: SessionCounters

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def encode(self, kind: m.Kind, session_id: bytes, body: m.Body,
               seq: int | None = None) -> bytes:
        """The signed message; ``seq`` None takes the next number of this peer's counter."""
        header = m.Header(
            version=m.PROTOCOL_VERSION,
            network=self.network_id,
            kind=kind,
            sender=self.peer_id,
            session=session_id,
            seq=self.seq.next() if seq is None else seq,
        )
        return encode_message(header, body, self.identity.sign)

    def queue(self, out: Outgoing, session_id: bytes) -> None:
        """Sign one message of session ``session_id`` and queue it (in parts if too large)."""
        payload = self.encode(out.kind, session_id, out.body, out.seq)
        if out.recipient is None:  # for every member: on our topic of this session
            topic = session_topic(self.network_id, self.peer_id, session_id)
        else:
            topic = direct_topic(self.network_id, self.peer_id, out.recipient)
        # Too large for max_message_bytes: signed CHUNKs in order, on the same topic.
        parts = encode_chunked(payload, max_message_bytes=self.max_message_bytes,
                               network=self.network_id, sender=self.peer_id, session=session_id,
                               sign=self.identity.sign, next_seq=self.seq.next)
        self.counters.chunked_sent += int(len(parts) > 1)
        for part in parts:
            self.outbox.put((topic, part, False))
