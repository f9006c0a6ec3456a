"""Pairwise and self masks for one-vector secure aggregation (the masked session).

The construction is that of Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning" (CCS 2017), over Murmur's field (``crypto.field``):

* Every member ``u`` of a session holds a fresh X25519 key pair for that session only
  (:class:`EphemeralKey`) and a fresh 32-byte self-mask seed ``b_u``.
* Each pair ``(u, v)`` derives a shared seed from their ephemeral keys (libsodium's
  ``crypto_box_beforenm``: X25519, then HSalsa20) and the session id (:func:`pair_seed`); the
  seed expands into a field vector ``m_uv`` over the session's coordinates
  (:func:`expand_field`: the ChaCha20 keystream of ``randombytes_buf_deterministic``). The
  member that comes first in the session's member order adds ``m_uv``, the other subtracts
  it, so every pairwise mask cancels in the sum of the group's vectors.
* Each member also adds ``expand(b_u)``, so that its vector stays hidden even if the others'
  pairwise masks with it are later removed because it was (wrongly) declared dropped.

Masked vector: ``y_u = x_u + expand(b_u) + Σ_{v after u} m_uv − Σ_{v before u} m_uv  (mod p)``.
The sum of the survivors' vectors, minus their self masks, minus the pairwise masks they
share with members whose vectors never arrived, is the sum of the survivors' inputs
(:func:`unmask_sum`). Recovering those masks needs the survivors' self-mask seeds and the
dropped members' ephemeral private keys; both are Shamir-shared among the members
(:func:`share_secret`), and an honest member reveals, for each member, one or the other, never
both. That rule, and the consistency check that precedes it, are the session's business
(docs/protocol.md); this module is the arithmetic.

Security properties (given the rule above and at most ``t - 1`` colluding members): a member's
masked vector is uniformly distributed to anyone lacking its self-mask seed and at least one of
its pairwise seeds; :func:`share_secret` hides a seed information-theoretically from ``t - 1``
shares. Seeds are bound to the session id and to both member ids (:func:`pair_seed`), so masks
of one session or pair never reappear in another. Pure: numpy and PyNaCl, no I/O.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain

import nacl.bindings
import nacl.exceptions
import nacl.public
import numpy as np

from crypto.errors import CryptoError
from crypto.field import FIELD_DTYPE, PRIME, check_field
from crypto.shamir import Share, reconstruct, split

SEED_BYTES = 32
KEY_BYTES = 32
#: BLAKE2b personalisations (16 bytes at most): one label per derived value.
PAIR_LABEL = b"murmur:pairmask"
SELF_LABEL = b"murmur:selfmask"
#: A 32-byte secret travels in Shamir shares as 16 field elements of 16 bits each.
_SECRET_CHUNKS = 16
_CHUNK_BITS = 16

_P32 = np.uint32(PRIME)


class MaskError(CryptoError):
    """A mask cannot be derived or removed: bad key, unknown member, inconsistent sets."""


@dataclass(frozen=True)
class EphemeralKey:
    """One member's X25519 key pair for one session; never reused, never a long-term key."""

    private: bytes

    @classmethod
    def generate(cls) -> EphemeralKey:
        return cls(bytes(nacl.public.PrivateKey.generate()))

    def __post_init__(self) -> None:
        if len(self.private) != KEY_BYTES:
            raise MaskError(f"ephemeral private key must be {KEY_BYTES} bytes")

    @property
    def public(self) -> bytes:
        return bytes(nacl.public.PrivateKey(self.private).public_key)

    def __repr__(self) -> str:  # never print the secret
        return f"EphemeralKey(public={self.public.hex()[:16]}...)"


def _framed(*parts: bytes) -> bytes:
    """Length-prefixed concatenation: no two different part lists give the same bytes."""
    return b"".join(len(p).to_bytes(2, "big") + p for p in parts)


def pair_seed(own: EphemeralKey, own_id: str, peer_public: bytes, peer_id: str,
              session_id: bytes) -> bytes:
    """The 32-byte seed of the pairwise mask of ``own_id`` and ``peer_id`` in this session.

    Symmetric: both members derive the same seed. BLAKE2b keyed with the X25519+HSalsa20
    shared key, personalised with :data:`PAIR_LABEL`, over the session id and the two ids in
    sorted order. MaskError on an unusable public key (wrong length, low order).
    """
    if len(peer_public) != KEY_BYTES:
        raise MaskError(f"ephemeral public key must be {KEY_BYTES} bytes")
    if own_id == peer_id:
        raise MaskError("a member has no pairwise mask with itself")
    try:
        shared = nacl.bindings.crypto_box_beforenm(bytes(peer_public), own.private)
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise MaskError(f"unusable ephemeral public key of {peer_id!r}: {exc}") from None
    first, second = sorted((own_id, peer_id))
    data = _framed(session_id, first.encode(), second.encode())
    return hashlib.blake2b(data, key=shared, digest_size=SEED_BYTES,
                           person=PAIR_LABEL).digest()


def self_seed_key(self_seed: bytes, session_id: bytes) -> bytes:
    """The expansion key of a member's self mask (its seed bound to the session)."""
    if len(self_seed) != SEED_BYTES:
        raise MaskError(f"self-mask seed must be {SEED_BYTES} bytes")
    return hashlib.blake2b(_framed(session_id), key=self_seed, digest_size=SEED_BYTES,
                           person=SELF_LABEL).digest()


def new_self_seed() -> bytes:
    return os.urandom(SEED_BYTES)


def expand_field(seed: bytes, count: int) -> np.ndarray:
    """``count`` field elements, uniform on [0, p), from the ChaCha20 keystream of ``seed``.

    Deterministic (both members of a pair get the same vector). Each 32-bit word is masked to
    31 bits; a word equal to p is skipped and the next unused word of the stream takes its
    place, so the elements are exactly uniform and the result depends only on the seed.
    """
    if len(seed) != SEED_BYTES:
        raise MaskError(f"seed must be {SEED_BYTES} bytes")
    if count < 0:
        raise MaskError(f"count must be >= 0, got {count}")
    words = count
    while True:
        stream = nacl.bindings.randombytes_buf_deterministic(4 * words, seed)
        values = np.bitwise_and(np.frombuffer(stream, dtype="<u4"), _P32, dtype=FIELD_DTYPE)
        rejected = values == _P32
        if words == count and not rejected.any():
            return values  # the usual case: no word to skip, no copy to compact
        kept = values[~rejected]
        if kept.size >= count:
            return np.ascontiguousarray(kept[:count])
        words += count - kept.size + 8  # p itself appears with probability 2**-31 per word


def combine(base: np.ndarray, added: Iterable[np.ndarray] = (),
            subtracted: Iterable[np.ndarray] = ()) -> np.ndarray:
    """``base + Σ added − Σ subtracted`` over the field, element-wise.

    Why not one modular add per vector: the reduction (an integer division per element)
    costs several times the addition, so the terms are summed in 64 bits and reduced once.
    Subtracted vectors are summed apart and taken from ``count × p`` added to the total,
    which keeps every intermediate non-negative. Every term is below 2**31, so 64 bits hold
    the sum of 2**32 of them, far more than a session combines (a few hundred at most).
    """
    total = base.astype(np.uint64)
    minus: np.ndarray | None = None
    for vector in added:
        np.add(total, vector, out=total)
    count = 0
    for vector in subtracted:
        if minus is None:
            minus = vector.astype(np.uint64)
        else:
            np.add(minus, vector, out=minus)
        count += 1
    if minus is not None:
        np.add(total, np.uint64(count * PRIME), out=total)
        np.subtract(total, minus, out=total)
    np.remainder(total, np.uint64(PRIME), out=total)
    return total.astype(FIELD_DTYPE)


def _position(members: Sequence[str], member: str) -> int:
    try:
        return list(members).index(member)
    except ValueError:
        raise MaskError(f"{member!r} is not a member of this session") from None


def mask_vector(values: np.ndarray, *, me: str, members: Sequence[str], key: EphemeralKey,
                publics: Mapping[str, bytes], self_seed: bytes,
                session_id: bytes) -> np.ndarray:
    """``y = x + self mask + Σ_{v after me} m − Σ_{v before me} m`` over the field."""
    check_field(values, "values")
    mine = _position(members, me)
    count = values.shape[0]
    for other in members:
        if other != me and other not in publics:
            raise MaskError(f"no ephemeral public key of {other!r}")

    def pair_masks(after_me: bool) -> Iterator[np.ndarray]:
        # one mask in memory at a time
        for index, other in enumerate(members):
            if other != me and (mine < index) is after_me:
                yield expand_field(pair_seed(key, me, publics[other], other, session_id), count)

    self_mask = expand_field(self_seed_key(self_seed, session_id), count)
    return combine(values, chain([self_mask], pair_masks(True)), pair_masks(False))


def unmask_sum(masked_sum: np.ndarray, *, members: Sequence[str], survivors: Sequence[str],
               publics: Mapping[str, bytes], self_seeds: Mapping[str, bytes],
               dropped_keys: Mapping[str, EphemeralKey], session_id: bytes) -> np.ndarray:
    """The sum of the survivors' inputs from the sum of their masked vectors.

    ``self_seeds`` holds every survivor's self-mask seed; ``dropped_keys`` every dropped
    member's ephemeral key (members minus survivors). MaskError when a set does not match.
    """
    check_field(masked_sum, "masked_sum")
    alive = set(survivors)
    if len(alive) != len(survivors) or not alive <= set(members):
        raise MaskError("survivors must be distinct members")
    dropped = [m for m in members if m not in alive]
    if set(self_seeds) != alive:
        raise MaskError("need exactly the survivors' self-mask seeds")
    if set(dropped_keys) != set(dropped):
        raise MaskError("need exactly the dropped members' ephemeral keys")
    count = masked_sum.shape[0]
    for member in survivors:
        if dropped and member not in publics:
            raise MaskError(f"no ephemeral public key of {member!r}")

    def dropped_pair_masks(survivor_first: bool) -> Iterator[np.ndarray]:
        # the survivor added the mask if it comes first, else subtracted it: undo that
        for gone in dropped:
            gone_at = _position(members, gone)
            for member in survivors:
                if (_position(members, member) < gone_at) is survivor_first:
                    yield expand_field(pair_seed(dropped_keys[gone], gone, publics[member],
                                                 member, session_id), count)

    self_masks = (expand_field(self_seed_key(self_seeds[member], session_id), count)
                  for member in survivors)
    return combine(masked_sum, dropped_pair_masks(False),
                   chain(self_masks, dropped_pair_masks(True)))


def encode_secret(secret: bytes) -> np.ndarray:
    """A 32-byte secret as 16 field elements of 16 bits (big-endian chunks)."""
    if len(secret) != SEED_BYTES:
        raise MaskError(f"secret must be {SEED_BYTES} bytes")
    return np.frombuffer(secret, dtype=">u2").astype(FIELD_DTYPE)


def decode_secret(elements: np.ndarray) -> bytes:
    """Inverse of :func:`encode_secret`; MaskError if an element is not a 16-bit chunk."""
    check_field(elements, "secret elements")
    if elements.shape != (_SECRET_CHUNKS,) or int(elements.max()) >= 1 << _CHUNK_BITS:
        raise MaskError("shares do not rebuild a 32-byte secret (wrong or forged shares)")
    return elements.astype(">u2").tobytes()


def share_secret(secret: bytes, *, n: int, t: int) -> list[Share]:
    """Shamir shares (t of n) of a 32-byte secret: a seed or an ephemeral private key."""
    return split(encode_secret(secret), n=n, t=t)


def recover_secret(shares: Sequence[Share], *, t: int) -> bytes:
    """The secret from ``t`` shares of :func:`share_secret`."""
    return decode_secret(reconstruct(shares, t=t))
