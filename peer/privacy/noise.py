"""Gaussian noise for DP-SGD from a cryptographically secure source.

Security property: the default sampler, :class:`SecureGaussian`, draws every uniform it uses
from ``os.urandom`` (the kernel CSPRNG) and turns pairs of uniforms into Gaussians with the
Box-Muller transform in float64. Nothing about the noise is predictable from a seed, the
process state, or earlier samples, so an observer of the noised update cannot subtract the
noise. 53-bit uniforms keep the sampled tail out to about 8.6 sigma, far beyond what affects
the accountant's guarantee in practice (the floating-point caveat is discussed in
docs/privacy.md).

:class:`InsecureFastGaussian` exists only for experiments that need reproducible runs; it is
seeded and therefore offers *no* privacy. It is never the default and its name says so.
"""

from __future__ import annotations

import math
import os
from typing import Protocol

import torch

_MANTISSA_BITS = 53
_TWO_PI = 2.0 * math.pi


class GaussianSource(Protocol):
    """Anything that can fill ``n`` standard-normal float32 samples."""

    secure: bool

    def sample(self, n: int) -> torch.Tensor:
        """Return a float32 tensor of ``n`` independent N(0, 1) samples."""
        ...


class SecureGaussian:
    """Standard normal samples from ``os.urandom`` via Box-Muller (float64 maths).

    Stateless apart from the operating system's CSPRNG, so it is safe to use from any thread.
    """

    secure = True

    def sample(self, n: int) -> torch.Tensor:
        if n < 0:
            raise ValueError(f"sample count must be >= 0, got {n}")
        pairs = (n + 1) // 2
        if pairs == 0:
            return torch.empty(0, dtype=torch.float32)
        raw = torch.frombuffer(bytearray(os.urandom(16 * pairs)), dtype=torch.int64)
        # Keep the top 53 bits of each 64-bit word: exactly representable in a float64.
        mantissas = torch.bitwise_right_shift(raw, 64 - _MANTISSA_BITS)
        mantissas.bitwise_and_((1 << _MANTISSA_BITS) - 1)
        uniforms = mantissas.to(torch.float64)
        # u1 in (0, 1]: the +1 keeps log() finite; u2 in [0, 1) scaled to an angle.
        radius_u = uniforms[:pairs].add_(1.0).mul_(2.0**-_MANTISSA_BITS)
        angle = uniforms[pairs:].mul_(_TWO_PI * 2.0**-_MANTISSA_BITS)
        radius = radius_u.log_().mul_(-2.0).sqrt_()
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
