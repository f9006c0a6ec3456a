"""Privacy accounting with Opacus' maintained RDP accountant (no hand-written bounds).

The RDP analysis of the sampled Gaussian mechanism assumes Poisson sampling: every record
joins each batch independently with probability ``sample_rate``. :mod:`peer.dpsgd` samples
batches exactly that way, so the epsilon reported here is the guarantee of what the trainer
actually ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier


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
    accountant = RDPAccountant()
    # One history entry with a step count: the accountant composes it in closed form.
    accountant.history = [(sigma, sample_rate, steps)]
    return float(accountant.get_epsilon(delta=delta))


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


def epsilon_of_segments(segments: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of a composition of DP-SGD segments ``(sigma, sample_rate, steps)``.

    Used by the ledger when a peer's noise or sampling rate changed between runs: RDP
    composes the segments exactly instead of pretending they all had one setting.
    """
    active = [(s, q, n) for s, q, n in segments if n > 0]
    if not active:
        return 0.0
    for sigma, sample_rate, steps in active:
        _check(sigma, sample_rate, delta)
        if steps < 0:
            raise AccountingError(f"steps must be >= 0, got {steps}")
    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in active]
    return float(accountant.get_epsilon(delta=delta))
