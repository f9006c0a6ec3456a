"""The one-run method's ceiling (sim/audit_ceiling.py): the idealised mechanism simulated.

Seeded simulations (the ceiling is an auditor's calculation, not a release), so every
assertion below is deterministic.
"""

from __future__ import annotations

import numpy as np
import pytest

from sim.audit_bound import epsilon_lower_bound
from sim.audit_ceiling import ceiling, ideal_scores


def test_an_included_canary_shifts_the_sum_by_q_steps_and_an_excluded_one_not_at_all():
    rng = np.random.default_rng(0)
    included = np.repeat([True, False], 2000)
    scores = ideal_scores([(1.0, 0.25, 40)], included, "sum", rng)
    # mean shift q * T = 10; noise sd sqrt(T) = 6.3, so the means are 10 +- 0.3 and 0 +- 0.3
    assert scores[:2000].mean() == pytest.approx(10.0, abs=0.6)
    assert scores[2000:].mean() == pytest.approx(0.0, abs=0.6)


def test_the_stepwise_score_ranks_like_the_likelihood_ratio():
    rng = np.random.default_rng(1)
    included = np.repeat([True, False], 500)
    scores = ideal_scores([(0.5, 0.1, 30)], included, "stepwise", rng)
    # at q = 0.1 an excluded canary's log-likelihood ratio is negative on average
    assert scores[500:].mean() < 0 < scores[:500].mean()


def test_the_ceiling_grows_as_the_noise_shrinks_and_never_beats_perfect_guesses():
    rng = np.random.default_rng(2)
    loud = ceiling([(20.0, 0.2, 50)], 1000, 1e-5, 0.95, draws=3, rng=rng)
    quiet = ceiling([(0.05, 1.0, 1)], 1000, 1e-5, 0.95, draws=3, rng=rng)
    assert loud.mean < 0.2 and loud.low <= loud.mean <= loud.high
    # with almost no noise every guess is right: the bound of 500 of 500 (grid's largest)
    perfect = epsilon_lower_bound(1000, 500, 500, 1e-5, 1 - 0.05 / 12)
    assert quiet.mean == pytest.approx(perfect, rel=0.05) and quiet.high <= perfect + 1e-9


@pytest.mark.parametrize("segments", [[(0.0, 0.1, 5)], [(1.0, 1.5, 5)], [(1.0, 0.1, -1)]])
def test_a_mechanism_that_is_not_one_is_refused(segments):
    with pytest.raises(ValueError):
        ideal_scores(segments, np.ones(4, bool), "sum", np.random.default_rng(0))


def test_an_unknown_score_is_refused():
    with pytest.raises(ValueError, match="score"):
        ideal_scores([(1.0, 0.1, 5)], np.ones(4, bool), "median", np.random.default_rng(0))
