"""The arithmetic of private predictions (crypto/inference.py): exact logits from product shares."""

from __future__ import annotations

import numpy as np
import pytest

from crypto.errors import EncodingRangeError
from crypto.inference import (
    FeatureRangeError,
    InconsistentAnswersError,
    SnapshotParams,
    encode_features,
    encode_snapshot,
    fit_snapshot,
    fixed_point_logits,
    product_share,
    reconstruct_logits,
    share_features,
    share_snapshot,
    zero_mask,
)

SEED = bytes(range(32))
SNAPSHOT_ID = b"s" * 16


def _model(classes: int = 10, features: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    params = SnapshotParams.for_unit_variance(classes, features)
    weights = rng.normal(0, 0.05, (classes, features))
    bias = rng.normal(0, 0.5, classes)
    rows = rng.normal(0, 1, (7, features))
    rows /= np.sqrt((rows * rows).mean(axis=1, keepdims=True))  # variance 1, like GroupNorm
    return params, weights, bias, rows


def _answers(params, snapshot, rows, *, n, t, counter=1):
    weight_shares = share_snapshot(snapshot, n=n, t=t)
    feature_shares = share_features(encode_features(rows, params), n=n, t=t)
    out = {}
    for w, f in zip(weight_shares, feature_shares, strict=True):
        mask = zero_mask(SEED, SNAPSHOT_ID, "client", counter, rows=rows.shape[0],
                         classes=params.classes, t=t, point=w.x)
        out[w.x] = product_share(w, f, params, mask=mask).values
    return out


@pytest.mark.parametrize(("n", "t"), [(3, 2), (5, 3), (6, 2)])
def test_private_logits_equal_fixed_point_logits_exactly(n, t):
    params, weights, bias, rows = _model()
    snapshot = encode_snapshot(weights, bias, params)
    logits = reconstruct_logits(_answers(params, snapshot, rows, n=n, t=t), params, t=t)
    assert np.array_equal(logits, fixed_point_logits(snapshot, rows))
    # rounding bound: |Δ| <= ‖W_c‖₁ 2^-(fx+1) + ‖x‖₁ 2^-(fw+1) + products of the two + bias
    plain = rows @ weights.T + bias
    dw, dx = 2.0 ** -(params.frac_w + 1), 2.0 ** -(params.frac_x + 1)
    bound = (np.abs(weights).sum(axis=1)[None, :] * dx + np.abs(rows).sum(axis=1)[:, None] * dw
             + params.features * dw * dx + 2.0 ** -(params.frac_w + params.frac_x + 1))
    assert (np.abs(logits - plain) <= bound).all()


def test_any_2t_minus_1_answers_suffice_and_fewer_are_refused():
    params, weights, bias, rows = _model()
    snapshot = encode_snapshot(weights, bias, params)
    answers = _answers(params, snapshot, rows, n=5, t=2)
    expected = fixed_point_logits(snapshot, rows)
    subset = {x: answers[x] for x in (2, 4, 5)}
    assert np.array_equal(reconstruct_logits(subset, params, t=2), expected)
    with pytest.raises(ValueError, match="need 3 product shares"):
        reconstruct_logits({x: answers[x] for x in (1, 2)}, params, t=2)


def test_a_wrong_answer_is_caught_when_answers_are_redundant():
    params, weights, bias, rows = _model()
    snapshot = encode_snapshot(weights, bias, params)
    answers = _answers(params, snapshot, rows, n=4, t=2)
    answers[4] = answers[4].copy()
    answers[4][0] = (int(answers[4][0]) + 1) % (2**31 - 1)
    with pytest.raises(InconsistentAnswersError):
        reconstruct_logits(answers, params, t=2)


def test_the_mask_hides_the_product_polynomial_but_not_the_logit():
    # Without the mask all three points lie on h; with it the point-1 value changes while the
    # logits stay the same, so the client sees h + Z, not h.
    params, weights, bias, rows = _model()
    snapshot = encode_snapshot(weights, bias, params)
    masks = [zero_mask(SEED, SNAPSHOT_ID, "client", 1, rows=7, classes=10, t=2, point=x)
             for x in (1, 2, 3)]
    assert all(m.any() for m in masks)
    other = zero_mask(SEED, SNAPSHOT_ID, "client", 2, rows=7, classes=10, t=2, point=1)
    assert not np.array_equal(masks[0], other)
    a = _answers(params, snapshot, rows, n=3, t=2, counter=1)
    b = _answers(params, snapshot, rows, n=3, t=2, counter=2)
    assert np.array_equal(reconstruct_logits(a, params, t=2), reconstruct_logits(b, params, t=2))


def test_range_checks_refuse_what_could_wrap():
    params, weights, bias, rows = _model()
    with pytest.raises(EncodingRangeError, match="lower the fraction bits"):
        encode_snapshot(weights * 100, bias, params)
    with pytest.raises(FeatureRangeError):
        encode_features(rows * 2, params)
    with pytest.raises(ValueError, match="need 2t - 1"):
        share_snapshot(encode_snapshot(weights, bias, params), n=4, t=3)


def test_fit_snapshot_takes_the_most_bits_that_fit():
    _, weights, bias, rows = _model()
    small = fit_snapshot(weights, bias)
    large = fit_snapshot(weights * 40, bias)
    assert small.params.frac_w == 16
    assert large.params.frac_w < small.params.frac_w
    logits = reconstruct_logits(_answers(large.params, large, rows, n=3, t=2), large.params, t=2)
    assert np.array_equal(logits, fixed_point_logits(large, rows))
    with pytest.raises(EncodingRangeError):
        fit_snapshot(weights * 1e6, bias)


def test_content_hash_names_the_content():
    params, weights, bias, _ = _model()
    first = encode_snapshot(weights, bias, params)
    assert encode_snapshot(weights, bias, params).content_hash == first.content_hash
    nudged = weights.copy()
    nudged[0, 0] += 1.0
    assert encode_snapshot(nudged, bias, params).content_hash != first.content_hash


def test_each_answer_carries_its_mask_so_the_client_sees_h_plus_z():
    params, weights, bias, rows = _model()
    snapshot = encode_snapshot(weights, bias, params)
    w = share_snapshot(snapshot, n=3, t=2)[0]
    f = share_features(encode_features(rows, params), n=3, t=2)[0]
    mask = zero_mask(SEED, SNAPSHOT_ID, "client", 1, rows=7, classes=10, t=2, point=w.x)
    bare = product_share(w, f, params, mask=np.zeros_like(mask)).values.astype(np.int64)
    masked = product_share(w, f, params, mask=mask).values.astype(np.int64)
    assert np.array_equal((masked - bare) % (2**31 - 1), mask.reshape(-1).astype(np.int64))


def test_queries_of_one_counter_with_different_row_counts_share_no_mask():
    # A client may send serving peer 1 one row and peers 2 and 3 two rows under the same
    # counter. Were the masks laid out in one keystream whatever the row count, row 0 at
    # point 1 and rows 0 and 1 at points 2 and 3 would share coefficients, and this
    # combination of the five answers (free of every shared coefficient) would cancel the
    # masks: 6 Z_1(1) - (9 Z_2,0(2) - 4 Z_2,0(3)) - (9 Z_2,1(2) - 4 Z_2,1(3)) = 0.
    p = 2**31 - 1
    one = zero_mask(SEED, SNAPSHOT_ID, "client", 5, rows=1, classes=4, t=2, point=1)
    two = [zero_mask(SEED, SNAPSHOT_ID, "client", 5, rows=2, classes=4, t=2, point=x)
           for x in (2, 3)]
    a, b, c = (m.astype(np.int64) for m in (one, *two))
    combination = (6 * a[0] - (9 * b[0] - 4 * c[0]) - (9 * b[1] - 4 * c[1])) % p
    assert combination.all()  # every class stays masked
