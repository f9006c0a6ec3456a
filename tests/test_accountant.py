"""The accountant registry: the default (PLD) is sound, tighter than RDP, and round-trips.

Soundness is checked from both sides for several (q, sigma, steps) points: the default's
epsilon never exceeds the RDP cross-check's, and never falls below a lower bound computed
here in closed form (no accountant library involved).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import optimize, special, stats

from peer.training.ledger import LedgerError, PrivacyLedger
from peer.training.privacy.accountant import (
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    AccountingError,
    epsilon,
    epsilon_of_segments,
    get_accountant,
    sigma_for,
)

DELTA = 1e-5
REPO = Path(__file__).resolve().parent.parent


def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact epsilon of one Gaussian mechanism, sensitivity 1, noise ``sigma`` (Balle & Wang,
    ICML 2018, Theorem 8): the eps solving
    delta = Phi(-eps*sigma + 1/(2 sigma)) - e^eps Phi(-eps*sigma - 1/(2 sigma))."""

    def excess(eps: float) -> float:
        return (special.ndtr(-eps * sigma + 1 / (2 * sigma))
                - math.exp(eps) * special.ndtr(-eps * sigma - 1 / (2 * sigma)) - delta)

    return optimize.brentq(excess, 0.0, 100.0, xtol=1e-12)


def summed_output_lower_bound(sigma: float, q: float, steps: int, delta: float) -> float:
    """A sound LOWER bound on the epsilon of ``steps`` Poisson-subsampled Gaussian steps.

    Take neighbouring data sets D (with the record) and D' (without), where the record's
    clipped gradient is a fixed unit vector e whatever the model (a linear loss) and every
    other record's is 0. Step t then releases B_t e + N(0, sigma^2 I) with B_t ~ Bernoulli(q)
    under D and 0 under D'. Projecting every release on e and summing them is post-processing,
    so, by the data-processing inequality for the hockey-stick divergence, the epsilon at which
    that sum S is (eps, delta)-indistinguishable is at most the true epsilon. In units of
    sqrt(steps)*sigma: S ~ sum_k Binom(steps, q)(k) N(k / (sqrt(steps) sigma), 1) under D and
    N(0, 1) under D'. The likelihood ratio L(s) increases with s, so the divergence is
    H(eps) = P(S > s*) - e^eps Q(S > s*) with L(s*) = e^eps; we solve H(eps) = delta.
    At q = 1 the sum is the Gaussian mechanism with noise sigma / sqrt(steps) and this is
    exact (it equals :func:`analytic_gaussian_epsilon`); at q < 1 it is a lower bound.
    """
    ks = np.arange(steps + 1)
    log_w = stats.binom.logpmf(ks, steps, q)
    keep = log_w > -80  # weights below e^-80 cannot move delta = 1e-5
    ks, log_w = ks[keep], log_w[keep]
    means = ks / (math.sqrt(steps) * sigma)

    def log_ratio(s: float) -> float:
        return float(special.logsumexp(log_w + means * s - means**2 / 2))

    def hockey_stick(eps: float) -> float:
        threshold = optimize.brentq(lambda s: log_ratio(s) - eps, -1e3, 1e4, xtol=1e-12)
        p_tail = float(np.exp(special.logsumexp(log_w + special.log_ndtr(means - threshold))))
        return p_tail - math.exp(eps) * float(special.ndtr(-threshold))

    return optimize.brentq(lambda eps: hockey_stick(eps) - delta, 1e-6, 60.0, xtol=1e-10)


def dp_accounting_epsilon(kind: str, segments: list[tuple[float, float, int]]) -> float:
    """Epsilon at delta 1e-5 from dp-accounting's own accountant ``kind`` ("pld": PLD at the
    library's default discretization, "rdp": RDP at its default orders), Poisson-sampled
    Gaussian segments (sigma, q, steps), add/remove-one neighbours."""
    import dp_accounting as dpa

    relation = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
    make = {"pld": dpa.pld.PLDAccountant, "rdp": dpa.rdp.RdpAccountant}[kind]
    reference = make(neighboring_relation=relation)
    reference.compose(dpa.ComposedDpEvent([
        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), n)
        for sigma, q, n in segments]))
    return float(reference.get_epsilon(1e-5))


@pytest.mark.parametrize(("accountant", "slack"), [("pld", 0.0), ("rdp", 4e-3)])
def test_sigma_for_spends_its_target_by_dp_accountings_own_figure(
    accountant: str, slack: float
) -> None:
    """The noise chosen for a target is checked by dp-accounting's own API, not by the
    accountant that chose it: an accountant that under-reported epsilon would pick too little
    noise, and the library's figure at that sigma would exceed the target."""
    sigma = sigma_for(3.0, DELTA, 0.02, 500, accountant=accountant)
    spent = dp_accounting_epsilon(accountant, [(sigma, 0.02, 500)])
    assert 2.95 <= spent <= 3.0 + slack


# (q, sigma, steps): full batch one step / 125 steps; Murmur's digits (q = 32/81, 32/189,
# 125 steps) and Fashion-MNIST (q = 64/2500, 64/5000, 600 steps) runs at the RDP sigmas for
# eps 3 and 8; and a small-q, few-step point.
POINTS = [
    (1.0, 1.4941, 1),
    (1.0, 16.7188, 125),
    (32 / 81, 6.7383, 125),
    (32 / 189, 3.0469, 125),
    (64 / 2500, 1.2280, 600),
    (64 / 5000, 0.6201, 600),
    (0.01, 1.0, 100),
]


def test_default_is_pld_and_registry_names_both() -> None:
    assert DEFAULT_ACCOUNTANT == "pld"
    assert set(ACCOUNTANTS) == {"pld", "rdp"}
    assert get_accountant() is ACCOUNTANTS["pld"]
    for name, module in ACCOUNTANTS.items():
        assert name == module.NAME
    with pytest.raises(AccountingError, match="unknown accountant"):
        get_accountant("moments")


def test_lower_bound_is_exact_at_full_batch() -> None:
    # Self-check of the test's own formula: at q = 1, k steps = one Gaussian at sigma/sqrt(k).
    for sigma, steps in [(1.4941, 1), (16.7188, 125), (3.0, 10)]:
        assert math.isclose(summed_output_lower_bound(sigma, 1.0, steps, DELTA),
                            analytic_gaussian_epsilon(sigma / math.sqrt(steps), DELTA),
                            rel_tol=1e-6)


@pytest.mark.parametrize(("q", "sigma", "steps"), POINTS)
def test_pld_between_lower_bound_and_rdp(q: float, sigma: float, steps: int) -> None:
    pld = epsilon(steps, sigma, q, DELTA, accountant="pld")
    rdp = epsilon(steps, sigma, q, DELTA, accountant="rdp")
    lower = summed_output_lower_bound(sigma, q, steps, DELTA)
    assert lower <= pld <= rdp
    assert pld < 0.95 * rdp  # measurably tighter, the reason it is the default


@pytest.mark.parametrize(("sigma", "steps"), [(1.4941, 1), (16.7188, 125), (0.8, 4)])
def test_pld_nearly_exact_for_the_gaussian_mechanism(sigma: float, steps: int) -> None:
    exact = analytic_gaussian_epsilon(sigma / math.sqrt(steps), DELTA)
    pld = epsilon(steps, sigma, 1.0, DELTA, accountant="pld")
    assert exact <= pld <= exact + 0.01


@pytest.mark.parametrize(("target", "q", "steps"),
                         [(3.0, 32 / 81, 125), (3.0, 64 / 2500, 600), (8.0, 64 / 5000, 600),
                          (3.0, 1.0, 125), (1.0, 0.01, 50)])
def test_sigma_for_round_trips_and_saves_noise(target: float, q: float, steps: int) -> None:
    sigma = sigma_for(target, DELTA, q, steps)
    reached = epsilon(steps, sigma, q, DELTA)
    assert target - 0.01 <= reached <= target
    assert sigma < sigma_for(target, DELTA, q, steps, accountant="rdp")


@pytest.mark.parametrize("name", ["pld", "rdp"])
def test_segments_compose(name: str) -> None:
    one = epsilon_of_segments([(1.2, 0.0256, 600)], DELTA, name)
    two = epsilon_of_segments([(1.2, 0.0256, 250), (1.2, 0.0256, 350)], DELTA, name)
    assert math.isclose(one, two, rel_tol=1e-3)
    first = epsilon_of_segments([(1.2, 0.0256, 250)], DELTA, name)
    mixed = epsilon_of_segments([(1.2, 0.0256, 250), (0.8, 0.05, 100)], DELTA, name)
    assert mixed > max(first, epsilon_of_segments([(0.8, 0.05, 100)], DELTA, name))
    assert epsilon_of_segments([(1.2, 0.0256, 0)], DELTA, name) == 0.0
    with pytest.raises(AccountingError):
        epsilon_of_segments([(0.0, 0.1, 10)], DELTA, name)


def test_mixed_segments_never_above_rdp() -> None:
    segments = [(1.1, 0.02, 300), (0.8, 0.05, 120), (3.0, 0.4, 25)]
    assert epsilon_of_segments(segments, DELTA) <= epsilon_of_segments(segments, DELTA, "rdp")


def test_ledger_uses_default_and_old_files_still_load() -> None:
    ledger = PrivacyLedger(sigma=1.2, max_grad_norm=1.0, sample_rate=0.0256, delta=DELTA)
    assert ledger.accountant == "pld"
    assert ledger.record(600) == epsilon(600, 1.2, 0.0256, DELTA)
    # A ledger written before the accountant field existed: epsilon from RDP, no "accountant".
    rdp_eps = epsilon(600, 1.2, 0.0256, DELTA, accountant="rdp")
    old = {"format": 1, "sigma": 1.2, "max_grad_norm": 1.0, "sample_rate": 0.0256,
           "delta": DELTA, "steps": 600, "epsilon": rdp_eps, "budget_epsilon": 5.0,
           "segments": [[1.2, 0.0256, 600]]}
    loaded = PrivacyLedger.from_json(json.dumps(old))
    assert loaded.accountant == "pld" and loaded.steps == 600
    assert loaded.epsilon_after(0) == rdp_eps  # epsilon never goes down on the switch
    assert PrivacyLedger.from_json(loaded.to_json()) == loaded
    pinned = PrivacyLedger.from_json(json.dumps({**old, "accountant": "rdp"}))
    assert pinned.epsilon_after(10) == epsilon(610, 1.2, 0.0256, DELTA, accountant="rdp")
    with pytest.raises(LedgerError, match="unknown accountant"):
        PrivacyLedger.from_json(json.dumps({**old, "accountant": "moments"}))


def test_dp_accounting_is_imported_only_on_first_use() -> None:
    code = ("import sys; import peer.training.ledger, peer.training.privacy.accountant as a; "
            "print('dp_accounting' in sys.modules, 'opacus' in sys.modules); "
            "a.epsilon(10, 1.0, 0.1, 1e-5); print('dp_accounting' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout.split()
    assert out == ["False", "False", "True"]


# (sigma, q, steps) where Opacus' RDP grid ends up optimal at an end: tiny epsilon (large
# sigma, the noise search's first probes, a ledger after one step) and huge epsilon (tiny
# sigma). Before the fix each printed Opacus' raw "Optimal order is the ... alpha" warning.
LARGEST_ORDER_POINTS = [(20.0, 0.01, 1), (10.0, 1e-4, 100), (1e4, 0.4, 100)]
SMALLEST_ORDER_POINTS = [(0.3, 0.1, 1000), (0.3, 1.0, 10_000)]


def _opacus_epsilon_at_orders(sigma: float, q: float, steps: int) -> float:
    """What the RDP accountant reported before the fix: Opacus at ``rdp.ORDERS`` only."""
    import warnings

    from peer.training.privacy import rdp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning this reference reproduces
        rdp_vec = rdp.opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps,
                                       orders=rdp.ORDERS)
        eps, _ = rdp.opacus_rdp.get_privacy_spent(orders=rdp.ORDERS, rdp=rdp_vec, delta=DELTA)
    return float(eps)


@pytest.mark.parametrize(("sigma", "q", "steps"), LARGEST_ORDER_POINTS + SMALLEST_ORDER_POINTS)
def test_rdp_emits_no_library_warning_and_tightens_at_the_grid_ends(
    sigma: float, q: float, steps: int
) -> None:
    import warnings

    from peer.training.privacy import rdp

    # The library does warn at these points: the test reproduces what the user saw.
    rdp_vec = rdp.opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps,
                                         orders=rdp.ORDERS)
    with pytest.warns(UserWarning, match="Optimal order is the"):
        rdp.opacus_rdp.get_privacy_spent(orders=rdp.ORDERS, rdp=rdp_vec, delta=DELTA)
    before = _opacus_epsilon_at_orders(sigma, q, steps)

    rdp.rdp_per_step.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning escaping the accountant fails the test
        ours = epsilon(steps, sigma, q, DELTA, accountant="rdp")
        segments = epsilon_of_segments([(sigma, q, steps)], DELTA, "rdp")
        assert math.isfinite(epsilon(steps, sigma, q, DELTA, accountant="pld"))
    assert ours == segments
    assert math.isfinite(ours) and 0 <= ours < before  # extended orders: strictly tighter


def test_rdp_is_unchanged_where_the_best_order_is_inside_the_grid() -> None:
    for q, sigma, steps in POINTS:
        assert epsilon(steps, sigma, q, DELTA, accountant="rdp") == _opacus_epsilon_at_orders(
            sigma, q, steps)


@pytest.mark.parametrize(("target", "q", "steps"),
                         [(3.0, 0.02, 500), (1.0, 0.01, 50), (50.0, 0.001, 1000),
                          (0.002, 0.001, 1)])
def test_rdp_sigma_search_emits_no_library_warning(target: float, q: float, steps: int,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    # The search probes sigma = 20, 40, ... first: their bounds sit at the largest order (and
    # at target 50 the bisection reaches the smallest), which used to warn on every search.
    import warnings

    from peer.training.privacy import rdp

    rdp.forget_logged_edges()
    with warnings.catch_warnings(), caplog.at_level("INFO", logger=rdp.__name__):
        warnings.simplefilter("error")
        sigma = sigma_for(target, DELTA, q, steps, accountant="rdp")
        reached = epsilon(steps, sigma, q, DELTA, accountant="rdp")
    assert 0 < sigma < 1e6 and target - 0.01 <= reached <= target
    assert not caplog.records  # the probes' edges are not the caller's business


def test_rdp_sigma_search_reaches_targets_below_the_old_floor() -> None:
    # At orders <= 1024 epsilon never fell below ~0.0035 at delta 1e-5, so such a target was
    # unreachable; the extended orders make it reachable (with more noise, soundly).
    assert _opacus_epsilon_at_orders(1e5, 0.001, 1) > 0.003
    sigma = sigma_for(0.003, DELTA, 0.001, 1, accountant="rdp")
    assert epsilon(1, sigma, 0.001, DELTA, accountant="rdp") <= 0.003


def test_stable_large_order_sum_matches_opacus_where_opacus_is_finite() -> None:
    from peer.training.privacy import rdp

    for q, sigma in [(0.01, 1.0), (0.4, 3.0), (64 / 2500, 1.228), (1e-4, 20.0)]:
        for alpha in (2, 64, 512, 1024):
            ours = rdp.rdp_large_order(sigma, q, alpha)
            theirs = float(rdp.opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1,
                                                orders=[alpha])[0])
            assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-15)
        beyond = [rdp.rdp_large_order(sigma, q, alpha) for alpha in rdp.LARGE_ORDERS]
        assert all(math.isfinite(v) and v >= 0 for v in beyond)
        assert beyond == sorted(beyond)  # RDP never decreases with the order
    # Opacus' own sum overflows above alpha ~ 1030 (why it cannot simply be asked for more).
    assert math.isnan(float(rdp.opacus_rdp.compute_rdp(q=0.01, noise_multiplier=20.0, steps=1,
                                                 orders=[2048])[0]))


def test_rdp_edge_is_logged_once_in_murmurs_words(caplog: pytest.LogCaptureFixture) -> None:
    import warnings

    from peer.training.privacy import rdp

    rdp.forget_logged_edges()
    with warnings.catch_warnings(), caplog.at_level("INFO", logger=rdp.__name__):
        warnings.simplefilter("error")
        first = epsilon(100_000, 0.05, 1.0, DELTA, accountant="rdp")  # even 1.001 is optimal
        epsilon(200_000, 0.05, 1.0, DELTA, accountant="rdp")
        epsilon(600, 1.2, 0.0256, DELTA, accountant="rdp")  # inside the grid: nothing to say
    assert math.isfinite(first)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert messages[0].startswith("RDP bound at the smallest order 1.001: epsilon ")
    assert rdp.edges_logged() == {"smallest"}
    assert "may be loose by up to" in messages[0] and "Optimal order" not in messages[0]


def test_no_warning_reaches_stderr_from_a_fresh_process() -> None:
    # What the user saw: a raw library warning on stderr. Fresh interpreter, default filters.
    code = ("from peer.training.privacy.accountant import epsilon, sigma_for; "
            "epsilon(1, 20.0, 0.01, 1e-5, 'rdp'); epsilon(1000, 0.3, 0.1, 1e-5, 'rdp'); "
            "sigma_for(3.0, 1e-5, 0.02, 500, 'rdp'); epsilon(1, 20.0, 0.01, 1e-5); "
            "import sys; print('opacus' in sys.modules)")
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True,
                          text=True, cwd=REPO, check=True)
    assert done.stderr == ""
    assert done.stdout.split() == ["False"]  # still only Opacus' analysis file, not the package
