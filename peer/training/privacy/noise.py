"""Gaussian noise for DP-SGD from a cryptographically secure source.

Security property: the default sampler, :class:`SecureGaussian`, takes a fresh 32-byte key
from ``os.urandom`` (the kernel CSPRNG) for every call and expands it with libsodium's
ChaCha20 stream (``randombytes_buf_deterministic``, via PyNaCl) into the uniform bits it
needs; Box-Muller turns pairs of uniforms into Gaussians (radius in float64, angle in
float32). ChaCha20 keyed with 256 fresh secret bits is a CSPRNG (the Linux kernel's own
generator is ChaCha20 too), and is measured about 2x faster here than reading the same bytes
from os.urandom. Nothing about the
noise is predictable from a seed, the process state or earlier samples, so a recipient of the
noised update cannot subtract the noise. The radius uses 53-bit uniforms, keeping the sampled
tail out to about 8.6 sigma; the angle uses 32-bit uniforms (2^-32 of a turn).
The floating-point caveat is discussed in docs/privacy.md.

:class:`InsecureFastGaussian` exists only for experiments that need reproducible runs; it is
seeded and therefore offers *no* privacy. It is never the default and its name says so.
"""

from __future__ import annotations

import math
import os
from typing import Protocol

import torch
from nacl.bindings import randombytes_buf_deterministic

_MANTISSA_BITS = 53
_TWO_PI = 2.0 * math.pi


class GaussianSource(Protocol):
    """Anything that can fill ``n`` standard-normal float32 samples."""

    secure: bool

    def sample(self, n: int) -> torch.Tensor:
        """Return a float32 tensor of ``n`` independent N(0, 1) samples."""
        ...


class SecureGaussian:
    """Standard normal samples from a freshly keyed ChaCha20 CSPRNG via Box-Muller.

    Stateless apart from the operating system's CSPRNG, so it is safe to use from any thread.
    """

    secure = True

    def sample(self, n: int) -> torch.Tensor:
        if n < 0:
            raise ValueError(f"sample count must be >= 0, got {n}")
        pairs = (n + 1) // 2
        if pairs == 0:
            return torch.empty(0, dtype=torch.float32)
        key = os.urandom(32)
        stream = randombytes_buf_deterministic(12 * pairs, key)
        raw = torch.frombuffer(bytearray(stream), dtype=torch.uint8)
        radius_words = raw[: 8 * pairs].view(torch.int64)
        angle_words = raw[8 * pairs :].view(torch.int32)
        # Top 53 bits of each 64-bit word: exactly representable in a float64.
        mantissas = torch.bitwise_right_shift(radius_words, 64 - _MANTISSA_BITS)
        mantissas.bitwise_and_((1 << _MANTISSA_BITS) - 1)
        # u1 in (0, 1]: the +1 keeps log() finite. float64 keeps the tail exact.
        radius_64 = mantissas.to(torch.float64).add_(1.0).mul_(2.0**-_MANTISSA_BITS)
        radius = radius_64.log_().mul_(-2.0).sqrt_().to(torch.float32)
        # Signed 32-bit words map onto the angle range [-pi, pi) uniformly; the angle only
        # sets the direction, so float32 trig (2x faster than float64) loses nothing visible
        # in a float32 result.
        angle = angle_words.to(torch.float32).mul_(_TWO_PI * 2.0**-32)
        out = torch.empty(2 * pairs, dtype=torch.float32)
        torch.mul(radius, torch.cos(angle), out=out[:pairs])
        torch.mul(radius, angle.sin_(), out=out[pairs:])
        return out[:n]


class InsecureFastGaussian:
    """Seeded ``torch.randn`` noise: reproducible, fast, and NOT private. Experiments only."""

    secure = False

    def __init__(self, seed: int) -> None:
        self._generator = torch.Generator().manual_seed(seed)

    def sample(self, n: int) -> torch.Tensor:
        return torch.randn(n, generator=self._generator, dtype=torch.float32)


def secure_bernoulli_mask(n: int, probability: float) -> torch.Tensor:
    """``n`` independent Bernoulli(probability) draws from a freshly keyed ChaCha20 stream.

    Used for Poisson sampling of DP-SGD batches: privacy amplification by subsampling needs
    the batch membership to be secret, so it must not come from a guessable seed.
    Resolution 2^-32 in ``probability``.
    """
    if not 0 <= probability <= 1:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    if n <= 0:
        return torch.zeros(max(n, 0), dtype=torch.bool)
    stream = randombytes_buf_deterministic(8 * n, os.urandom(32))
    # 64-bit words: int64 view is signed, so compare the top 32 bits as a non-negative int.
    words = torch.frombuffer(bytearray(stream), dtype=torch.int64)
    top = torch.bitwise_right_shift(words, 32).bitwise_and_(0xFFFFFFFF)
    return top < round(probability * 2**32)
