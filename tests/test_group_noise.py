"""peer/training/group_noise.py: the rounding, the integer split and sigma_eff of group noise.

The Rényi check computes the exact distribution of sum_j R(G_j) (R = round half up) by
convolution in log space, since plain CDF differences cancel in the tails and would give false
alarms, and compares its divergence from the integer-shifted distribution with the Gaussian
bound the privacy argument gives (docs/privacy.md, "Group noise").
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy.special import log_ndtr, logsumexp

from crypto.field import PRIME
from peer.training.group_noise import (
    GroupNoise,
    decode_sum,
    member_share,
    round_half_up,
    to_field,
)
from peer.training.privacy.noise import SecureGaussian


def test_round_half_up_is_floor_of_x_plus_half_not_numpys_half_to_even() -> None:
    values = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49999999999999994, -0.7, 3.2])
    assert round_half_up(values).tolist() == [-2, -1, 0, 1, 2, 3, 0, -1, 3]
    assert np.round(values[:6]).tolist() != round_half_up(values[:6]).tolist()


def test_rounding_an_integer_plus_noise_is_the_integer_plus_the_rounded_noise() -> None:
    # Values on a 2^-20 grid with |Q| < 2^31, so the float64 sum Q + G is exact and this
    # checks the identity itself (the code never forms Q + G: it adds the integers).
    rng = np.random.default_rng(0)
    q = rng.integers(-2**31, 2**31, 200_000).astype(np.float64)
    g = np.round(rng.normal(0, 50, 200_000) * 2**20) / 2**20
    g[:1000] = np.round(g[:1000]) + 0.5  # exact halves, where the two roundings differ
    np.testing.assert_array_equal(round_half_up(q + g), q.astype(np.int64) + round_half_up(g))


def _log_rounded_gaussian(std: float, support: np.ndarray) -> np.ndarray:
    """log P(R(G) = k) for G ~ N(0, std^2), computed without cancelling in either tail."""
    k = np.abs(support).astype(np.float64)  # symmetric: use the right tail's mirror, k >= 0
    upper = log_ndtr(-(k - 0.5) / std)  # log P(G > k - 1/2)
    lower = log_ndtr(-(k + 0.5) / std)  # log P(G > k + 1/2)
    log_p = upper + np.log1p(-np.exp(lower - upper))
    # k = 0: P(-1/2 < G < 1/2) = 1 - 2 P(G > 1/2)
    zero = support == 0
    log_p[zero] = np.log1p(-2 * np.exp(log_ndtr(-0.5 / std)))
    return log_p


def _log_convolve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Log of the convolution of two log-pmfs on 0-centred supports of odd length."""
    n, m = a.size, b.size
    out = np.full(n + m - 1, -np.inf)
    grid = a[:, None] + b[None, :]
    for shift in range(n + m - 1):
        i = np.arange(max(0, shift - m + 1), min(n, shift + 1))
        out[shift] = logsumexp(grid[i, shift - i])
    return out


def _renyi(log_p: np.ndarray, log_q: np.ndarray, alpha: float) -> float:
    both = np.isfinite(log_p) & np.isfinite(log_q)
    return float(logsumexp(alpha * log_p[both] + (1 - alpha) * log_q[both]) / (alpha - 1))


@pytest.mark.parametrize("members", [2, 3, 5])
@pytest.mark.parametrize("std", [0.35, 0.8, 2.0])
def test_the_rounded_sum_never_exceeds_the_gaussian_renyi_bound(members: int,
                                                                std: float) -> None:
    half = int(32 * 5 + 40 * std * math.sqrt(members) + 20)  # covers the tilted mass at alpha 32
    support = np.arange(-half, half + 1)
    one = _log_rounded_gaussian(std, support)
    total = one
    for _ in range(members - 1):
        total = _log_convolve(total, one)
    for shift in (1, 2, 5):
        shifted = np.full_like(total, -np.inf)
        shifted[shift:] = total[:-shift]
        # kappa^2 <= (Delta^2 + floor(h^2/4)) / h in grid units; noise tau per member. The
        # split term matters: without it the bound fails at std 0.35 (checked when written).
        kappa_sq = (shift**2 + members**2 // 4) / members
        for alpha in (2.0, 8.0, 32.0):
            bound = alpha * kappa_sq / (2 * std**2)
            assert _renyi(shifted, total, alpha) <= bound * (1 + 1e-9)
            assert _renyi(total, shifted, alpha) <= bound * (1 + 1e-9)


def test_sigma_eff_at_the_cnn_scale_costs_a_third_of_a_percent() -> None:
    params = GroupNoise(honest_min=3, max_colluders=1, frac_bits=16, max_grad_norm=1.0,
                        dim=46_000)
    assert params.min_contributors == 4
    assert 0.996 < params.sigma_ratio < 0.998  # 0.9967
    assert params.effective_sigma(1.3) == pytest.approx(1.3 * params.sigma_ratio)
    assert params.effective_sigma(params.sigma_for_effective(0.9)) == pytest.approx(0.9)
    # rounding once instead of per example: D grows by sqrt(d)/2, about 0.16 % of sigma_eff
    s, d = 2.0**16, 46_000
    per_example = s / math.sqrt((s + math.sqrt(d) / 2) ** 2 + d * 2)
    assert 0.001 < per_example / params.sigma_ratio - 1 < 0.002


@pytest.mark.parametrize("bad", [dict(honest_min=1), dict(max_colluders=-1), dict(dim=0),
                                 dict(max_grad_norm=0.0), dict(frac_bits=31)])
def test_bad_parameters_are_refused(bad: dict[str, float]) -> None:
    base = dict(honest_min=3, max_colluders=1, frac_bits=16, max_grad_norm=1.0, dim=10)
    with pytest.raises(ValueError):
        GroupNoise(**{**base, **bad})  # type: ignore[arg-type]


@pytest.mark.parametrize("members", [3, 5])
def test_a_sum_of_zero_gradient_shares_has_the_variance_of_one_gaussian_per_honest_set(
        members: int) -> None:
    params = GroupNoise(honest_min=3, max_colluders=0, frac_bits=8, max_grad_norm=1.0,
                        dim=20_000)
    sigma = 0.7
    zero = torch.zeros(params.dim)
    total = np.zeros(params.dim, dtype=np.uint64)
    for _ in range(members):
        total = (total + to_field(member_share(zero, sigma, params, SecureGaussian()))) % PRIME
    released = decode_sum(total, params.scale)
    # each member: variance sigma^2 C^2 / h, plus the rounding's 1/12 grid unit^2
    expected = members * (sigma**2 / params.honest_min + 1 / 12 / params.scale**2)
    measured = float(released.var())
    # 20 000 coordinates: the sample variance is within 4 % with overwhelming probability
    assert measured == pytest.approx(expected, rel=0.04)
    assert abs(float(released.mean())) < 4 * math.sqrt(expected / params.dim)


def test_a_share_carries_the_rounded_gradient_exactly_and_wraps_in_the_field() -> None:
    params = GroupNoise(honest_min=2, max_colluders=0, frac_bits=16, max_grad_norm=1.0, dim=4)

    class Zero:
        secure = True

        def sample(self, n: int) -> torch.Tensor:
            return torch.zeros(n)

    clipped = torch.tensor([0.5, -0.25, 1e-6, -3.0])
    share = member_share(clipped, 1.0, params, Zero())
    assert share.tolist() == [32768, -16384, 0, -196608]
    assert decode_sum(to_field(share), params.scale).tolist() == [0.5, -0.25, 0.0, -3.0]
    with pytest.raises(ValueError, match="coordinates"):
        member_share(torch.zeros(3), 1.0, params, Zero())
    with pytest.raises(ValueError, match="non-finite"):
        member_share(torch.tensor([0.0, math.nan, 0.0, 0.0]), 1.0, params, Zero())


def test_round_half_up_is_exact_for_every_float_checked_against_rational_arithmetic() -> None:
    rng = np.random.default_rng(3)
    values = np.concatenate([
        rng.normal(0, 1e6, 5000),
        np.nextafter(np.arange(-50, 50) + 0.5, -np.inf),  # one ulp below each half
        np.arange(-50, 50) + 0.5,
        np.nextafter(np.arange(-50, 50) + 0.5, np.inf),
    ])
    exact = [math.floor(Fraction(float(v)) + Fraction(1, 2)) for v in values]
    assert round_half_up(values).tolist() == exact
