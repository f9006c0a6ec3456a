"""The one-run lower bound (sim/audit_bound.py) against figures derived without it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sim.audit_bound import audit_scores, epsilon_lower_bound, guess_grid, p_value


def _binomial_tail(r: int, v: int, p: float) -> float:
    """P[Binomial(r, p) >= v] summed term by term with exact binomial coefficients."""
    return sum(math.comb(r, j) * p**j * (1 - p) ** (r - j) for j in range(v, r + 1))


@pytest.mark.parametrize(("r", "v"), [(10, 7), (40, 30), (100, 50), (25, 25)])
def test_epsilon_zero_without_delta_is_the_fair_coin_tail(r, v):
    assert p_value(200, r, v, 0.0, 0.0) == pytest.approx(_binomial_tail(r, v, 0.5), rel=1e-9)


def test_the_delta_term_is_two_m_delta_times_the_largest_window_per_step():
    m, r, v, eps, delta = 50, 12, 9, 0.7, 1e-3
    p = math.exp(eps) / (1 + math.exp(eps))
    windows = [sum(math.comb(r, j) * p**j * (1 - p) ** (r - j) for j in range(v - i, v)) / i
               for i in range(1, v + 1)]
    expected = _binomial_tail(r, v, p) + 2 * m * delta * max(windows)
    assert p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-9)


def test_a_perfect_guesser_without_delta_inverts_p_to_the_r():
    # All r guesses right: the p-value is p^r, so the bound is logit(beta^(1/r)).
    r, beta = 1000, 0.05
    expected = math.log(beta ** (1 / r) / (1 - beta ** (1 / r)))
    assert expected > 5.8
    assert epsilon_lower_bound(r, r, r, 0.0, 1 - beta) == pytest.approx(expected, abs=1e-6)
    # delta > 0 can only lower it, a little at m delta = 0.01
    with_delta = epsilon_lower_bound(r, r, r, 1e-5, 1 - beta)
    assert 5.0 < with_delta <= expected


def test_no_better_than_chance_gives_no_bound_and_more_correct_gives_more():
    assert epsilon_lower_bound(1000, 200, 100, 1e-5, 0.95) == 0.0
    bounds = [epsilon_lower_bound(1000, 200, v, 1e-5, 0.95) for v in (120, 150, 180, 200)]
    assert bounds == sorted(bounds) and bounds[0] > 0


def test_the_bound_is_where_the_p_value_crosses_beta():
    eps = epsilon_lower_bound(500, 100, 90, 1e-5, 0.95)
    assert p_value(500, 100, 90, eps, 1e-5) <= 0.05 < p_value(500, 100, 90, eps + 1e-3, 1e-5)


def test_grid_is_fixed_before_the_scores_and_fits_m():
    grid = guess_grid(300)
    assert grid == guess_grid(300) and all(0 < k_in + k_out <= 300 for k_in, k_out in grid)


def test_scores_that_separate_perfectly_give_a_large_bound_and_noise_gives_none():
    rng = np.random.default_rng(3)
    included = rng.random(1000) < 0.5
    perfect = audit_scores(included.astype(float), included, 1e-5, 0.95)
    assert perfect.correct == perfect.guesses and perfect.epsilon_lower_bound > 4.0
    noise = audit_scores(rng.standard_normal(1000), included, 1e-5, 0.95)
    assert noise.epsilon_lower_bound < 0.5
