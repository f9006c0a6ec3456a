"""RDP accountant: Opacus' Rényi-DP analysis of the sampled Gaussian mechanism (cross-check).

Kept as the reference the tighter default (:mod:`.pld`) is checked against: its epsilon must
never exceed this one's. Only Opacus' analysis module (``opacus/accountants/analysis/rdp.py``:
numpy + scipy.special) is loaded, straight from its file. Importing it as
``opacus.accountants...`` would first run ``opacus/__init__`` (grad samplers, privacy engine,
scipy's full stats stack, sympy): about 117 MB of resident memory a peer on a 1 GB Raspberry
Pi cannot spare. The arithmetic is Opacus' own, so epsilon is bit-for-bit what
``opacus.accountants.RDPAccountant(...).get_epsilon(delta, alphas=ORDERS)`` reports
(tests/test_dpsgd.py compares them).

Orders: Opacus' defaults stop at 63, and whenever the best order is the largest one (large
sigma or few steps, e.g. the first points of the noise search) Opacus warns "Optimal order is
the largest alpha" and the bound is looser than it need be. ``ORDERS`` adds integer orders up
to 1024 (a sparse grid: epsilon is flat in alpha near a large optimum). That removes the
warning for every setting Murmur runs, including the large-sigma first points of the noise
search, and only ever lowers epsilon (a minimum over more orders), so the bound stays sound.
The largest order can still be optimal only when epsilon is below about 0.01 (the conversion
term log(1/delta)/(alpha-1) at alpha = 1024); orders above 1024 would cost a Pi time on every
computation (Opacus sums alpha+1 terms per integer order) for no setting Murmur uses.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

from peer.training.privacy.base import Segment, active_segments, search_sigma

NAME = "rdp"

OPACUS_DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
ORDERS: tuple[float, ...] = (
    *OPACUS_DEFAULT_ORDERS, 64, 72, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512,
    640, 768, 1024)
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


@functools.lru_cache(maxsize=64)
def _rdp_per_step(sigma: float, sample_rate: float) -> tuple[float, ...]:
    """RDP of one sampled-Gaussian step at ``ORDERS`` (cached per setting).

    RDP composes additively, so n steps cost n times this vector; Opacus' own
    ``compute_rdp(q, sigma, steps, orders)`` is exactly ``steps`` times the one-step value.
    """
    one_step = _rdp.compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=1, orders=ORDERS)
    return tuple(float(v) for v in one_step)


def epsilon_of_segments(segments: list[Segment], delta: float) -> float:
    """Epsilon of a composition of DP-SGD segments ``(sigma, sample_rate, steps)``."""
    active = active_segments(segments, delta)
    if not active:
        return 0.0
    total = np.zeros(len(ORDERS))
    for sigma, sample_rate, steps in active:
        total += steps * np.asarray(_rdp_per_step(sigma, sample_rate))
    eps, _best_order = _rdp.get_privacy_spent(orders=ORDERS, rdp=total, delta=delta)
    return float(eps)


def _epsilon_single(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of one constant segment, computed as Opacus' RDPAccountant.get_epsilon does."""
    rdp = _rdp.compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=steps, orders=ORDERS)
    eps, _best_order = _rdp.get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def sigma_for(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Smallest noise multiplier (to 0.01 in epsilon) that keeps ``steps`` steps within target:
    Opacus' ``get_noise_multiplier(accountant="rdp")`` search (same start, tolerance and
    arithmetic, at ``ORDERS``), without importing its package."""
    return search_sigma(
        lambda sigma: _epsilon_single(sigma, sample_rate, steps, delta),
        target_epsilon, delta, sample_rate, steps)
