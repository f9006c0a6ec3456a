"""Prime field, fixed-point encoding and Shamir sharing (property tests)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats

from crypto.errors import EncodingRangeError
from crypto.field import (
    FIELD_BYTES,
    FIELD_DTYPE,
    HALF_PRIME,
    PRIME,
    FixedPoint,
    field_from_bytes,
    field_to_bytes,
    field_view,
    mod_add_into,
)
from crypto.shamir import Share, add_shares, lagrange_at_zero, random_field, reconstruct, split

CODE = FixedPoint(frac_bits=16, max_summands=16)
GROUPS = [(3, 2), (3, 3), (4, 3), (5, 3), (5, 5), (8, 5), (8, 8), (2, 1)]

field_vectors = hnp.arrays(
    FIELD_DTYPE, st.integers(0, 70), elements=st.integers(0, PRIME - 1)
)


def as_int(a: np.ndarray) -> list[int]:
    return [int(v) for v in a]


# --- field --------------------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(data=st.data(), size=st.integers(0, 300))
def test_mod_add_matches_python(data: st.DataObject, size: int) -> None:
    elements = st.integers(0, PRIME - 1)
    a = data.draw(hnp.arrays(FIELD_DTYPE, size, elements=elements))
    b = data.draw(hnp.arrays(FIELD_DTYPE, size, elements=elements))
    expected = [(x + y) % PRIME for x, y in zip(as_int(a), as_int(b), strict=True)]
    acc = a.copy()
    mod_add_into(acc, b)
    assert as_int(acc) == expected


def test_mod_add_edge_values_across_blocks() -> None:
    edge = np.array([0, 1, PRIME - 1, PRIME - 2, HALF_PRIME, HALF_PRIME + 1], dtype=FIELD_DTYPE)
    a = np.tile(np.repeat(edge, len(edge)), 20_000)
    b = np.tile(np.tile(edge, len(edge)), 20_000)  # > 1 block of all pairs
    acc = a.copy()
    mod_add_into(acc, b)
    expected = (a.astype(np.int64) + b.astype(np.int64)) % PRIME
    np.testing.assert_array_equal(acc, expected)


def test_mod_add_rejects_shape_mismatch() -> None:
    acc = np.zeros(4, dtype=FIELD_DTYPE)
    for other in (np.ones(1, dtype=FIELD_DTYPE), np.ones(5, dtype=FIELD_DTYPE)):
        with pytest.raises(ValueError, match="shapes"):
            mod_add_into(acc, other)


@settings(max_examples=50, deadline=None)
@given(a=field_vectors)
def test_field_bytes_round_trip(a: np.ndarray) -> None:
    wire = field_to_bytes(a)
    assert len(wire) == FIELD_BYTES * a.size
    assert bytes(field_view(a)) == wire
    np.testing.assert_array_equal(field_from_bytes(wire), a)


def test_field_wire_is_little_endian() -> None:
    assert field_to_bytes(np.array([1, 256], dtype=FIELD_DTYPE)) == b"\x01\0\0\0\0\x01\0\0"


def test_field_from_bytes_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="multiple"):
        field_from_bytes(b"\x00" * 7)
    for bad in (PRIME, 2**32 - 1):
        with pytest.raises(ValueError, match="PRIME"):
            field_from_bytes(np.array([0, bad], dtype="<u4").tobytes())
    assert field_from_bytes(b"").size == 0


def test_field_to_bytes_rejects_non_field() -> None:
    with pytest.raises(ValueError):
        field_to_bytes(np.array([PRIME], dtype=FIELD_DTYPE))
    with pytest.raises(ValueError):
        field_to_bytes(np.array([1, 2], dtype=np.int64))


# --- fixed point --------------------------------------------------------------------------

def test_max_abs_contract() -> None:
    assert CODE.max_abs * 2**16 * 16 <= HALF_PRIME
    assert (CODE.max_int + 1) * 16 > HALF_PRIME
    with pytest.raises(ValueError):
        FixedPoint(frac_bits=31)
    with pytest.raises(ValueError):
        FixedPoint(max_summands=0)


@settings(max_examples=100, deadline=None)
@given(
    values=hnp.arrays(
        st.sampled_from([np.float32, np.float64]),
        st.integers(0, 200),
        elements=st.floats(-1000.0, 1000.0, width=32),
    ),
    frac_bits=st.integers(8, 20),
)
def test_fixed_point_round_trip(values: np.ndarray, frac_bits: int) -> None:
    code = FixedPoint(frac_bits=frac_bits, max_summands=1)
    encoded = code.encode(values)
    assert encoded.dtype == FIELD_DTYPE and int(encoded.max(initial=0)) < PRIME
    decoded = code.decode(encoded)
    assert np.all(np.abs(decoded - values.astype(np.float64)) <= 2.0 ** -(frac_bits + 1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fixed_point_range_is_enforced(dtype: type) -> None:
    limit = CODE.max_abs
    ok = np.array([limit, -limit, 0.0], dtype=dtype)
    # float32 cannot hold max_abs exactly; the nearest value not above it is accepted
    ok = np.minimum(np.abs(ok), np.nextafter(dtype(limit), dtype(0))) * np.sign(ok)
    CODE.encode(ok.astype(dtype))
    for bad in (1024.0, -1024.0, 1e30, np.inf, -np.inf, np.nan):
        with pytest.raises(EncodingRangeError):
            CODE.encode(np.array([0.0, bad, 1.0], dtype=dtype))


def test_sum_of_max_summands_extremes_does_not_wrap() -> None:
    limit = np.nextafter(np.float32(CODE.max_abs), np.float32(0))
    for sign in (1.0, -1.0):
        encoded = CODE.encode(np.full(3, sign * limit, dtype=np.float32))
        total = encoded.copy()
        for _ in range(CODE.max_summands - 1):
            mod_add_into(total, encoded)
        expected = sign * CODE.max_summands * float(np.rint(float(limit) * 2**16)) / 2**16
        np.testing.assert_allclose(CODE.decode(total), expected)


def test_decode_centered_lift_edges() -> None:
    edges = np.array([0, 1, HALF_PRIME, HALF_PRIME + 1, PRIME - 1], dtype=FIELD_DTYPE)
    np.testing.assert_array_equal(
        FixedPoint(frac_bits=0).decode(edges), [0, 1, HALF_PRIME, -HALF_PRIME, -1]
    )
    np.testing.assert_array_equal(
        FixedPoint(frac_bits=4).decode(edges[:2]), [0, 1 / 16]
    )
    with pytest.raises(ValueError):
        CODE.decode(np.array([PRIME], dtype=FIELD_DTYPE))


def test_fixed_point_accepts_any_shape_and_ints() -> None:
    encoded = CODE.encode(np.array([[1, -2], [3, 0]]))
    np.testing.assert_array_equal(CODE.decode(encoded), [1, -2, 3, 0])


# --- shamir -------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(
    group=st.sampled_from(GROUPS),
    members=st.integers(1, 4),
    size=st.integers(0, 60),
    data=st.data(),
)
def test_rebuild_of_summed_shares_is_sum_of_encoded(
    group: tuple[int, int], members: int, size: int, data: st.DataObject
) -> None:
    n, t = group
    vectors = [
        data.draw(hnp.arrays(np.float32, size, elements=st.floats(-50, 50, width=32)))
        for _ in range(members)
    ]
    encoded = [CODE.encode(v) for v in vectors]
    all_shares = [split(e, n=n, t=t) for e in encoded]
    held = [add_shares([shares[i] for shares in all_shares]) for i in range(n)]
    expected = sum(e.astype(np.int64) for e in encoded) % PRIME
    for subset in itertools.combinations(held, t):
        order = data.draw(st.permutations(subset))
        np.testing.assert_array_equal(reconstruct(order, t=t), expected)
    decoded = CODE.decode(reconstruct(held[:t], t=t))
    exact = np.sum([np.rint(v.astype(np.float64) * 2**16) / 2**16 for v in vectors], axis=0)
    np.testing.assert_allclose(decoded, exact.reshape(-1), atol=1e-9)


def test_split_spans_several_blocks() -> None:
    secret = random_field((200_003,))
    shares = split(secret, n=5, t=3)
    np.testing.assert_array_equal(reconstruct([shares[4], shares[0], shares[2]], t=3), secret)
    assert all(int(s.values.max()) < PRIME for s in shares)


@pytest.mark.parametrize(("n", "t"), [(5, 3), (4, 4), (16, 9)])
def test_shares_lie_on_a_polynomial_of_degree_t_minus_1(n: int, t: int) -> None:
    secret = random_field((500,))
    shares = split(secret, n=n, t=t)
    # any t shares determine the rest: interpolate each remaining point from the first t
    base = shares[:t]
    for target in shares[t:]:
        weights = []
        for i, si in enumerate(base):
            num, den = 1, 1
            for j, sj in enumerate(base):
                if i != j:
                    num = num * (target.x - sj.x) % PRIME
                    den = den * (si.x - sj.x) % PRIME
            weights.append(num * pow(den, -1, PRIME) % PRIME)
        predicted = sum(w * s.values.astype(object) for w, s in zip(weights, base, strict=True))
        np.testing.assert_array_equal((predicted % PRIME).astype(np.int64), target.values)


def _leading_coefficient(xs: list[int], ys: list[np.ndarray]) -> np.ndarray:
    """Exact (mod p) coefficient of x^(k-1) in the unique polynomial of degree <= k - 1 through
    the k points (xs[i], ys[i]), element-wise: the divided difference
    sum_i y_i / prod_{j != i} (x_i - x_j). Computed here, independently of crypto.shamir."""
    total = np.zeros(ys[0].shape[0], dtype=np.int64)
    for i, (xi, yi) in enumerate(zip(xs, ys, strict=True)):
        denominator = 1
        for j, xj in enumerate(xs):
            if j != i:
                denominator = denominator * (xi - xj) % PRIME
        weight = pow(denominator, -1, PRIME)
        total = (total + yi.astype(np.int64) * weight % PRIME) % PRIME  # < 2^62: no overflow
    return total


def _t_minus_1_subsets(shares: list[Share], t: int) -> list[tuple[Share, ...]]:
    """The first and last t - 1 shares, and every (t-1)-subset when there are few."""
    subsets = list(itertools.combinations(shares, t - 1))
    return subsets if len(subsets) <= 20 else [subsets[0], subsets[-1], subsets[len(subsets) // 2]]


EXACT_SIZE = 2000  # elements per secret: a chance coincidence (probability 1/p each) is rare


@pytest.mark.parametrize(("n", "t"), [(3, 2), (5, 3), (4, 4), (16, 9), (3, 1)])
def test_split_polynomial_has_degree_exactly_t_minus_1(n: int, t: int) -> None:
    """Exact over the field: the secret and any t shares lie on one polynomial of degree
    <= t - 1 (their t-th divided difference is 0), and its x^(t-1) coefficient is non-zero.

    A split of degree t - 2 (any t - 1 shares then rebuild the secret) fails the second
    part everywhere; a uniform leading coefficient is zero with probability 1/p per element,
    so at most one zero in 2 000 is allowed (two happen with probability ~4e-13).
    """
    secret = random_field((EXACT_SIZE,))
    shares = split(secret, n=n, t=t)
    xs, ys = [0] + [s.x for s in shares], [secret] + [s.values for s in shares]
    for first in range(len(xs) - t):  # every window of t + 1 consecutive points
        window = slice(first, first + t + 1)
        assert not np.any(_leading_coefficient(xs[window], ys[window]))
    leading = _leading_coefficient(xs[1 : t + 1], ys[1 : t + 1])
    assert np.count_nonzero(leading == 0) <= 1
    # The same polynomial from the last t shares: the same leading coefficient.
    np.testing.assert_array_equal(_leading_coefficient(xs[-t:], ys[-t:]), leading)


@pytest.mark.parametrize(("n", "t"), [(3, 2), (5, 3), (4, 4), (16, 9)])
def test_t_minus_1_shares_fit_every_candidate_secret(n: int, t: int) -> None:
    """Exact over the field: any t - 1 shares and any candidate secret c lie on a polynomial
    of degree t - 1, of degree exactly t - 1 unless c is the one value c* the shares
    extrapolate to with degree t - 2; and c* is not the secret.

    For each candidate exactly one degree-(t-1) polynomial fits, and split draws its higher
    coefficients uniformly, so t - 1 shares leave every candidate equally likely. With a
    split of degree t - 2, c* would be the secret in every element.
    """
    secret = random_field((EXACT_SIZE,))
    shares = split(secret, n=n, t=t)
    candidates = [np.zeros(EXACT_SIZE, dtype=FIELD_DTYPE), np.full(EXACT_SIZE, PRIME - 1,
                  dtype=FIELD_DTYPE), random_field((EXACT_SIZE,)), secret]
    for subset in _t_minus_1_subsets(shares, t):
        xs, ys = [s.x for s in subset], [s.values for s in subset]
        # c* = the degree-(t-2) polynomial through the t - 1 shares, evaluated at 0.
        extrapolated = np.zeros(EXACT_SIZE, dtype=np.int64)
        for i, (xi, yi) in enumerate(zip(xs, ys, strict=True)):
            weight = 1
            for j, xj in enumerate(xs):
                if j != i:
                    weight = weight * xj % PRIME * pow(xj - xi, -1, PRIME) % PRIME
            extrapolated = (extrapolated + yi.astype(np.int64) * weight % PRIME) % PRIME
        assert np.count_nonzero(extrapolated == secret) <= 1
        for candidate in candidates:
            leading = _leading_coefficient([0, *xs], [candidate, *ys])
            np.testing.assert_array_equal(leading == 0, extrapolated == candidate)


def test_lagrange_coefficients_sum_to_one() -> None:
    for xs in ([1, 2, 3], [2, 5, 7, 8], [1]):
        assert sum(lagrange_at_zero(xs)) % PRIME == 1


def test_argument_errors() -> None:
    secret = random_field((10,))
    for n, t in [(3, 0), (3, 4), (0, 0)]:
        with pytest.raises(ValueError):
            split(secret, n=n, t=t)
    with pytest.raises(ValueError):
        split(np.array([PRIME], dtype=FIELD_DTYPE), n=3, t=2)
    with pytest.raises(ValueError):
        split(secret.astype(np.int64), n=3, t=2)
    shares = split(secret, n=4, t=3)
    with pytest.raises(ValueError, match="need 3"):
        reconstruct(shares[:2], t=3)
    with pytest.raises(ValueError, match="need 3"):
        reconstruct([shares[0], shares[0], shares[1]], t=3)
    with pytest.raises(ValueError, match="different points"):
        add_shares([shares[0], shares[1]])
    with pytest.raises(ValueError):
        add_shares([])
    with pytest.raises(ValueError, match="lengths"):
        add_shares([shares[0], Share(x=1, values=shares[0].values[:5])])
    with pytest.raises(ValueError, match="outside"):
        reconstruct([Share(x=0, values=secret), *shares[:2]], t=3)


def test_t_equals_1_shares_are_the_secret() -> None:
    secret = random_field((20,))
    for share in split(secret, n=3, t=1):
        np.testing.assert_array_equal(share.values, secret)


# --- hiding -------------------------------------------------------------------------------

SAMPLES = 120_000
BINS = 16


def _uniformity_p_value(values: np.ndarray) -> float:
    counts = np.bincount((values.astype(np.uint64) * BINS // PRIME).astype(np.int64),
                         minlength=BINS)
    return float(stats.chisquare(counts).pvalue)


def _joint_p_value(a: np.ndarray, b: np.ndarray) -> float:
    side = 6
    cells = (a.astype(np.uint64) * side // PRIME) * side + (b.astype(np.uint64) * side // PRIME)
    counts = np.bincount(cells.astype(np.int64), minlength=side * side)
    return float(stats.chisquare(counts).pvalue)


@pytest.mark.parametrize(("n", "t"), [(5, 3), (3, 3), (8, 5)])
def test_fewer_than_t_shares_are_uniform_and_independent_of_the_secret(n: int, t: int) -> None:
    """t-1 shares of very different secrets are indistinguishable from uniform.

    Secrets: all zeros vs. the field element nearest p/2 everywhere. For each, every share
    (marginal) and a pair of shares (joint 6x6 histogram) pass a chi-square test against
    uniform, and a two-sample KS test cannot tell the two secrets' shares apart. Thresholds
    are loose (1e-5) because the test must not flake; a broken sharing fails by orders of
    magnitude (a share equal to the secret gives p-values ~0).
    """
    secrets = {
        "zeros": np.zeros(SAMPLES, dtype=FIELD_DTYPE),
        "half": np.full(SAMPLES, HALF_PRIME, dtype=FIELD_DTYPE),
    }
    all_shares = {name: split(s, n=n, t=t) for name, s in secrets.items()}
    # the first t-1 points (x = 1..t-1) and the last t-1 (x = n-t+2..n)
    for subset in (slice(0, t - 1), slice(n - t + 1, n)):
        observed = {name: shares[subset] for name, shares in all_shares.items()}
        for shares in observed.values():
            assert len(shares) == t - 1
            for share in shares:
                assert _uniformity_p_value(share.values) > 1e-5
            if t - 1 >= 2:
                assert _joint_p_value(shares[0].values, shares[-1].values) > 1e-5
        for a, b in zip(observed["zeros"], observed["half"], strict=True):
            assert stats.ks_2samp(a.values, b.values).pvalue > 1e-5


def test_uniformity_test_detects_a_leak() -> None:
    """Sanity check of the statistic: t shares (not t-1) of a constant secret are dependent."""
    secret = np.zeros(SAMPLES, dtype=FIELD_DTYPE)
    shares = split(secret, n=2, t=2)
    # for t = 2 and secret 0, f(2) = 2 f(1): the joint histogram is far from uniform
    assert _joint_p_value(shares[0].values, shares[1].values) < 1e-10
    assert _uniformity_p_value(secret) < 1e-10


def test_random_field_is_canonical_and_varies() -> None:
    a = random_field((3, 1000))
    b = random_field((3, 1000))
    assert a.shape == (3, 1000) and a.dtype == FIELD_DTYPE
    assert int(a.max()) < PRIME and not np.array_equal(a, b)
    assert _uniformity_p_value(random_field((SAMPLES,))) > 1e-4
