"""What every accountant shares: the error type, parameter checks and the noise search.

An accountant (one module per method: :mod:`.rdp`, :mod:`.pld`) bounds the (epsilon, delta)
cost of a composition of DP-SGD *segments* ``(sigma, sample_rate, steps)``: ``steps`` runs of
the Gaussian mechanism with noise multiplier ``sigma`` on a Poisson sample of rate
``sample_rate`` (add/remove-one neighbours). :mod:`.accountant` holds the registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from peer.errors import PeerError

Segment = tuple[float, float, int]

# Opacus' get_noise_multiplier search: start bracket, give-up point and epsilon precision.
SIGMA_START = 10.0
MAX_SIGMA = 1e6
EPSILON_TOLERANCE = 0.01


class AccountingError(PeerError, ValueError):
    """Parameters the accountant cannot work with (out of range, or target unreachable)."""


def check(sigma: float | None, sample_rate: float, delta: float) -> None:
    if sigma is not None and not (sigma > 0 and math.isfinite(sigma)):
        raise AccountingError(f"noise multiplier must be positive and finite, got {sigma}")
    if not 0 < sample_rate <= 1:
        raise AccountingError(f"sample rate must be in (0, 1], got {sample_rate}")
    if not 0 < delta < 1:
        raise AccountingError(f"delta must be in (0, 1), got {delta}")


def active_segments(segments: Iterable[Iterable[float]], delta: float) -> tuple[Segment, ...]:
    """The segments with at least one step, as checked ``(sigma, q, steps)`` tuples."""
    active = []
    for sigma, sample_rate, steps in segments:
        if int(steps) < 0:
            raise AccountingError(f"steps must be >= 0, got {steps}")
        if int(steps) > 0:
            check(float(sigma), float(sample_rate), delta)
            active.append((float(sigma), float(sample_rate), int(steps)))
    if not 0 < delta < 1:
        raise AccountingError(f"delta must be in (0, 1), got {delta}")
    return tuple(active)


def search_sigma(
    epsilon_at: Callable[[float], float],
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    tolerance: float = EPSILON_TOLERANCE,
) -> float:
    """Smallest noise multiplier (to ``tolerance`` in epsilon) whose epsilon is <= target.

    The bracket-and-bisect search of Opacus' ``get_noise_multiplier``: double sigma from
    ``SIGMA_START`` until the target holds, then bisect, keeping only upper ends. The
    returned sigma therefore always satisfies the target.
    """
    check(None, sample_rate, delta)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise AccountingError(f"target epsilon must be positive, got {target_epsilon}")
    if steps <= 0:
        raise AccountingError(f"planned steps must be positive, got {steps}")
    sigma_low, sigma_high = 0.0, SIGMA_START
    eps_high = math.inf
    while eps_high > target_epsilon:
        sigma_high = 2 * sigma_high
        eps_high = epsilon_at(sigma_high)
        if sigma_high > MAX_SIGMA:
            raise AccountingError(
                f"cannot reach epsilon {target_epsilon}: the privacy budget is too low")
    while target_epsilon - eps_high > tolerance:
        sigma = (sigma_low + sigma_high) / 2
        eps = epsilon_at(sigma)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return float(sigma_high)
