"""Shamir secret sharing of field vectors, vectorised with numpy.

``split(secret, n=n, t=t)`` hides each element ``s`` of the secret in a random polynomial ``f``
of degree ``t - 1`` with ``f(0) = s`` and hands share ``x`` the value ``f(x)`` for
``x = 1..n``. Any ``t`` shares rebuild ``s`` by Lagrange interpolation at 0; any ``t - 1``
shares are jointly uniform and independent of ``s`` (information-theoretic hiding). ``t == n``
is g-of-g sharing; ``t == 1`` hides nothing and is allowed only for completeness.

Shares are linear: adding the shares of several secrets point-wise (``add_shares``) gives a
share of the sum, which is how a group aggregates without anyone seeing a member's vector.

How it is fast. Instead of drawing the polynomial's coefficients and evaluating it (Horner:
multiplications and modular reductions), ``split`` draws the polynomial's forward differences
``D_k = Δ^k f(0)`` for ``k = 1..t-1`` uniformly and walks ``x = 1..n`` with additions only:
``f(x+1) = f(x) + Δf(x)`` and ``Δ^k f(x+1) = Δ^k f(x) + Δ^{k+1} f(x)``. By Newton's forward
formula ``f(x) = Σ_k C(x, k) Δ^k f(0)`` the map from coefficients to forward differences is an
invertible linear map on F_p^(t-1) (``C(x, k)`` has leading coefficient ``1/k!``, invertible
since ``k < p``), so uniform differences are exactly uniform coefficients: the distribution of
the shares is that of textbook Shamir. Each modular addition is three ``uint32`` operations on
cache-sized blocks.

Randomness: libsodium's ``randombytes_buf_deterministic`` (the ChaCha20 keystream, i.e. the
encryption of zero bytes) under a fresh 32-byte key from ``os.urandom`` for every 32 KiB of
output (one ``os.urandom`` call supplies the keys of a whole block). Each 32-bit
word is masked to 31 bits, which is uniform on ``[0, 2**31 - 1] = [0, p]``; a word equal to
``p`` (probability 2**-31) is redrawn, so elements are exactly uniform on ``[0, p)``.
Never a seeded PRNG.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import nacl.bindings
import numpy as np

from crypto.field import BLOCK, FIELD_DTYPE, PRIME, check_field, mod_add_into

_P32 = np.uint32(PRIME)
_P64 = np.uint64(PRIME)
_SHIFT31 = np.uint64(31)
_SEED_BYTES = 32  # randombytes_SEEDBYTES
# 32 KiB keystream pieces: measured 2x faster than larger calls, whose big buffers are
# freshly mmapped (page faults) on every call.
_KEYSTREAM_WORDS = 8192


@dataclass(frozen=True)
class Share:
    """One share of a vector: the evaluations f(x) at the holder's point ``x`` (1..n)."""

    x: int
    values: np.ndarray


def random_field(shape: tuple[int, ...]) -> np.ndarray:
    """Uniform canonical field elements from a CSPRNG (see module docstring)."""
    count = int(np.prod(shape))
    out = np.empty(count, dtype=FIELD_DTYPE)
    pieces = -(-count // _KEYSTREAM_WORDS)
    # One syscall for all the per-piece keys; each piece is the keystream of its own fresh key.
    keys = os.urandom(_SEED_BYTES * pieces)
    for piece in range(pieces):
        start = piece * _KEYSTREAM_WORDS
        stop = min(start + _KEYSTREAM_WORDS, count)
        stream = nacl.bindings.randombytes_buf_deterministic(
            4 * (stop - start), keys[piece * _SEED_BYTES : (piece + 1) * _SEED_BYTES]
        )
        np.bitwise_and(np.frombuffer(stream, dtype=np.uint32), _P32, out=out[start:stop])
    # Rejection of the single value p keeps the distribution exactly uniform on [0, p).
    while count and out.max() == _P32:
        redo = np.flatnonzero(out == _P32)
        out[redo] = random_field((redo.size,))
    return out.reshape(shape)


def split(secret: np.ndarray, *, n: int, t: int) -> list[Share]:
    """Split a canonical uint32 field vector into ``n`` Shamir shares with threshold ``t``.

    Requires ``1 <= t <= n < PRIME``. Share ``i`` (0-based) has ``x = i + 1``. The shares'
    ``values`` are rows of one ``(n, len)`` array.
    """
    check_field(secret, "secret")
    if not (isinstance(n, int) and isinstance(t, int) and 1 <= t <= n < PRIME):
        raise ValueError(f"need 1 <= t <= n, got n={n}, t={t}")
    size = secret.shape[0]
    out = np.empty((n, size), dtype=FIELD_DTYPE)
    degree = t - 1
    scratch = np.empty(min(size, BLOCK), dtype=FIELD_DTYPE)
    for start in range(0, size, BLOCK):
        stop = min(start + BLOCK, size)
        tmp = scratch[: stop - start]
        diffs = random_field((degree, stop - start))  # diffs[k - 1] = Δ^k f at the current x
        previous = secret[start:stop]
        for i in range(n):
            row = out[i, start:stop]
            if degree == 0:
                row[:] = previous
                continue
            # f(x + 1) = f(x) + Δf(x)
            np.add(previous, diffs[0], out=row)
            np.subtract(row, _P32, out=tmp)
            np.minimum(row, tmp, out=row)
            previous = row
            if i == n - 1:
                break
            # Δ^k f(x + 1) = Δ^k f(x) + Δ^{k+1} f(x), ascending k so Δ^{k+1} is still old
            for k in range(degree - 1):
                np.add(diffs[k], diffs[k + 1], out=diffs[k])
                np.subtract(diffs[k], _P32, out=tmp)
                np.minimum(diffs[k], tmp, out=diffs[k])
    return [Share(x=i + 1, values=out[i]) for i in range(n)]


def add_shares(shares: Sequence[Share]) -> Share:
    """Point-wise sum of shares held at the same ``x``: a share of the sum of the secrets."""
    if not shares:
        raise ValueError("add_shares needs at least one share")
    x = shares[0].x
    size = shares[0].values.shape[0]
    for share in shares:
        if share.x != x:
            raise ValueError(f"cannot add shares of different points ({share.x} != {x})")
        check_field(share.values, "share values")
        if share.values.shape[0] != size:
            raise ValueError("shares have different lengths")
    total = shares[0].values.copy()
    scratch = np.empty(min(size, BLOCK), dtype=FIELD_DTYPE)
    for share in shares[1:]:
        mod_add_into(total, share.values, scratch)
    return Share(x=x, values=total)


def _fold(a: np.ndarray, scratch: np.ndarray) -> None:
    """a = (a mod 2**31) + (a >> 31): same residue mod p = 2**31 - 1, since 2**31 ≡ 1."""
    np.right_shift(a, _SHIFT31, out=scratch)
    np.bitwise_and(a, _P64, out=a)
    np.add(a, scratch, out=a)


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """Coefficients λ_i with f(0) = Σ λ_i f(x_i) mod p for distinct non-zero points."""
    coefficients = []
    for i, xi in enumerate(xs):
        numerator, denominator = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        coefficients.append(numerator * pow(denominator, -1, PRIME) % PRIME)
    return coefficients


def reconstruct(shares: Sequence[Share], *, t: int) -> np.ndarray:
    """Rebuild the secret (canonical uint32 vector) from the first ``t`` distinct shares.

    ValueError if fewer than ``t`` distinct points are given, a point is outside
    ``1..PRIME-1``, or lengths differ. With inconsistent shares the result is garbage, not
    an error: Shamir alone does not authenticate shares (sealing does).
    """
    if t < 1:
        raise ValueError("t must be >= 1")
    chosen: dict[int, Share] = {}
    for share in shares:
        if not 0 < share.x < PRIME:
            raise ValueError(f"share point {share.x} outside 1..PRIME-1")
        if share.x not in chosen:
            chosen[share.x] = share
        if len(chosen) == t:
            break
    if len(chosen) < t:
        raise ValueError(f"need {t} shares with distinct points, got {len(chosen)}")
    used = list(chosen.values())
    size = used[0].values.shape[0]
    for share in used:
        check_field(share.values, "share values")
        if share.values.shape[0] != size:
            raise ValueError("shares have different lengths")
    weights = [np.uint64(c) for c in lagrange_at_zero([s.x for s in used])]
    out = np.empty(size, dtype=FIELD_DTYPE)
    block = min(size, BLOCK)
    acc = np.empty(block, dtype=np.uint64)
    product = np.empty(block, dtype=np.uint64)
    high = np.empty(block, dtype=np.uint64)
    term_max = (PRIME - 1) ** 2  # λ, y <= p - 1, so each product fits 62 bits
    for start in range(0, size, BLOCK):
        stop = min(start + BLOCK, size)
        m = stop - start
        a, prod, hi = acc[:m], product[:m], high[:m]
        bound = 0  # largest value acc can hold so far; fold before it could pass 2**64
        for share, weight in zip(used, weights, strict=True):
            y = share.values[start:stop]
            if bound == 0:
                np.multiply(y, weight, out=a, dtype=np.uint64)
                bound = term_max
                continue
            if bound + term_max >= 2**64:
                _fold(a, hi)
                bound = PRIME + (bound >> 31)
            np.multiply(y, weight, out=prod, dtype=np.uint64)
            np.add(a, prod, out=a)
            bound += term_max
        # acc < 2**64: one fold leaves < 2**31 + 2**33, a second < p + 8 < 2p.
        _fold(a, hi)
        _fold(a, hi)
        np.subtract(a, _P64, out=prod)  # wraps (huge) when a < p
        np.minimum(a, prod, out=a)
        out[start:stop] = a
    return out
