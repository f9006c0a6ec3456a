"""Privacy accounting with Opacus' maintained RDP analysis (no hand-written bounds).

The RDP analysis of the sampled Gaussian mechanism assumes Poisson sampling: every record
joins each batch independently with probability ``sample_rate``. :mod:`peer.training.dpsgd` samples
batches exactly that way, so the epsilon reported here is the guarantee of what the trainer
actually ran.

Only Opacus' analysis module (``opacus/accountants/analysis/rdp.py``: numpy + scipy.special) is
loaded, straight from its file. Importing it as ``opacus.accountants...`` would first run
``opacus/__init__`` (grad samplers, privacy engine, scipy's full stats stack, sympy): about
117 MB of resident memory a peer on a 1 GB Raspberry Pi cannot spare. The arithmetic is
Opacus' own code, so epsilon is bit-for-bit what ``opacus.accountants.RDPAccountant`` reports
(tests/test_dpsgd.py compares them).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from peer.errors import PeerError

# The orders Opacus' RDPAccountant uses by default (RDPAccountant.DEFAULT_ALPHAS, copied so the
# accountant class need not be imported); fixed so cached per-step vectors line up.
_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
# Opacus' get_noise_multiplier search: start bracket, give-up point and epsilon precision.
_SIGMA_START = 10.0
_MAX_SIGMA = 1e6
_EPSILON_TOLERANCE = 0.01
_RDP_MODULE = "opacus.accountants.analysis.rdp"


def _load_rdp_analysis() -> ModuleType:
    """Opacus' RDP analysis module, without running the ``opacus`` package set-up.

    Reuses the real module when something already imported Opacus (tests, notebooks); else
    executes the file under a private name, so a later ``import opacus`` is unaffected.
    """
    loaded = sys.modules.get(_RDP_MODULE)
    if loaded is not None:
        return loaded
    package = importlib.util.find_spec("opacus")  # locates the package; does not import it
    if package is None or not package.submodule_search_locations:
        raise ImportError("opacus is not installed (pip install opacus)")
    path = Path(next(iter(package.submodule_search_locations)))
    rdp_file = path / "accountants" / "analysis" / "rdp.py"
    spec = importlib.util.spec_from_file_location("peer.training.privacy._opacus_rdp", rdp_file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load Opacus' RDP analysis from {rdp_file}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_rdp = _load_rdp_analysis()


class AccountingError(PeerError, ValueError):
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


def _epsilon_single(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of one constant segment, computed as Opacus' RDPAccountant.get_epsilon does."""
    rdp = _rdp.compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=steps, orders=_ORDERS)
    eps, _best_order = _rdp.get_privacy_spent(orders=_ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def sigma_for(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest noise multiplier (to 0.01 in epsilon) that keeps ``steps`` steps within target.

    The same bracket-and-bisect search as Opacus' ``get_noise_multiplier(accountant="rdp")``
    (same start, tolerance and arithmetic, so the same sigma), without importing its package.
    The returned sigma always satisfies the target: the search only ever keeps an upper end.
    """
    _check(None, sample_rate, delta)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise AccountingError(f"target epsilon must be positive, got {target_epsilon}")
    if steps <= 0:
        raise AccountingError(f"planned steps must be positive, got {steps}")
    sigma_low, sigma_high = 0.0, _SIGMA_START
    eps_high = math.inf
    while eps_high > target_epsilon:
        sigma_high = 2 * sigma_high
        eps_high = _epsilon_single(sigma_high, sample_rate, steps, delta)
        if sigma_high > _MAX_SIGMA:
            raise AccountingError(
                f"cannot reach epsilon {target_epsilon}: the privacy budget is too low")
    while target_epsilon - eps_high > _EPSILON_TOLERANCE:
        sigma = (sigma_low + sigma_high) / 2
        eps = _epsilon_single(sigma, sample_rate, steps, delta)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return float(sigma_high)


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
    one_step = _rdp.compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=1, orders=_ORDERS)
    return tuple(float(v) for v in one_step)


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
    eps, _best_order = _rdp.get_privacy_spent(orders=_ORDERS, rdp=total, delta=delta)
    return float(eps)
