"""What every party of private predictions does with the wire: sign and frame its messages,
and check an inbound one (topic, size, strict decode, network, topic binding, the sender's
certificate and role, its signature, the replay window) before anything is opened.

Security property: a message is handled only if it is well-formed, on a topic that matches its
signed header, signed by the key a valid admission certificate of the expected role binds to
its sender, and not a replay; every other message is a counted drop (``DroppedError``).
Inference messages carry the certificate they are checked against (SNAPSHOT_SHARE, SERVE and
QUERY do; an ANSWER comes from a server whose SERVE was checked), so no party needs the
training membership. A snapshot's description is trusted only under its owner's signature
(:meth:`InferenceEndpoint.signed_description`): the owner's certificate (role ``peer``) and an
Ed25519 signature by the owner's identity key over the exact description bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from crypto.admission import Certificate, verify_certificate
from crypto.errors import (
    CertificateError,
    ExpiredCertificateError,
    ReplayError,
    SealError,
    SignatureError,
    StaleMessageError,
)
from crypto.identity import Identity, PublicIdentity, verify_signature
from crypto.replay import ReplayWindow
from crypto.sealing import SealContext, open_sealed, seal
from peer.errors import DroppedError
from peer.network.counters import DropCounter
from peer.network.inbound import decode_bound
from protocol.codec import encode_message
from protocol.errors import ProtocolError
from protocol.inference import SnapshotDescription, encode_description
from protocol.messages import (
    PROTOCOL_VERSION,
    Announce,
    Body,
    Header,
    Kind,
    SequenceCounter,
    SignedMessage,
)
from protocol.topics import ParsedTopic, parse_topic


@dataclass
class InferenceEndpoint:
    """One party's keys, certificate and inbound checks (serving peer, owner or client)."""

    identity: Identity
    certificate: bytes
    network_id: str
    admission_public_key: bytes
    clock_skew_s: float = 300.0
    drops: DropCounter = field(default=None)  # type: ignore[assignment]
    replay: ReplayWindow = field(default_factory=ReplayWindow)
    seq: SequenceCounter = field(default_factory=SequenceCounter)

    def __post_init__(self) -> None:
        if self.drops is None:
            self.drops = DropCounter(self.identity.peer_id)

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    # ------------------------------------------------------------------------------ sending
    def frame(self, kind: Kind, snapshot_id: bytes, body: Body, seq: int | None = None) -> bytes:
        """The signed wire bytes of one message of ``snapshot_id``."""
        header = Header(PROTOCOL_VERSION, self.network_id, kind, self.peer_id, snapshot_id,
                        self.seq.next() if seq is None else seq)
        return encode_message(header, body, self.identity.sign)

    def sign_description(self, description: SnapshotDescription) -> tuple[bytes, bytes]:
        """(description bytes, this owner's signature over them), with the identity key."""
        raw = encode_description(description)
        return raw, self.identity.sign(raw)

    def seal_for(self, recipient: PublicIdentity, snapshot_id: bytes, seq: int,
                 payload: bytes | memoryview) -> bytes:
        context = SealContext(self.network_id, snapshot_id, self.peer_id, recipient.peer_id, seq)
        return seal(self.identity, recipient.box_key, context, payload)

    def open_from(self, sender: PublicIdentity, msg: SignedMessage, sealed: bytes) -> bytes:
        """Open a payload ``sender`` sealed for us in ``msg``; DroppedError('bad_seal')."""
        header = msg.header
        context = SealContext(self.network_id, header.session, sender.peer_id, self.peer_id,
                              header.seq)
        try:
            return open_sealed(self.identity, sender.box_key, context, sealed)
        except SealError as exc:
            raise DroppedError("bad_seal", f"{sender.peer_id}: {exc}") from None

    # ------------------------------------------------------------------------------ receiving
    def decode(self, topic: str, payload: bytes) -> tuple[ParsedTopic, SignedMessage]:
        """Topic layout, size, strict decode, network and topic binding."""
        try:
            parsed = parse_topic(self.network_id, topic)
        except ProtocolError as exc:
            raise DroppedError("bad_topic", str(exc)) from None
        msg = decode_bound(self.network_id, parsed, payload)
        if parsed.recipient is not None and parsed.recipient != self.peer_id:
            raise DroppedError("wrong_recipient")
        return parsed, msg

    def certified(self, raw: bytes, sender: str, role: str) -> PublicIdentity:
        """The sender's identity from its certificate, which must be valid, of ``role`` and its
        own; DroppedError otherwise."""
        try:
            cert = Certificate.from_bytes(raw)
            public = verify_certificate(cert, network_id=self.network_id,
                                        admission_public_key=self.admission_public_key,
                                        now=time.time(), clock_skew_s=self.clock_skew_s)
        except ExpiredCertificateError as exc:
            raise DroppedError("expired_certificate", str(exc)) from None
        except (CertificateError, ValueError) as exc:
            raise DroppedError("bad_certificate", str(exc)) from None
        if cert.role != role:
            raise DroppedError("wrong_role", f"{cert.peer_id!r} is a {cert.role}, not a {role}")
        if cert.peer_id != sender:
            raise DroppedError("sender_mismatch", f"certificate of {cert.peer_id!r}")
        return public

    def announced_peer(self, msg: SignedMessage) -> PublicIdentity:
        """The identity an ANNOUNCE carries: its certificate valid, of a peer and the sender's,
        and the message signed under it; DroppedError otherwise. No replay window: a retained
        announcement is delivered again to every new subscriber."""
        assert isinstance(msg.body, Announce)
        public = self.certified(msg.body.certificate, msg.header.sender, "peer")
        try:
            verify_signature(public.verify_key, msg.signed_bytes, msg.signature)
        except SignatureError:
            raise DroppedError("bad_signature", msg.header.sender) from None
        return public

    def authenticate(self, msg: SignedMessage, sender: PublicIdentity) -> None:
        """The signature under the sender's certified key, then the replay window."""
        try:
            verify_signature(sender.verify_key, msg.signed_bytes, msg.signature)
        except SignatureError:
            raise DroppedError("bad_signature", sender.peer_id) from None
        try:
            self.replay.check(msg.header.sender, msg.header.seq)
        except StaleMessageError:
            raise DroppedError("stale", msg.header.sender) from None
        except ReplayError:
            raise DroppedError("replay", msg.header.sender) from None

    def signed_description(self, owner_certificate: bytes, description: SnapshotDescription,
                           raw: bytes, signature: bytes,
                           snapshot_id: bytes) -> PublicIdentity:
        """The owner's identity if ``raw`` (decoded as ``description``) is signed by the peer it
        names as owner, for this network and ``snapshot_id``; DroppedError otherwise
        (``bad_description``, ``bad_description_signature`` or a certificate reason)."""
        if description.network != self.network_id:
            raise DroppedError("bad_description", f"network {description.network!r}")
        if description.snapshot_id != snapshot_id:
            raise DroppedError("bad_description", "signed for another snapshot id")
        owner = self.certified(owner_certificate, description.owner, "peer")
        try:
            verify_signature(owner.verify_key, raw, signature)
        except SignatureError:
            raise DroppedError("bad_description_signature", description.owner) from None
        return owner
