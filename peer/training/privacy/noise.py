"""Gaussian noise for DP-SGD from a cryptographically secure source, with no cut-off tail.

Security property: the default sampler, :class:`SecureGaussian`, takes a fresh 32-byte key
from ``os.urandom`` (the kernel CSPRNG) for every call and expands it with libsodium's
ChaCha20 stream (``randombytes_buf_deterministic``, via PyNaCl) into the uniform bits it
needs; Box-Muller turns pairs of uniforms into Gaussians (radius in float64, angle in
float32). ChaCha20 keyed with 256 fresh secret bits is a CSPRNG (the Linux kernel's own
generator is ChaCha20 too), and is measured about 2x faster here than reading the same bytes
from os.urandom. Nothing about the noise is predictable from a seed, the process state or
earlier samples, so a recipient of the noised update cannot subtract the noise.

The samples are floating-point values close to, not exactly, Gaussian: the radius uniform is
on a 2^-53k grid, the angle on a float32 grid, and the results are rounded to float32 (an
absolute error of about 2^-23 r per value). The privacy guarantee is for the idealised
real-valued mechanism; docs/privacy.md ("Floating-point caveat") says what that leaves out.

The radius has no cut-off that matters: :func:`open_unit_uniforms` refines a uniform whose
top 53 bits are all zero with fresh words instead of stopping at 2^-53 (which would cap every
coordinate at about 8.57 sigma). It can return uniforms down to 2^-1007, so the radius
reaches about 37.4 sigma, and the tail mass it cannot produce is 2^-1007 per pair.
docs/privacy.md ("Noise source") gives the argument that this adds nothing visible to delta,
and the floating-point caveat.

:class:`InsecureFastGaussian` exists only for experiments that need reproducible runs; it is
seeded and therefore offers *no* privacy. It is never the default and its name says so.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import Protocol

import torch
from nacl.bindings import randombytes_buf_deterministic

log = logging.getLogger(__name__)

_MANTISSA_BITS = 53
_GRID = 2.0**-_MANTISSA_BITS  # one word's resolution: u = (h + 1) * 2^-53
_TWO_PI = 2.0 * math.pi

#: Words one uniform may use: the first, plus a fresh one each time the top 53 bits are zero.
#: 19 words of 53 bits reach 2^-1007, still a normal float64 (the smallest is 2^-1022).
MAX_UNIFORM_WORDS = 19
#: The smallest uniform :func:`open_unit_uniforms` returns (all 19 words zero in their top
#: 53 bits); the probability an exact uniform falls below it is this same number.
SMALLEST_UNIFORM = 2.0 ** -(_MANTISSA_BITS * MAX_UNIFORM_WORDS)
#: The largest pair radius, sqrt(-2 ln SMALLEST_UNIFORM), about 37.4: the cut-off in sigmas.
LARGEST_RADIUS = math.sqrt(-2.0 * math.log(SMALLEST_UNIFORM))


class GaussianSource(Protocol):
    """Anything that can fill ``n`` standard-normal float32 samples."""

    secure: bool

    def sample(self, n: int) -> torch.Tensor:
        """Return a float32 tensor of ``n`` independent N(0, 1) samples."""
        ...


def _top_bits(words: torch.Tensor) -> torch.Tensor:
    """The top 53 bits of each 64-bit word as a non-negative int64 (exact in a float64)."""
    top = torch.bitwise_right_shift(words, 64 - _MANTISSA_BITS)  # arithmetic shift on int64
    return top.bitwise_and_((1 << _MANTISSA_BITS) - 1)


def os_random_words(count: int) -> torch.Tensor:
    """``count`` uniform 64-bit words (as int64) straight from ``os.urandom``."""
    return torch.frombuffer(bytearray(os.urandom(8 * count)), dtype=torch.int64)


def open_unit_uniforms(
    words: torch.Tensor, draw_words: Callable[[int], torch.Tensor] = os_random_words
) -> torch.Tensor:
    """Uniforms in (0, 1] (float64), one per int64 word, refined in the low tail.

    With ``h`` a word's top 53 bits, ``u = (h + 1) * 2^-53``: the exact uniform rounded up to
    a 2^-53 grid. When ``h == 0`` (probability 2^-53) the exact uniform lies in (0, 2^-53]
    and is refined with a fresh word from ``draw_words(k)`` (``k`` uniform int64 words):
    ``u = 2^-53 * u'``, for up to :data:`MAX_UNIFORM_WORDS` words in all, so ``u`` reaches
    :data:`SMALLEST_UNIFORM` (2^-1007) instead of stopping at 2^-53. Pure apart from
    ``draw_words``, so the tests can feed it extreme words.
    """
    if words.dtype != torch.int64 or words.dim() != 1:
        raise ValueError(f"words must be a 1-D int64 tensor, got {words.dtype} {words.dim()}-D")
    top = _top_bits(words)
    uniforms = top.to(torch.float64).add_(1.0).mul_(_GRID)
    if top.numel() == 0 or int(top.min()) > 0:
        return uniforms  # the usual case: nothing to refine (min() is cheaper than == 0)
    pending = (top == 0).nonzero().flatten()
    scale = _GRID
    for _ in range(MAX_UNIFORM_WORDS - 1):
        fresh = draw_words(pending.numel())
        if fresh.dtype != torch.int64 or fresh.shape != pending.shape:
            raise ValueError(f"draw_words({pending.numel()}) returned {fresh.dtype} "
                             f"{tuple(fresh.shape)}")
        fresh_top = _top_bits(fresh)
        uniforms[pending] = fresh_top.to(torch.float64).add_(1.0).mul_(_GRID * scale)
        pending = pending[fresh_top == 0]
        scale *= _GRID
        if pending.numel() == 0:
            break
    return uniforms


def box_muller(uniforms: torch.Tensor, angle_words: torch.Tensor) -> torch.Tensor:
    """Standard normal pairs from radius uniforms in (0, 1] and 32-bit angle words.

    Returns ``2 * len(uniforms)`` float32 values: all ``r cos(theta)``, then all
    ``r sin(theta)``, with ``r = sqrt(-2 ln u)`` in float64, rounded to float32, and ``theta``
    the signed word converted to float32 (24 significant bits) times ``2 pi / 2^32``: on a grid
    of about 2 pi 2^-25 near +-pi, both ends reachable. The trigonometry is float32 (2x faster
    than float64). Each value is within about 2^-23 r (absolute) of the exact ``r cos(theta)``;
    the angle scales a coordinate as much as the radius does, so this is part of the
    floating-point caveat (docs/privacy.md), not of delta.
    """
    if uniforms.dtype != torch.float64 or angle_words.dtype != torch.int32:
        raise ValueError("box_muller needs float64 uniforms and int32 angle words")
    if uniforms.shape != angle_words.shape or uniforms.dim() != 1:
        raise ValueError("box_muller needs 1-D uniforms and angle words of equal length")
    pairs = uniforms.shape[0]
    radius = uniforms.log().mul_(-2.0).sqrt_().to(torch.float32)
    angle = angle_words.to(torch.float32).mul_(_TWO_PI * 2.0**-32)
    out = torch.empty(2 * pairs, dtype=torch.float32)
    torch.mul(radius, torch.cos(angle), out=out[:pairs])
    torch.mul(radius, angle.sin_(), out=out[pairs:])
    return out


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
        stream = randombytes_buf_deterministic(12 * pairs, os.urandom(32))
        raw = torch.frombuffer(bytearray(stream), dtype=torch.uint8)
        uniforms = open_unit_uniforms(raw[: 8 * pairs].view(torch.int64))
        return box_muller(uniforms, raw[8 * pairs :].view(torch.int32))[:n]


class InsecureFastGaussian:
    """Seeded ``torch.randn`` noise: reproducible, fast, and NOT private. Experiments only."""

    secure = False

    def __init__(self, seed: int) -> None:
        self._generator = torch.Generator().manual_seed(seed)

    def sample(self, n: int) -> torch.Tensor:
        return torch.randn(n, generator=self._generator, dtype=torch.float32)


def bernoulli_threshold(probability: float) -> int:
    """``floor(probability * 2^32)``: a draw of 32 uniform bits below it has probability
    ``threshold / 2^32``, at most ``probability`` and less than 2^-32 below it.

    Rounded down because epsilon only grows with the sample rate: the rate that runs must
    never exceed the rate the ledger accounts for (rounding to nearest could by 2^-33).
    ``probability * 2^32`` is exact in float64 (a power-of-two scaling), so the floor is too.
    """
    if not 0 <= probability <= 1:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    return math.floor(probability * 2**32)


def secure_bernoulli_mask(n: int, probability: float) -> torch.Tensor:
    """``n`` independent Bernoulli draws from a freshly keyed ChaCha20 stream, each True with
    probability ``bernoulli_threshold(probability) / 2^32`` (<= ``probability``).

    Used for Poisson sampling of DP-SGD batches: privacy amplification by subsampling needs
    the batch membership to be secret, so it must not come from a guessable seed.
    """
    threshold = bernoulli_threshold(probability)
    if n <= 0:
        return torch.zeros(max(n, 0), dtype=torch.bool)
    stream = randombytes_buf_deterministic(8 * n, os.urandom(32))
    # 64-bit words: int64 view is signed, so compare the top 32 bits as a non-negative int.
    words = torch.frombuffer(bytearray(stream), dtype=torch.int64)
    top = torch.bitwise_right_shift(words, 32).bitwise_and_(0xFFFFFFFF)
    return top < threshold


def choose_noise(noise: GaussianSource | None, insecure_fast_noise: bool,
                 seed: int) -> GaussianSource:
    """The DP steps' N(0, 1) source: a caller's (tests and audits only), the seeded insecure
    one when ``insecure_fast_noise`` is on, else :class:`SecureGaussian`. Every source that
    gives no privacy is logged as such."""
    if insecure_fast_noise:  # seeds the sampling whatever the noise source
        log.warning("insecure_fast_noise is on: seeded %s, NO privacy",
                    "batch sampling" if noise is not None else "noise and sampling")
    if noise is not None:
        if not noise.secure:
            log.warning("noise source %s is not secure: NO privacy", type(noise).__name__)
        return noise
    return InsecureFastGaussian(seed + 1) if insecure_fast_noise else SecureGaussian()
