"""PLD accountant (the default): Google's ``dp-accounting`` privacy loss distributions.

The privacy loss distribution of the Poisson-subsampled Gaussian mechanism, discretized
*pessimistically* with "connect the dots" (Doroshenko et al., PETS 2022) and composed by FFT
(Koskela et al. 2020; Meiser & Mohammadi 2018), gives an epsilon that is an upper bound on
the true one at any discretization, and far closer to it than the RDP conversion: 7–15 %
lower epsilon at the same sigma for Murmur's runs (``bench/accountant_bench.py``,
docs/privacy.md). Neighbouring relation: add/remove one record, as in :mod:`.rdp`.

``dp-accounting`` imports scipy's stats, signal and fft stacks (about +50 MB resident in a
peer), so it is imported on first use, not when this module is imported.

``VALUE_DISCRETIZATION_INTERVAL`` is 1e-3 rather than the library's 1e-4: both are upper
bounds, they differ by under 0.001 in epsilon for every benchmarked run, and 1e-3 is about
ten times faster (what a Raspberry Pi computes after every round).
"""

from __future__ import annotations

import functools
import math
from types import ModuleType

from peer.training.privacy.base import Segment, active_segments, search_sigma

NAME = "pld"
VALUE_DISCRETIZATION_INTERVAL = 1e-3


@functools.cache
def _dp_accounting() -> ModuleType:
    import dp_accounting  # heavy (scipy.stats): imported on first use

    return dp_accounting


@functools.lru_cache(maxsize=256)
def _epsilon(segments: tuple[Segment, ...], delta: float, interval: float) -> float:
    dpa = _dp_accounting()
    accountant = dpa.pld.PLDAccountant(
        neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=interval,
    )
    accountant.compose(dpa.ComposedDpEvent([
        dpa.SelfComposedDpEvent(
            dpa.PoissonSampledDpEvent(sample_rate, dpa.GaussianDpEvent(sigma)), steps)
        for sigma, sample_rate, steps in segments
    ]))
    eps = float(accountant.get_epsilon(delta))
    if not eps >= 0 or math.isnan(eps):
        raise ValueError(f"dp-accounting returned epsilon {eps} for {segments}")
    return eps


def epsilon_of_segments(
    segments: list[Segment], delta: float,
    value_discretization_interval: float = VALUE_DISCRETIZATION_INTERVAL,
) -> float:
    """Epsilon of a composition of DP-SGD segments ``(sigma, sample_rate, steps)`` (cached:
    the ledger asks for the same composition when it checks the budget and records)."""
    active = active_segments(segments, delta)
    if not active:
        return 0.0
    return _epsilon(active, float(delta), float(value_discretization_interval))


def sigma_for(
    target_epsilon: float, delta: float, sample_rate: float, steps: int,
    value_discretization_interval: float = VALUE_DISCRETIZATION_INTERVAL,
) -> float:
    """Smallest noise multiplier (to 0.01 in epsilon) that keeps ``steps`` steps within
    target, by the same bracket-and-bisect search as :func:`.rdp.sigma_for`."""
    return search_sigma(
        lambda sigma: epsilon_of_segments(
            [(sigma, sample_rate, steps)], delta, value_discretization_interval),
        target_epsilon, delta, sample_rate, steps)
