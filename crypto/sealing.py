"""Sealing a payload for exactly one recipient, bound to its context.

Construction: ``nacl.public.Box`` (X25519 key agreement + XSalsa20-Poly1305) between the
sender's box secret key and the recipient's box public key, with a fresh random 24-byte
nonce per message. The plaintext actually encrypted is ``BLAKE2b-256(context) || payload``
where ``context`` is the canonical encoding of :class:`SealContext`.

Security properties:
- Confidentiality and integrity of the payload against everyone but sender and recipient
  (the broker, other members): any modified byte fails Poly1305 -> SealError.
- Sender authentication: Box is keyed by both parties' keys, so only the holder of the
  sender's box secret key (or the recipient itself) can produce a valid box for this pair.
- Context binding: opening checks that the sealed digest equals the digest of the context the
  recipient expects (network, session, sender, recipient, seq), so a sealed share cannot be
  replayed into another session or under another sequence number, nor redirected to another
  recipient (which could not open it anyway) or claimed by another sender. This also stops
  reflection: Box's shared key is the same in both directions, but a box B sealed for A names
  sender B and recipient A, so it does not open as a message from A to B.
- Nonces are random (192 bits), so nonce reuse is negligible even across restarts.

The ciphertext layout is ``nonce (24) || Poly1305 tag (16) || ciphertext``, the same as
``Box.encrypt``; we call libsodium's ``crypto_box_easy_afternm`` with the Box's precomputed
shared key because ``Box.encrypt`` makes three extra copies of a multi-megabyte share.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.utils

from crypto.errors import SealError
from crypto.identity import KEY_BYTES, Identity, check_name

SEAL_DOMAIN = b"murmur/v1/seal\x00"
SESSION_ID_BYTES = 16
MAX_SEQ = 2**63
DIGEST_BYTES = 32
NONCE_BYTES = nacl.bindings.crypto_box_NONCEBYTES
MAC_BYTES = nacl.bindings.crypto_box_ZEROBYTES - nacl.bindings.crypto_box_BOXZEROBYTES  # 16
#: bytes a sealed payload adds to the plaintext
SEAL_OVERHEAD = NONCE_BYTES + MAC_BYTES + DIGEST_BYTES


@dataclass(frozen=True)
class SealContext:
    """Everything a sealed payload is bound to. Validated on construction (ValueError)."""

    network_id: str
    session_id: bytes
    sender: str
    recipient: str
    seq: int

    def __post_init__(self) -> None:
        check_name(self.network_id, "network id")
        check_name(self.sender, "sender")
        check_name(self.recipient, "recipient")
        if not isinstance(self.session_id, bytes) or len(self.session_id) != SESSION_ID_BYTES:
            raise ValueError(f"session id must be {SESSION_ID_BYTES} bytes")
        if isinstance(self.seq, bool) or not isinstance(self.seq, int):
            raise ValueError("seq must be an int")
        if not 0 <= self.seq < MAX_SEQ:
            raise ValueError("seq must be in [0, 2**63)")

    def canonical(self) -> bytes:
        """Unambiguous encoding: domain tag, length-prefixed names, session id, u64 seq."""
        parts = [SEAL_DOMAIN]
        for name in (self.network_id, self.sender, self.recipient):
            raw = name.encode("ascii")
            parts.append(bytes([len(raw)]) + raw)
        parts.append(self.session_id)
        parts.append(struct.pack(">Q", self.seq))
        return b"".join(parts)

    def digest(self) -> bytes:
        return hashlib.blake2b(self.canonical(), digest_size=DIGEST_BYTES).digest()


def _shared_key(own: nacl.public.PrivateKey, peer_box_key: bytes) -> bytes:
    if len(peer_box_key) != KEY_BYTES:
        raise SealError(f"box key must be {KEY_BYTES} bytes, got {len(peer_box_key)}")
    try:
        return nacl.public.Box(own, nacl.public.PublicKey(bytes(peer_box_key))).shared_key()
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise SealError(f"unusable box key: {exc}") from None


def seal(
    sender: Identity,
    recipient_box_key: bytes,
    context: SealContext,
    plaintext: bytes | bytearray | memoryview,
) -> bytes:
    """Encrypt ``plaintext`` for the holder of ``recipient_box_key``, bound to ``context``.

    ``plaintext`` may be any contiguous bytes-like object (e.g. ``crypto.field.field_view``),
    which saves a copy of a large share.

    ``context.sender`` must be ``sender.peer_id`` (ValueError otherwise: a programming error).
    """
    if context.sender != sender.peer_id:
        raise ValueError(f"context sender {context.sender!r} is not {sender.peer_id!r}")
    key = _shared_key(sender.box_private_key, recipient_box_key)
    nonce = nacl.utils.random(NONCE_BYTES)
    message = b"".join((context.digest(), plaintext))
    boxed = nacl.bindings.crypto_box_easy_afternm(message, nonce, key)
    return nonce + boxed


def open_sealed(
    recipient: Identity, sender_box_key: bytes, context: SealContext, sealed: bytes
) -> bytes:
    """Decrypt and check the bound context; SealError on any failure.

    Fails if a byte was changed, if the box was not made by ``sender_box_key``'s owner for this
    recipient, or if it was sealed under a different network/session/sender/recipient/seq.
    """
    if context.recipient != recipient.peer_id:
        raise SealError(f"context recipient {context.recipient!r} is not {recipient.peer_id!r}")
    if len(sealed) < SEAL_OVERHEAD:
        raise SealError(f"sealed payload too short ({len(sealed)} bytes)")
    key = _shared_key(recipient.box_private_key, sender_box_key)
    view = memoryview(sealed)
    try:
        opened = nacl.bindings.crypto_box_open_easy_afternm(
            bytes(view[NONCE_BYTES:]), bytes(view[:NONCE_BYTES]), key
        )
    except nacl.exceptions.CryptoError:
        raise SealError("cannot open sealed payload (tampered, or wrong keys)") from None
    if not hmac.compare_digest(opened[:DIGEST_BYTES], context.digest()):
        raise SealError("sealed payload is bound to a different context")
    return opened[DIGEST_BYTES:]
