"""The merge rule (peer/sharing/merge.py): mean of the others, staleness weight, norm bound."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.sharing.merge import (
    MergeConfig,
    MergeRejected,
    merge_group_sum,
    norm_bound,
    staleness_weight,
)

COORDS = np.array([1, 4, 7, 9], dtype=np.uint32)


def test_mean_of_others_without_clipping() -> None:
    own = np.array([1.0, 0.0, -1.0, 0.0])
    others = [np.array([0.5, 0.5, 0.0, 0.0]), np.array([0.1, -0.3, 0.0, 0.2])]
    total = own + others[0] + others[1]
    res = merge_group_sum(COORDS, total, own, 3, 0, MergeConfig(relative_norm=10.0))
    np.testing.assert_allclose(res.values, (others[0] + others[1]) / 2, rtol=1e-6)
    assert not res.clipped
    assert res.weight == 1.0
    assert res.values.dtype == np.float32
    np.testing.assert_array_equal(res.indices, COORDS)


def test_staleness_weight_decreases() -> None:
    assert staleness_weight(1.0, 0) == 1.0
    assert staleness_weight(1.0, 1) == 0.5
    assert staleness_weight(0.5, 3) == 0.125
    with pytest.raises(ValueError):
        staleness_weight(1.0, -1)
    own = np.array([1.0, 0.0, 0.0, 0.0])
    total = own + np.array([0.0, 0.2, 0.0, 0.0]) * 2
    fresh = merge_group_sum(COORDS, total, own, 3, 0, MergeConfig())
    stale = merge_group_sum(COORDS, total, own, 3, 2, MergeConfig())
    np.testing.assert_allclose(stale.values, fresh.values / 3, rtol=1e-6)


def test_large_norm_is_clipped_to_relative_bound() -> None:
    own = np.array([0.1, 0.0, 0.0, 0.0])
    total = own + np.array([0.0, 5.0, 5.0, 0.0])
    config = MergeConfig(relative_norm=2.0)
    res = merge_group_sum(COORDS, total, own, 3, 0, config)
    assert res.clipped
    assert res.bound == pytest.approx(0.2)
    assert float(np.linalg.norm(res.values)) == pytest.approx(0.2, rel=1e-5)
    # direction preserved
    assert res.values[1] == pytest.approx(res.values[2])


def test_absolute_cap_and_floor() -> None:
    assert norm_bound(np.array([100.0]), MergeConfig(max_norm=2.0)) == 2.0
    assert norm_bound(np.zeros(3), MergeConfig(min_norm=0.01)) == 0.01


def test_non_finite_is_rejected() -> None:
    own = np.zeros(4)
    for bad in (np.nan, np.inf, -np.inf):
        total = np.array([0.0, bad, 0.0, 0.0])
        with pytest.raises(MergeRejected) as info:
            merge_group_sum(COORDS, total, own, 3, 0, MergeConfig())
        assert info.value.reason == "non_finite"


def test_implausible_norm_is_rejected() -> None:
    own = np.array([0.01, 0.0, 0.0, 0.0])
    total = np.array([1e6, 0.0, 0.0, 0.0])
    with pytest.raises(MergeRejected) as info:
        merge_group_sum(COORDS, total, own, 3, 0, MergeConfig(reject_factor=100.0))
    assert info.value.reason == "implausible_norm"


def test_shape_and_count_checks() -> None:
    with pytest.raises(MergeRejected) as info:
        merge_group_sum(COORDS, np.zeros(3), np.zeros(4), 3, 0, MergeConfig())
    assert info.value.reason == "shape_mismatch"
    for m in (1, 2):  # a sum of two minus one's own vector is the other's whole vector
        with pytest.raises(MergeRejected) as info:
            merge_group_sum(COORDS, np.ones(4), np.zeros(4), m, 0, MergeConfig())
        assert info.value.reason == "too_few_contributors"


def test_config_validation() -> None:
    for kwargs in ({"base_weight": 0.0}, {"base_weight": 1.5}, {"relative_norm": -1.0},
                   {"min_norm": 0.0}, {"max_norm": float("nan")}, {"reject_factor": 0.5}):
        with pytest.raises(ValueError):
            MergeConfig(**kwargs)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3), min_size=4, max_size=4),
    st.lists(st.floats(-1e3, 1e3), min_size=4, max_size=4),
    st.integers(3, 8),
    st.integers(0, 5),
)
def test_result_is_always_bounded_and_finite(total, own, m, s) -> None:
    config = MergeConfig()
    own_arr = np.array(own)
    try:
        res = merge_group_sum(COORDS, np.array(total), own_arr, m, s, config)
    except MergeRejected as exc:
        assert exc.reason == "implausible_norm"
        return
    assert np.all(np.isfinite(res.values))
    assert float(np.linalg.norm(res.values.astype(np.float64))) <= res.bound * (1 + 1e-5)


def test_others_sum_adds_every_other_contribution() -> None:
    own = np.array([1.0, 0.0, -1.0, 0.0])
    others = np.array([0.2, 0.4, 0.0, -0.2])
    config = MergeConfig(rule="others_sum", relative_norm=10.0)
    res = merge_group_sum(COORDS, own + others, own, 3, 0, config)
    np.testing.assert_allclose(res.values, others, rtol=1e-6)


def test_group_average_moves_own_value_to_the_group_mean() -> None:
    # Shared values are model displacements from the common init: after the merge the
    # peer's coordinates equal the group mean (own progress made since is kept on top).
    own = np.array([1.0, 0.0, -1.0, 0.5])
    a = np.array([0.0, 0.3, -0.4, 0.5])
    b = np.array([0.5, -0.3, 0.1, 0.5])
    config = MergeConfig(rule="group_average", relative_norm=10.0)
    res = merge_group_sum(COORDS, own + a + b, own, 3, 0, config)
    np.testing.assert_allclose(own + res.values, (own + a + b) / 3, rtol=1e-6, atol=1e-7)
    # Consensus is a fixed point: an agreeing group changes nothing.
    same = merge_group_sum(COORDS, 3 * own, own, 3, 0, config)
    np.testing.assert_allclose(same.values, 0.0, atol=1e-7)


def test_group_average_with_and_without_staleness_decay() -> None:
    own = np.array([1.0, 0.0, 0.0, 0.0])
    total = own + np.array([0.0, 0.6, 0.0, 0.0]) + np.array([0.0, 0.0, 0.3, 0.0])
    decayed = merge_group_sum(COORDS, total, own, 3, 1, MergeConfig(rule="group_average"))
    flat = merge_group_sum(
        COORDS, total, own, 3, 1, MergeConfig(rule="group_average", staleness_decay=False)
    )
    np.testing.assert_allclose(decayed.values, flat.values / 2, rtol=1e-6)
    assert flat.weight == 1.0 and decayed.weight == 0.5


def test_group_average_huge_member_is_clipped_or_rejected() -> None:
    own = np.array([0.5, 0.5, 0.0, 0.0])
    config = MergeConfig(rule="group_average", relative_norm=2.0, reject_factor=100.0)
    honest = 2 * own  # ours and one honest member's equal vector
    clipped = merge_group_sum(COORDS, honest + np.array([0.0, 0.0, 20.0, 0.0]), own, 3, 0,
                              config)
    assert clipped.clipped
    assert float(np.linalg.norm(clipped.values)) == pytest.approx(clipped.bound, rel=1e-5)
    with pytest.raises(MergeRejected) as info:
        merge_group_sum(COORDS, honest + np.array([0.0, 0.0, 1e6, 0.0]), own, 3, 0, config)
    assert info.value.reason == "implausible_norm"


def test_unknown_rule_is_refused() -> None:
    with pytest.raises(ValueError):
        MergeConfig(rule="median")
