"""Messages and session sealing of the masked aggregation session (``[session] kind = "masked"``).

docs/design/masked-sessions.md is the specification. The bodies are frozen dataclasses with
the design's field names, defined in ``protocol.messages`` (kinds 10-16, docs/protocol.md)
and imported here; the session reads the signed envelope's ``protocol.messages.Header``
(kind, sender, session, seq), and "signed by member m" is ``sender == m`` because the node's
inbound checks verify envelope signatures before a session ever sees a message. INVITE,
DECLINE and ABORT keep the Shamir session's bodies (``protocol.messages``).

Session sealing (MASKED, REVEAL): ``nacl.secret.SecretBox`` under the session key K, the
plaintext being ``BLAKE2b-256(context) || payload`` as ``crypto.sealing.seal`` does for Box.
The context binds network, session, sender, kind and seq, so a session-sealed payload opens
only as the message it was sealed as: not in another session, not under another sender, kind
or sequence number. Only members hold K (it reaches each one sealed for it in START), so the
broker cannot open, add or forge masked vectors.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum

import nacl.exceptions
import nacl.secret
import numpy as np

from crypto.errors import SealError
from crypto.field import field_from_bytes, field_to_bytes
from crypto.masking import EphemeralKey, MaskError, recover_secret
from crypto.shamir import Share
from protocol import messages as m
from protocol.messages import Confirm, Keys, Masked, Reveal, Survivors
from protocol.messages import MaskedAccept as Accept
from protocol.messages import MaskedStart as Start

SESSION_KEY_BYTES = nacl.secret.SecretBox.KEY_SIZE  # 32
EPHEMERAL_PUBLIC_BYTES = 32
DIGEST_BYTES = 32
#: field elements of one Shamir share of a 32-byte secret (crypto.masking.share_secret)
SECRET_SHARE_ELEMENTS = 16
SESSION_SEAL_DOMAIN = b"murmur/v3/session-seal\x00"
VIEW_DOMAIN = b"murmur/v3/session-view\x00"


MaskedBody = (m.Invite | Accept | Start | Keys | Masked | Survivors | Confirm | Reveal | m.Abort
              | m.Decline)

#: The wire kinds a masked session speaks and the body each carries; any other kind is an
#: ``unexpected_kind`` drop. A DECLINE is, to the initiator, the invitee's ABORT.
BODY_TYPES: dict[m.Kind, type] = {
    m.Kind.INVITE: m.Invite, m.Kind.MASKED_ACCEPT: Accept, m.Kind.MASKED_START: Start,
    m.Kind.KEYS: Keys, m.Kind.MASKED: Masked, m.Kind.SURVIVORS: Survivors,
    m.Kind.CONFIRM: Confirm, m.Kind.REVEAL: Reveal, m.Kind.ABORT: m.Abort,
    m.Kind.DECLINE: m.Decline,
}


@dataclass(frozen=True)
class MaskedTimeouts:
    """Per-phase timeouts in seconds (each phase's deadline is set when the phase begins)."""

    invite_s: float = 2.0  # initiator: waiting for ACCEPT/DECLINE
    start_s: float = 4.0  # invitee: waiting for START after accepting
    keys_s: float = 5.0  # waiting for KEYS from every other member
    masked_s: float = 5.0  # initiator: collecting MASKED before it sends SURVIVORS
    survivors_s: float = 8.0  # invitee: waiting for SURVIVORS after publishing MASKED
    confirm_s: float = 5.0  # waiting for a quorum of matching CONFIRMs
    reveal_s: float = 5.0  # waiting for t REVEALs and every survivor's MASKED


class RevealKind(IntEnum):
    SELF_SEED = 1
    EPHEMERAL_KEY = 2


def confirm_quorum(group_size: int, threshold: int) -> int:
    """CONFIRMs (own included) naming one list that a member needs before it reveals.

    A split view needs two lists that each reach the quorum. The colluders (the initiator,
    which signs every list it sends, may be one of them) can confirm both; each honest member
    confirms one. With c colluders both lists reach q only if 2q <= g + c. Every member of a
    group runs with some c < t (SessionParams refuses c >= t), so the quorum assumes the most
    any of them may: c = t - 1, and q = max(t, floor((g + t - 1) / 2) + 1) is one number for
    the whole session, bound by g and t in every member's view. A quorum computed from each
    member's own c would let a member with a small c be split away from those with a larger
    one (tests/test_sum_invariant.py). q is at least c + 2 for every c <= g - 2 a member may
    run with: 3 at g = 3, 4 at g = 5, 7 at g = 8 with t = 5.
    """
    return max(threshold, (group_size + threshold - 1) // 2 + 1)


@dataclass(frozen=True)
class SessionSealContext:
    """What a session-sealed payload is bound to: network, session, sender, kind, seq.

    The kind enters the digest as its lower-case name (``"masked"``, ``"reveal"``: the only
    session-sealed kinds)."""

    network_id: str
    session_id: bytes
    sender: str
    kind: m.Kind
    seq: int

    def digest(self) -> bytes:
        parts = [SESSION_SEAL_DOMAIN]
        for name in (self.network_id, self.sender, self.kind.name.lower()):
            raw = name.encode()
            parts.append(struct.pack(">H", len(raw)) + raw)
        parts.append(struct.pack(">H", len(self.session_id)) + self.session_id)
        parts.append(struct.pack(">Q", self.seq))
        return hashlib.blake2b(b"".join(parts), digest_size=DIGEST_BYTES).digest()


def session_seal(key: bytes, context: SessionSealContext, payload: bytes) -> bytes:
    """SecretBox (XSalsa20-Poly1305, random nonce) of ``digest(context) || payload``."""
    return bytes(nacl.secret.SecretBox(key).encrypt(context.digest() + payload))


def session_open(key: bytes, context: SessionSealContext, sealed: bytes) -> bytes:
    """Open a session-sealed payload and check its context; SealError on any failure."""
    try:
        opened = nacl.secret.SecretBox(key).decrypt(bytes(sealed))
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise SealError("cannot open session-sealed payload (tampered, or wrong key)") from None
    if len(opened) < DIGEST_BYTES or not hmac.compare_digest(opened[:DIGEST_BYTES],
                                                             context.digest()):
        raise SealError("session-sealed payload is bound to a different context")
    return opened[DIGEST_BYTES:]


def view_digest(network_id: str, session_id: bytes, members: Sequence[str], threshold: int,
                coordinates: np.ndarray, publics: Sequence[bytes], session_key: bytes) -> bytes:
    """Digest of everything START told a member. Each KEYS carries it, sealed pairwise, so two
    honest members mask only if the initiator told them the same group, keys and K."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, key=session_key)
    h.update(VIEW_DOMAIN + network_id.encode() + b"\x00" + session_id)
    for member, public in zip(members, publics, strict=True):
        h.update(struct.pack(">H", len(member)) + member.encode() + public)
    h.update(struct.pack(">I", threshold))
    h.update(np.ascontiguousarray(coordinates, dtype="<u4").tobytes())
    return h.digest()


def encode_keys(view: bytes, ephemeral_share: np.ndarray, seed_share: np.ndarray) -> bytes:
    return view + field_to_bytes(np.concatenate([ephemeral_share, seed_share]))


def decode_keys(plain: bytes) -> tuple[bytes, np.ndarray, np.ndarray]:
    """(view digest, ephemeral-key share, self-seed share); ValueError if malformed."""
    if len(plain) != DIGEST_BYTES + 2 * SECRET_SHARE_ELEMENTS * 4:
        raise ValueError("KEYS payload has the wrong length")
    values = field_from_bytes(plain[DIGEST_BYTES:])
    return plain[:DIGEST_BYTES], values[:SECRET_SHARE_ELEMENTS], values[SECRET_SHARE_ELEMENTS:]


def encode_reveal(entries: Sequence[tuple[RevealKind, np.ndarray]]) -> bytes:
    """One entry per member in member order: a kind byte and a 16-element share."""
    return b"".join(bytes([kind]) + field_to_bytes(share) for kind, share in entries)


def decode_reveal(plain: bytes, members: int) -> list[tuple[RevealKind, np.ndarray]]:
    """Inverse of :func:`encode_reveal`; ValueError if malformed."""
    size = 1 + SECRET_SHARE_ELEMENTS * 4
    if len(plain) != members * size:
        raise ValueError("REVEAL payload has the wrong length")
    out = []
    for i in range(members):
        chunk = plain[i * size:(i + 1) * size]
        out.append((RevealKind(chunk[0]), field_from_bytes(chunk[1:])))
    return out


def recover_secrets(members: Sequence[str], survivors: Sequence[str],
                    publics: Mapping[str, bytes], threshold: int,
                    reveals: Mapping[int, Sequence[tuple[RevealKind, np.ndarray]]],
                    ) -> tuple[dict[str, bytes], dict[str, EphemeralKey]]:
    """Survivors' self seeds and dropped members' ephemeral keys from ``threshold`` REVEALs
    (keyed by the revealer's Shamir x). MaskError when a rebuilt key does not match its
    public key or a secret is not 32 bytes: forged shares, never a wrong result."""
    seeds: dict[str, bytes] = {}
    dropped: dict[str, EphemeralKey] = {}
    for i, v in enumerate(members):
        shares = [Share(x, entries[i][1]) for x, entries in reveals.items()]
        secret = recover_secret(shares, t=threshold)
        if v in survivors:
            seeds[v] = secret
            continue
        dropped[v] = EphemeralKey(secret)
        if dropped[v].public != publics[v]:
            raise MaskError(f"rebuilt ephemeral key of {v!r} does not match its public key")
    return seeds, dropped
