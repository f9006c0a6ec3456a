"""Privacy accounting with Opacus' maintained RDP accountant (no hand-written bounds).

The RDP analysis of the sampled Gaussian mechanism assumes Poisson sampling: every record
joins each batch independently with probability ``sample_rate``. :mod:`peer.dpsgd` samples
batches exactly that way, so the epsilon reported here is the guarantee of what the trainer
actually ran.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.utils import get_noise_multiplier

# The orders Opacus' RDPAccountant uses by default; fixed here so cached vectors line up.
_ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)


class AccountingError(ValueError):
    """Parameters the accountant cannot work with (out of range, or target unreachable)."""


def _check(sigma: float | None, sample_rate: float, delta: float) -> None:
    if sigma is not None and not (sigma > 0 and math.isfinite(sigma)):
        raise AccountingError(f"noise multiplier must be positive and finite, got {sigma}")
    if not 0 < sample_rate <= 1:
        raise AccountingError(f"sample rate must be in (0, 1], got {sample_rate}")
    if not 0 < delta < 1:
        raise AccountingError(f"delta must be in (0, 1), got {delta}")


def epsilon(steps: int, sigma: float, sample_rate: float, delta: float) -> float:
    """Epsilon spent after ``steps`` DP-SGD steps at noise ``sigma`` and rate ``sample_rate``."""
    _check(sigma, sample_rate, delta)
    if steps < 0:
        raise AccountingError(f"steps must be >= 0, got {steps}")
    if steps == 0:
        return 0.0
    return epsilon_of_segments([(sigma, sample_rate, steps)], delta)


def sigma_for(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest noise multiplier (to 0.01 in epsilon) that keeps ``steps`` steps within target."""
    _check(None, sample_rate, delta)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise AccountingError(f"target epsilon must be positive, got {target_epsilon}")
    if steps <= 0:
        raise AccountingError(f"planned steps must be positive, got {steps}")
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant="rdp",
            )
        )
    except ValueError as exc:
        raise AccountingError(f"cannot reach epsilon {target_epsilon}: {exc}") from exc


@dataclass(frozen=True)
class PrivacyParams:
    """The accountant's inputs for one peer's DP-SGD run."""

    sigma: float
    sample_rate: float
    delta: float

    def epsilon_after(self, steps: int) -> float:
        return epsilon(steps, self.sigma, self.sample_rate, self.delta)


@functools.lru_cache(maxsize=64)
def _rdp_per_step(sigma: float, sample_rate: float) -> tuple[float, ...]:
    """RDP of one sampled-Gaussian step at Opacus' default orders (cached per setting).

    RDP composes additively, so n steps cost n times this vector; Opacus' own
    ``compute_rdp(q, sigma, steps, orders)`` is exactly ``steps`` times the one-step value.
    Caching it makes epsilon for any step count cheap (the first call takes ~0.2 s).
    """
    return tuple(float(v) for v in compute_rdp(q=sample_rate, noise_multiplier=sigma,
                                               steps=1, orders=_ORDERS))


def epsilon_of_segments(segments: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of a composition of DP-SGD segments ``(sigma, sample_rate, steps)``.

    Used by the ledger when a peer's noise or sampling rate changed between runs: RDP
    composes the segments exactly instead of pretending they all had one setting.
    """
    active = [(float(s), float(q), int(n)) for s, q, n in segments if n > 0]
    if not active:
        return 0.0
    total = np.zeros(len(_ORDERS))
    for sigma, sample_rate, steps in active:
        _check(sigma, sample_rate, delta)
        total += steps * np.asarray(_rdp_per_step(sigma, sample_rate))
    eps, _best_order = get_privacy_spent(orders=_ORDERS, rdp=total, delta=delta)
    return float(eps)
