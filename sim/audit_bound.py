"""The one-run lower bound on epsilon (Steinke, Nasr & Jagielski, NeurIPS 2023).

The auditor draws, for each of m canaries, an independent fair coin S_i (in or out of the
training run), runs the mechanism once, and from its output guesses "in" for some canaries and
"out" for others (r guesses in all, the rest abstain). If the mechanism is (epsilon, delta)-DP
in each canary, the paper's theorem bounds the number W of correct guesses:

    P[W >= v] <= P[Binomial(r, p) >= v] + 2 m delta * max_{1 <= i <= v} P[v - i <= B < v] / i,

with p = e^epsilon / (1 + e^epsilon) (the accuracy of epsilon-DP randomized response) and
B ~ Binomial(r, p). The right-hand side is a p-value for the claim "(epsilon, delta)-DP":
:func:`p_value`. The lower bound at confidence 1 - beta is the largest epsilon whose claim the
observed v rejects at level beta (:func:`epsilon_lower_bound`): if the mechanism really is
(epsilon, delta)-DP, the bound exceeds epsilon with probability at most beta.

Choosing how many guesses to make after seeing the scores is a choice among tests, so
:func:`audit_scores` tries a fixed grid of (k_+, k_-) and splits beta evenly over it
(Bonferroni): the reported maximum still exceeds the true epsilon with probability <= beta.

Written from the paper's statement of the theorem. Pure: numpy and scipy, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

__all__ = ["AuditResult", "audit_scores", "epsilon_lower_bound", "guess_grid", "p_value"]

#: Bisection steps of :func:`epsilon_lower_bound`: the bracket shrinks by 2^-60.
_BISECTIONS = 60


def _accuracy(epsilon: float) -> float:
    """p = e^eps / (1 + e^eps), computed without overflow."""
    return 1.0 / (1.0 + math.exp(-epsilon))


def p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """An upper bound on P[W >= correct] for an (epsilon, delta)-DP mechanism audited with
    ``m`` canaries and ``guesses`` guesses (the theorem above); at most 1."""
    if not 0 <= correct <= guesses <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= m, got {correct}, {guesses}, {m}")
    if epsilon < 0 or not 0 <= delta < 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta < 1, got {epsilon}, {delta}")
    if correct == 0:
        return 1.0
    p = _accuracy(epsilon)
    tail = float(binom.sf(correct - 1, guesses, p))  # P[B >= correct]
    if delta == 0:
        return min(tail, 1.0)
    i = np.arange(1, correct + 1)
    # P[correct - i <= B < correct] = P[B >= correct - i] - P[B >= correct]
    window = binom.sf(correct - i - 1, guesses, p) - tail
    alpha = float(np.max(window / i))
    return min(tail + 2.0 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, guesses: int, correct: int, delta: float,
                        confidence: float) -> float:
    """The largest epsilon that ``correct`` of ``guesses`` rejects at level 1 - confidence
    (0 when not even epsilon = 0 is rejected)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    beta = 1.0 - confidence
    if p_value(m, guesses, correct, 0.0, delta) > beta:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, guesses, correct, high, delta) <= beta:
        low, high = high, 2.0 * high
        if high > 1e4:  # more than any finite claim worth auditing
            return math.inf
    for _ in range(_BISECTIONS):
        middle = (low + high) / 2.0
        if p_value(m, guesses, correct, middle, delta) <= beta:
            low = middle
        else:
            high = middle
    return low


def guess_grid(m: int) -> list[tuple[int, int]]:
    """The (k_+, k_-) pairs :func:`audit_scores` tries: guess "in" for the top k_+ scores and
    "out" for the bottom k_-, symmetric and top-only, at fixed fractions of m (fixed before any
    score is seen, so the Bonferroni split is valid)."""
    pairs = []
    for fraction in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5):
        k = max(1, round(fraction * m / 2))
        pairs.append((k, k))
        pairs.append((min(m, 2 * k), 0))
    return sorted(set(pairs))


@dataclass(frozen=True)
class AuditResult:
    """The best bound over the grid, and the guesses that gave it."""

    epsilon_lower_bound: float
    guesses: int
    correct: int
    k_in: int
    k_out: int


def audit_scores(scores: np.ndarray, included: np.ndarray, delta: float,
                 confidence: float) -> AuditResult:
    """The one-run bound from per-canary ``scores`` (higher: more likely in) and the coins
    ``included``; beta = 1 - confidence is split evenly over :func:`guess_grid`."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = scores.size
    if included.shape != scores.shape or m == 0:
        raise ValueError("need one inclusion coin per score, and at least one canary")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    grid = guess_grid(m)
    per_test = 1.0 - (1.0 - confidence) / len(grid)
    order = np.argsort(-scores, kind="stable")  # best "in" candidates first
    ranked = included[order]
    best = AuditResult(0.0, 0, 0, 0, 0)
    for k_in, k_out in grid:
        if k_in + k_out > m:
            continue
        correct = int(ranked[:k_in].sum()) + int((~ranked[m - k_out:]).sum() if k_out else 0)
        bound = epsilon_lower_bound(m, k_in + k_out, correct, delta, per_test)
        if bound > best.epsilon_lower_bound or best.guesses == 0:
            best = AuditResult(bound, k_in + k_out, correct, k_in, k_out)
    return best
