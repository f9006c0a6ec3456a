"""The one-run method's own ceiling: the bound it reaches on the idealised mechanism.

The one-run bound (sim/audit_bound.py) compares the auditor's guesses with epsilon-DP
randomized response. A Poisson-subsampled Gaussian mechanism composed over many steps is not
randomized response: its privacy loss is nearly Gaussian, so even a perfect implementation
audited by the perfect white-box adversary leaves the bound well below the accountant's
epsilon, by an amount that depends only on m, the guess grid, the confidence and the
mechanism's parameters. :func:`ceiling` measures that amount by simulation.

The idealised mechanism is the one the accountant analyses, per canary coordinate and in
units of the clip norm C: at each of the ledger's steps (``segments``: (sigma, q, steps)
runs) an included canary is sampled with probability q and adds 1, and every coordinate gets
N(0, sigma^2). Nothing else moves the coordinate (no data drift, no optimizer, no other
peer). Two scores:

* ``sum``: the total over steps, which is what the audit's ``released`` view scores (the sum
  of the target's private outputs at the canary's coordinate);
* ``stepwise``: the sum over steps of the per-step log-likelihood ratio,
  log(1 - q + q exp((x - 1/2) / sigma^2)), the Neyman-Pearson score of an adversary who sees
  every step's output apart, which the accountant's epsilon also covers.

The coins, sampling and noise come from ``rng`` (a simulation, not a release: it may be
seeded). Pure: numpy and sim.audit_bound, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sim.audit_bound import audit_scores

__all__ = ["CEILING_SCORES", "Ceiling", "ceiling", "ideal_scores"]

CEILING_SCORES = ("sum", "stepwise")

Segments = Sequence[tuple[float, float, int]]


def ideal_scores(segments: Segments, included: np.ndarray, score: str,
                 rng: np.random.Generator) -> np.ndarray:
    """One run of the idealised mechanism on canaries ``included``, scored by ``score``."""
    if score not in CEILING_SCORES:
        raise ValueError(f"score must be one of {CEILING_SCORES}, got {score!r}")
    included = np.asarray(included, dtype=bool)
    total = np.zeros(included.size)
    for sigma, rate, steps in segments:
        if not (sigma > 0 and 0 <= rate <= 1 and steps >= 0):
            raise ValueError(f"need sigma > 0, 0 <= q <= 1, steps >= 0, got "
                             f"{(sigma, rate, steps)}")
        for _ in range(int(steps)):
            x = (included & (rng.random(included.size) < rate)) + sigma * rng.standard_normal(
                included.size)
            if score == "sum":
                total += x
            else:  # log((1 - q) + q e^z), z = (x - 1/2) / sigma^2, without overflow
                total += np.logaddexp(np.log1p(-rate) if rate < 1 else -np.inf,
                                      np.log(rate) + (x - 0.5) / sigma ** 2)
    return total


@dataclass(frozen=True)
class Ceiling:
    """The one-run bound on the idealised mechanism: mean, least and most over ``draws``."""

    score: str
    mean: float
    low: float
    high: float
    draws: int


def ceiling(segments: Segments, m: int, delta: float, confidence: float, score: str = "sum",
            draws: int = 5, rng: np.random.Generator | None = None) -> Ceiling:
    """The bound the one-run procedure (same m, guess grid and confidence as
    :func:`sim.audit_bound.audit_scores`) reaches on ``draws`` simulated runs of the
    idealised mechanism with the accountant's ``segments``."""
    if m < 2 or draws < 1:
        raise ValueError(f"need m >= 2 and draws >= 1, got {m}, {draws}")
    rng = rng or np.random.default_rng()
    bounds = []
    for _ in range(draws):
        included = rng.random(m) < 0.5
        scores = ideal_scores(segments, included, score, rng)
        bounds.append(audit_scores(scores, included, delta, confidence).epsilon_lower_bound)
    return Ceiling(score, float(np.mean(bounds)), float(min(bounds)), float(max(bounds)),
                   draws)
