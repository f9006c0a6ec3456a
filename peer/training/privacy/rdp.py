"""RDP accountant: Opacus' Rényi-DP analysis of the sampled Gaussian mechanism (cross-check).

Kept as the reference the tighter default (:mod:`.pld`) is checked against: its epsilon must
never exceed this one's at Murmur's settings (only at epsilon below about 0.005, where PLD's
1e-3 discretization dominates, can PLD's be the larger, as it already could be against the
orders up to 1024). Only Opacus' analysis module (``opacus/accountants/analysis/rdp.py``:
numpy + scipy.special) is loaded, straight from its file. Importing it as
``opacus.accountants...`` would first run ``opacus/__init__`` (grad samplers, privacy engine,
scipy's full stats stack, sympy): about 117 MB of resident memory a peer on a 1 GB Raspberry
Pi cannot spare. The arithmetic is Opacus' own, so whenever the best order lies inside
``ORDERS`` epsilon is bit-for-bit what
``opacus.accountants.RDPAccountant(...).get_epsilon(delta, alphas=ORDERS)`` reports
(tests/test_dpsgd.py compares them).

Orders: Opacus' defaults stop at 63; ``ORDERS`` adds integer orders up to 1024 (a sparse grid:
epsilon is flat in alpha near a large optimum), which covers every order Murmur's training
settings need. The best order can still be an end of that grid: the largest when epsilon is
below about 0.004 (large sigma or few steps: the first points of the noise search, a ledger
after one step), the smallest (1.1) when epsilon is in the hundreds (tiny sigma). The bound
is then looser than it need be, and Opacus warns "Optimal order is the largest/smallest
alpha" on stderr. Murmur instead *extends* the orders at that end and takes the minimum again:
``LARGE_ORDERS`` up to 65536 (computed by :func:`_log_a_int`, a numerically stable form of
Opacus' own sum, which overflows to NaN above alpha ~ 1030) and ``SMALL_ORDERS`` down to 1.001
(Opacus' fractional-order series). A minimum over more orders only lowers epsilon, so the
bound stays sound. Opacus' warning is silenced only around its conversion call; if the best
order is still an end of the extended grid, Murmur logs that once, in its own words, with how
loose the bound can be (at the large end at most about 1e-4 in epsilon for delta >= 1e-8).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
from scipy.special import gammaln, logsumexp  # already loaded by Opacus' analysis module

from peer.training.privacy.base import Segment, active_segments, search_sigma

NAME = "rdp"

OPACUS_DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
ORDERS: tuple[float, ...] = (
    *OPACUS_DEFAULT_ORDERS, 64, 72, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512,
    640, 768, 1024)
# Used only when the best order is an end of ORDERS (see the module docstring).
LARGE_ORDERS: tuple[int, ...] = (
    1280, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576, 32768, 49152, 65536)
SMALL_ORDERS: tuple[float, ...] = (1.001, 1.002, 1.003, 1.005, 1.007, 1.01, 1.02, 1.03, 1.04,
                                   1.05, 1.06, 1.07, 1.08, 1.09)
_RDP_MODULE = "opacus.accountants.analysis.rdp"
# Opacus' get_privacy_spent warns with this when the best order is an end of the grid.
_OPACUS_EDGE_WARNING = "Optimal order is the"

log = logging.getLogger(__name__)


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


#: Opacus' own RDP analysis module (``compute_rdp``, ``get_privacy_spent``), loaded without
#: the ``opacus`` package: the arithmetic this accountant runs, and the reference it is
#: tested against.
opacus_rdp = _load_rdp_analysis()


def _log_a_int(sample_rate: float, sigma: float, alpha: int) -> float:
    """log A_alpha of the sampled Gaussian mechanism at integer ``alpha`` (Mironov, Talwar &
    Zhang 2019, Section 3.3): Opacus' ``_compute_log_a_for_int_alpha`` sum, with the binomial
    coefficients in log space (``gammaln``) so that it stays finite above alpha ~ 1030, where
    Opacus' ``special.binom`` overflows and its result is NaN."""
    i = np.arange(alpha + 1, dtype=np.float64)
    log_binom = gammaln(alpha + 1.0) - gammaln(i + 1.0) - gammaln(alpha - i + 1.0)
    terms = (log_binom + i * math.log(sample_rate) + (alpha - i) * math.log1p(-sample_rate)
             + (i * i - i) / (2 * sigma**2))
    return float(logsumexp(terms))


def rdp_large_order(sigma: float, sample_rate: float, alpha: int) -> float:
    """RDP of one sampled-Gaussian step at a (large, integer) order, as Opacus' _compute_rdp,
    but finite above alpha ~ 1030 (:func:`_log_a_int`)."""
    if sample_rate == 1.0:
        return alpha / (2 * sigma**2)
    return _log_a_int(sample_rate, sigma, alpha) / (alpha - 1)


@functools.lru_cache(maxsize=64)
def rdp_per_step(sigma: float, sample_rate: float) -> tuple[float, ...]:
    """RDP of one sampled-Gaussian step at ``ORDERS`` (cached per setting; ``cache_clear()``
    empties the cache).

    RDP composes additively, so n steps cost n times this vector; Opacus' own
    ``compute_rdp(q, sigma, steps, orders)`` is exactly ``steps`` times the one-step value.
    """
    one_step = opacus_rdp.compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=1, orders=ORDERS)
    return tuple(float(v) for v in one_step)


@functools.lru_cache(maxsize=64)
def _rdp_per_step_large(sigma: float, sample_rate: float) -> tuple[float, ...]:
    """RDP of one step at ``LARGE_ORDERS`` (only computed when the largest order is best)."""
    return tuple(rdp_large_order(sigma, sample_rate, alpha) for alpha in LARGE_ORDERS)


@functools.lru_cache(maxsize=64)
def _rdp_per_step_small(sigma: float, sample_rate: float) -> tuple[float, ...]:
    """RDP of one step at ``SMALL_ORDERS`` (only computed when the smallest order is best)."""
    one_step = opacus_rdp.compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=1,
                                orders=SMALL_ORDERS)
    return tuple(float(v) for v in one_step)


# catch_warnings swaps the process-wide filter list: one Murmur caller at a time, so two
# threads accounting at once cannot leave each other's filters behind.
_warnings_lock = threading.Lock()


def _privacy_spent(orders: np.ndarray, rdp: np.ndarray, delta: float) -> tuple[float, float]:
    """Opacus' RDP -> (epsilon, delta) conversion, with its end-of-grid warning silenced (the
    caller extends the orders instead; nothing else is filtered)."""
    with _warnings_lock, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_OPACUS_EDGE_WARNING, category=UserWarning)
        eps, best = opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps), float(best)


def _conversion(alpha: np.ndarray, delta: float) -> np.ndarray:
    """The order-dependent term of Opacus' conversion: epsilon(alpha) = rdp(alpha) + this."""
    return -(np.log(delta) + np.log(alpha)) / (alpha - 1) + np.log((alpha - 1) / alpha)


def _edge_slack(orders: np.ndarray, rdp: np.ndarray, delta: float, best: float) -> float:
    """How much lower than the returned epsilon the RDP bound could go beyond the grid's end
    that ``best`` sits on (an upper bound on the looseness; 0 when ``best`` is inside).

    Past the largest order: RDP never decreases with the order, so epsilon(alpha) >=
    rdp(alpha_max) + min over alpha >= alpha_max of the conversion term. Below the smallest:
    RDP >= 0 and the conversion term only grows as alpha falls towards 1 (for alpha < 1/delta),
    so epsilon(alpha) >= conversion(alpha_min).
    """
    finite = np.isfinite(rdp)
    if best == float(orders[finite].max()):
        top = float(orders[finite].max())
        beyond = np.geomspace(top, top * 1e9, 4000)
        floor = min(0.0, float(np.min(_conversion(beyond, delta))))
        return max(0.0, float(_conversion(np.array([top]), delta)[0]) - floor)
    if best == float(orders[finite].min()):
        return max(0.0, float(rdp[finite][0]))
    return 0.0


# The grid ends ("largest", "smallest") already logged by this process.
_edges_logged: set[str] = set()


def edges_logged() -> frozenset[str]:
    """Which ends of the orders ("largest", "smallest") this process has logged a loose bound
    at; each is logged once per process."""
    return frozenset(_edges_logged)


def forget_logged_edges() -> None:
    """Log each end again the next time a bound sits on it (tests; a peer never needs it)."""
    _edges_logged.clear()


def _log_edge_once(orders: np.ndarray, rdp: np.ndarray, delta: float, eps: float,
                   best: float) -> None:
    slack = min(eps, _edge_slack(orders, rdp, delta, best))  # epsilon is reported >= 0
    if slack <= 0.0:
        return
    edge = "largest" if best == float(orders.max()) else "smallest"
    if edge in _edges_logged:
        return
    _edges_logged.add(edge)
    log.info("RDP bound at the %s order %g: epsilon %.4g may be loose by up to %.2g (the "
             "RDP minimum may lie beyond the orders Murmur computes; the bound is still sound). "
             "Logged once.", edge, best, eps, slack)


def _epsilon_from_per_step(active: tuple[Segment, ...], delta: float,
                           *, report_edge: bool) -> float:
    """Epsilon of the composition at ``ORDERS``, extended at whichever end is optimal."""
    orders = np.asarray(ORDERS, dtype=np.float64)
    total = np.zeros(len(ORDERS))
    for sigma, sample_rate, steps in active:
        total += steps * np.asarray(rdp_per_step(sigma, sample_rate))
    eps, best = _privacy_spent(orders, total, delta)
    extension = None
    if best == ORDERS[-1]:
        extension, per_step = LARGE_ORDERS, _rdp_per_step_large
    elif best == ORDERS[0]:
        extension, per_step = SMALL_ORDERS, _rdp_per_step_small
    if extension is not None:
        extra = np.zeros(len(extension))
        for sigma, sample_rate, steps in active:
            extra += steps * np.asarray(per_step(sigma, sample_rate))
        orders = np.concatenate([orders, np.asarray(extension, dtype=np.float64)])
        total = np.concatenate([total, extra])
        order = np.argsort(orders)
        orders, total = orders[order], total[order]
        eps, best = _privacy_spent(orders, total, delta)
        # Past alpha = 1/delta the conversion term is negative, so a near-zero RDP can give
        # an epsilon just below 0 (never below log(1 - delta)); (0, delta) is implied by it.
        eps = max(eps, 0.0)
        if report_edge:
            _log_edge_once(orders, total, delta, eps, best)
    return eps


def epsilon_of_segments(segments: list[Segment], delta: float) -> float:
    """Epsilon of a composition of DP-SGD segments ``(sigma, sample_rate, steps)``.

    Emits no library warning; if the bound is at the end of the extended orders, that is
    logged once (see the module docstring)."""
    active = active_segments(segments, delta)
    if not active:
        return 0.0
    return _epsilon_from_per_step(active, delta, report_edge=True)


def _epsilon_single(sigma: float, sample_rate: float, steps: int, delta: float,
                    *, report_edge: bool = False) -> float:
    """Epsilon of one constant segment: Opacus' RDPAccountant.get_epsilon at ``ORDERS`` (the
    same arithmetic), extended at an optimal end like :func:`epsilon_of_segments`."""
    return _epsilon_from_per_step(((sigma, sample_rate, steps),), delta,
                                  report_edge=report_edge)


def sigma_for(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest noise multiplier (to 0.01 in epsilon) that keeps ``steps`` steps within target:
    Opacus' ``get_noise_multiplier(accountant="rdp")`` search (same start, tolerance and
    arithmetic, at ``ORDERS`` extended at an optimal end), without importing its package.

    The search's probe points (sigma 20, 40, ... first) routinely sit at the largest order;
    only the returned sigma's bound is reported if it is at an edge."""
    sigma = search_sigma(
        lambda sigma: _epsilon_single(sigma, sample_rate, steps, delta),
        target_epsilon, delta, sample_rate, steps)
    _epsilon_single(sigma, sample_rate, steps, delta, report_edge=True)
    return sigma
