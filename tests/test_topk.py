"""Top-k with error feedback: exact conservation, exactly k entries, sorted unique indices."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.sharing.topk import TopK

finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3000),
    fraction=st.sampled_from([0.001, 0.01, 0.05, 0.1, 0.37]),
    seed=st.integers(0, 2**31),
    ties=st.booleans(),
)
def test_topk_properties(n: int, fraction: float, seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    if ties:  # many equal magnitudes: still exactly k entries
        update = rng.choice([-1.0, 0.0, 1.0], size=n).astype(np.float32)
    else:
        update = rng.normal(size=n).astype(np.float32)
    residual = (rng.normal(size=n) * 0.3).astype(np.float32)
    accumulated = update + residual
    indices, values, new_residual = TopK(fraction).select(update, residual)
    k = max(1, math.ceil(fraction * n))
    assert indices.dtype == np.uint32 and values.dtype == np.float32
    assert len(indices) == k == len(values)
    assert np.all(np.diff(indices.astype(np.int64)) > 0)  # sorted and unique
    sent = np.zeros(n, dtype=np.float32)
    sent[indices] = values
    np.testing.assert_array_equal(sent + new_residual, accumulated)  # bit-exact
    assert np.all(new_residual[indices] == 0)
    if k < n:
        unsent = np.delete(np.abs(accumulated), indices)
        assert np.abs(values).min() >= unsent.max()


def test_error_feedback_over_rounds_loses_nothing() -> None:
    rng = np.random.default_rng(0)
    topk = TopK(0.01)
    residual = np.zeros(5000, dtype=np.float32)
    total_in = np.zeros(5000, dtype=np.float64)
    total_out = np.zeros(5000, dtype=np.float64)
    for _ in range(20):
        update = rng.normal(size=5000).astype(np.float32)
        total_in += update
        indices, values, residual = topk.select(update, residual)
        total_out[indices] += values
    np.testing.assert_allclose(total_out + residual, total_in, atol=1e-3)


def test_topk_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="fraction"):
        TopK(0.0)
    with pytest.raises(ValueError, match="fraction"):
        TopK(1.5)
    with pytest.raises(ValueError, match="entries"):
        TopK(0.1).select(np.zeros(5), np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        TopK(0.1).select(np.array([np.nan, 1.0]), np.zeros(2))
