"""The peer's view of the network: which admitted peers are alive, and what they train.

Security properties:

* Only a peer with a certificate signed by this network's admission key, for this network,
  valid now (within ``clock_skew_s``), whose announcement is signed by the key that
  certificate vouches for, and whose certificate names the announcing sender, enters the view.
  Everything else raises :class:`peer.errors.DroppedError` with a short reason the caller
  counts and logs.
  Broker credentials and ACLs are a second wall; this check is the first.
* The view stores public keys only. A peer's box key and verify key come from its certificate,
  never from anything the peer may change without the admission key.
* An announcement whose sequence number is not above the highest one seen from that peer is
  dropped (``stale_announce``; an exact copy of the current one is accepted as a no-op), and
  that memory outlives the peer's departure: a replayed old announcement can neither roll back
  a peer's model or certificate nor bring a departed peer back.
* A peer following only part of the network (docs/design/partial-view.md) may
  :meth:`MembershipView.forget` peers it no longer follows. That is local bookkeeping, not a
  removal by anyone else: the forgotten peer may come back with the very announcement it was
  forgotten at (the broker's retained copy, which a lookup or a re-followed bucket delivers),
  but never with an older one.
* Only the peer itself can remove itself: a peer is forgotten on a LEAVE signed by its
  certified key that names the connection id of its current announcement (its graceful leave,
  or the last will it signed when it opened that connection), or after ``silence_expiry_s``
  without an announcement. A LEAVE naming another connection (an old will or leave replayed
  after the peer reconnected) is dropped (``stale_leave``), and an empty or unsigned payload
  removes nobody: the node drops it (``unsigned_clear``) before it reaches the view.
* Neighbour sampling draws from the OS CSPRNG (``secrets.SystemRandom``): a peer that cannot
  predict who will be invited cannot arrange to be in a chosen peer's groups.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from crypto.admission import ROLE_PEER, Certificate, verify_certificate
from crypto.errors import (
    BadCertificateSignatureError,
    CertificateError,
    ExpiredCertificateError,
    ForeignNetworkError,
    SignatureError,
)
from crypto.identity import PublicIdentity, verify_signature
from peer.errors import DroppedError
from protocol.messages import Announce, Kind, Leave, SignedMessage


@dataclass
class Member:
    """One admitted peer as last announced.

    ``last_seen`` is when its latest announcement arrived (the caller's clock);
    ``expires_at`` is its certificate's expiry; ``seq`` the announcement's sequence number.
    """

    public: PublicIdentity
    model_id: str
    param_count: int
    last_seen: float
    expires_at: float
    seq: int = 0
    connection: bytes = b""  # the connection id of its latest announcement

    @property
    def peer_id(self) -> str:
        return self.public.peer_id


class MembershipView:
    """Admitted peers from signed announcements; expiry of silent peers; random sampling.

    Not thread-safe: owned by the peer's event loop. Time is always passed in (``now``) so the
    view is deterministic under test and follows whatever clock the peer uses.
    """

    def __init__(
        self,
        network_id: str,
        admission_public_key: bytes,
        self_id: str,
        *,
        silence_expiry_s: float,
        clock_skew_s: float,
    ) -> None:
        if len(admission_public_key) != 32:
            raise ValueError("admission public key must be 32 bytes")
        if silence_expiry_s <= 0 or clock_skew_s < 0:
            raise ValueError("silence_expiry_s must be > 0 and clock_skew_s >= 0")
        self.network_id = network_id
        self.admission_public_key = bytes(admission_public_key)
        self.self_id = self_id
        self.silence_expiry_s = silence_expiry_s
        self.clock_skew_s = clock_skew_s
        self._members: dict[str, Member] = {}
        # Highest announce/leave seq seen per admitted peer, kept after the peer leaves so a
        # replayed old announcement cannot bring it back. Only admitted (certified) ids get an
        # entry, so the admission key bounds its size.
        self._highest_seq: dict[str, int] = {}
        # Peers dropped by forget() -> the seq of the announcement they were dropped at: that
        # announcement (and nothing older) may re-admit them. Bounded like _highest_seq.
        self._forgotten: dict[str, int] = {}
        self._random = secrets.SystemRandom()

    # --------------------------------------------------------------------------- admission
    def verify_announce(self, msg: SignedMessage, now: float) -> tuple[Announce, Certificate]:
        """Every check of :meth:`on_announce` without changing the view; DroppedError(reason)."""
        header = msg.header
        if header.kind != Kind.ANNOUNCE or not isinstance(msg.body, Announce):
            raise DroppedError("wrong_kind", f"expected ANNOUNCE, got {Kind(header.kind).name}")
        if header.network != self.network_id:
            raise DroppedError("foreign_network", f"header network {header.network!r}")
        body = msg.body
        try:
            cert = Certificate.from_bytes(body.certificate)
            verify_certificate(
                cert,
                network_id=self.network_id,
                admission_public_key=self.admission_public_key,
                now=now,
                clock_skew_s=self.clock_skew_s,
            )
        except ForeignNetworkError as exc:
            raise DroppedError("foreign_network", str(exc)) from None
        except ExpiredCertificateError as exc:
            raise DroppedError("expired_certificate", str(exc)) from None
        except BadCertificateSignatureError as exc:
            raise DroppedError("bad_certificate", str(exc)) from None
        except (CertificateError, ValueError) as exc:
            # MalformedCertificateError and anything structurally wrong with the bytes.
            raise DroppedError("bad_certificate", str(exc)) from None
        if cert.role != ROLE_PEER:
            raise DroppedError("not_a_peer", f"certificate of {cert.peer_id!r} has role "
                               f"{cert.role!r}: it may query serving peers, never train")
        if cert.peer_id != header.sender:
            raise DroppedError(
                "sender_mismatch",
                f"certificate of {cert.peer_id!r} announced by {header.sender!r}",
            )
        try:
            verify_signature(cert.verify_key, msg.signed_bytes, msg.signature)
        except SignatureError as exc:
            raise DroppedError("bad_signature", f"announce of {header.sender!r}: {exc}") from None
        return body, cert

    def on_announce(self, msg: SignedMessage, now: float) -> Member:
        """Admit or refresh the announcing peer; DroppedError(reason) when any check fails.

        The caller must also check that the MQTT topic's sender level equals
        ``msg.header.sender`` (protocol.topics.check_topic_binding).
        """
        body, cert = self.verify_announce(msg, now)
        seq = msg.header.seq
        current = self._members.get(cert.peer_id)
        if current is not None and seq == current.seq:
            # The same announcement again (QoS 1 redelivery, or the retained copy after a
            # reconnect): it proves nothing new about liveness.
            return current
        highest = self._highest_seq.get(cert.peer_id)
        if highest is not None and seq == highest and self._forgotten.get(cert.peer_id) == seq:
            highest = None  # the announcement it was forgotten at, seen again: not a rollback
        if highest is not None and seq <= highest:
            # Older than what this peer already sent (or a copy of an announcement whose peer
            # has since left or gone silent): a replay must not roll the view back.
            raise DroppedError("stale_announce", f"{cert.peer_id!r} seq {seq} <= {highest}")
        self._highest_seq[cert.peer_id] = seq
        self._forgotten.pop(cert.peer_id, None)
        member = Member(
            public=cert.public,
            model_id=body.model_id,
            param_count=body.param_count,
            last_seen=now,
            expires_at=cert.expires_at,
            seq=seq,
            connection=body.connection,
        )
        self._members[cert.peer_id] = member
        return member

    def on_leave(self, msg: SignedMessage) -> str:
        """Remove a peer on its own signed LEAVE for its current connection; returns its id.

        DroppedError: ``unknown_sender`` (not in the view: nothing to remove), ``bad_signature``
        (not signed by the member's certified key), ``stale_leave`` (names a connection other
        than the one the member's current announcement names: a will or leave of an earlier
        connection, replayed). The connection id, not the sequence number, orders a leave
        against announcements: a last will is signed when its connection opens, so its seq is
        below that connection's announcements.
        """
        if msg.header.kind != Kind.LEAVE or not isinstance(msg.body, Leave):
            raise DroppedError("wrong_kind", f"expected LEAVE, got {Kind(msg.header.kind).name}")
        if msg.header.network != self.network_id:
            raise DroppedError("foreign_network", f"header network {msg.header.network!r}")
        member = self._members.get(msg.header.sender)
        if member is None:
            raise DroppedError("unknown_sender", f"LEAVE from {msg.header.sender!r}")
        try:
            verify_signature(member.public.verify_key, msg.signed_bytes, msg.signature)
        except SignatureError as exc:
            raise DroppedError("bad_signature", f"leave of {msg.header.sender!r}: {exc}") from None
        if msg.body.connection != member.connection:
            raise DroppedError("stale_leave", f"{member.peer_id!r}: leave of another connection")
        highest = self._highest_seq.get(member.peer_id, -1)
        self._highest_seq[member.peer_id] = max(highest, msg.header.seq)
        del self._members[member.peer_id]
        return member.peer_id

    def forget(self, peer_ids: Iterable[str]) -> list[str]:
        """Drop these peers from the view (no longer followed); returns those that were in it.

        Unlike a LEAVE this says nothing about the peer: it may be re-admitted by the same
        announcement it was forgotten at, or any later one (a partial view's lookup or a
        bucket followed again); the seq memory still refuses anything older.
        """
        gone = []
        for peer_id in peer_ids:
            member = self._members.pop(peer_id, None)
            if member is not None:
                self._forgotten[peer_id] = member.seq
                gone.append(peer_id)
        return gone

    # ------------------------------------------------------------------------------ queries
    def get(self, peer_id: str) -> Member | None:
        return self._members.get(peer_id)

    def box_key_of(self, peer_id: str) -> bytes | None:
        """The X25519 public key of a peer in the view (None if unknown)."""
        member = self._members.get(peer_id)
        return None if member is None else member.public.box_key

    def is_live(self, member: Member, now: float) -> bool:
        """Heard from within silence_expiry_s and certificate not expired (skew allowed)."""
        return (
            now - member.last_seen <= self.silence_expiry_s
            and now <= member.expires_at + self.clock_skew_s
        )

    def live(self, now: float) -> list[Member]:
        """Live peers other than this one, ordered by peer id."""
        return [
            m for pid, m in sorted(self._members.items())
            if pid != self.self_id and self.is_live(m, now)
        ]

    def expire(self, now: float) -> list[str]:
        """Remove peers that are silent too long or whose certificate expired; return them."""
        gone = [pid for pid, m in self._members.items() if not self.is_live(m, now)]
        for pid in gone:
            del self._members[pid]
        return gone

    def sample(
        self,
        k: int,
        now: float,
        *,
        model_id: str,
        exclude: Iterable[str] = (),
        param_count: int | None = None,
    ) -> list[str]:
        """Up to ``k`` distinct live peer ids, uniformly at random (CSPRNG), never self.

        Only peers training ``model_id`` (and, when given, with ``param_count`` parameters) are
        candidates: a group must agree on the coordinate space. Fewer than ``k`` are returned
        when fewer qualify; the caller decides whether that is enough for a session.
        """
        if k < 0:
            raise ValueError("k must be >= 0")
        excluded = set(exclude)
        candidates = [pid for pid in self.eligible(now, model_id=model_id,
                                                   param_count=param_count)
                      if pid not in excluded]
        return self._random.sample(candidates, min(k, len(candidates)))

    def eligible(self, now: float, *, model_id: str, param_count: int | None = None) -> list[str]:
        """Live peers other than this one that could join its session: training ``model_id``
        (with ``param_count`` parameters, when given), ordered by peer id."""
        return [
            m.peer_id
            for m in self.live(now)
            if m.model_id == model_id
            and (param_count is None or m.param_count == param_count)
        ]

    def peer_ids(self) -> list[str]:
        """Every peer in the view now, live or not yet expired, ordered by id."""
        return sorted(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._members
