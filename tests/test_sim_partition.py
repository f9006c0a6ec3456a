"""Partition functions: coverage, disjointness, determinism, and skew growing as alpha shrinks."""

from __future__ import annotations

import numpy as np
import pytest

from sim.partition import (
    PartitionError,
    dirichlet,
    iid,
    label_skew,
    partition,
    shards,
)


def _labels(n: int = 1000, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=n)


def _assert_disjoint_and_valid(parts: list[np.ndarray], n: int, *, complete: bool) -> None:
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert len(np.unique(joined)) == joined.size, "an index was given to two peers"
    assert joined.min() >= 0 and joined.max() < n
    if complete:
        assert joined.size == n, "some examples were not given to any peer"
    for p in parts:
        assert np.all(np.diff(p) > 0)


@pytest.mark.parametrize(
    "make",
    [
        lambda y, rng: iid(y, 8, rng),
        lambda y, rng: dirichlet(y, 8, 0.5, rng, min_size=10),
        lambda y, rng: dirichlet(y, 8, 0.1, rng, min_size=5),
        lambda y, rng: shards(y, 8, 2, rng),
    ],
    ids=["iid", "dirichlet-0.5", "dirichlet-0.1", "shards"],
)
def test_every_scheme_covers_all_indices_disjointly(make) -> None:
    y = _labels()
    parts = make(y, np.random.default_rng(1))
    assert len(parts) == 8
    _assert_disjoint_and_valid(parts, y.size, complete=True)
    assert all(p.size > 0 for p in parts)


def test_iid_sizes_are_balanced_and_deterministic_for_a_seed() -> None:
    y = _labels(1003)
    parts = iid(y, 8, np.random.default_rng(7))
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    again = iid(y, 8, np.random.default_rng(7))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = iid(y, 8, np.random.default_rng(8))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    y = _labels(2000)

    def mean_skew(alpha: float) -> float:
        return float(np.mean([
            label_skew(y, dirichlet(y, 8, alpha, np.random.default_rng(s), min_size=1))
            for s in range(5)
        ]))

    skews = [mean_skew(a) for a in (100.0, 1.0, 0.1)]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.1  # near IID
    assert skews[2] > 0.5  # few dominant classes per peer
    assert label_skew(y, iid(y, 8, np.random.default_rng(0))) < 0.1


def test_dirichlet_respects_min_size_and_reports_impossible_requests() -> None:
    y = _labels(500)
    parts = dirichlet(y, 8, 0.3, np.random.default_rng(3), min_size=20)
    assert min(p.size for p in parts) >= 20
    with pytest.raises(PartitionError, match="exceeds"):
        dirichlet(y, 8, 0.5, np.random.default_rng(0), min_size=100)
    with pytest.raises(PartitionError, match="attempts"):
        dirichlet(y, 50, 0.01, np.random.default_rng(0), min_size=9, max_attempts=3)
    for bad_alpha in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(PartitionError, match="alpha"):
            dirichlet(y, 4, bad_alpha, np.random.default_rng(0))


def test_shards_give_each_peer_few_classes() -> None:
    y = np.repeat(np.arange(10), 100)
    parts = shards(y, 10, 2, np.random.default_rng(0))
    _assert_disjoint_and_valid(parts, y.size, complete=True)
    # 20 shards of exactly one class each: a peer sees at most 2 classes.
    assert all(len(np.unique(y[p])) <= 2 for p in parts)
    assert label_skew(y, parts) > 0.7


def test_invalid_arguments_are_typed_errors() -> None:
    y = _labels(20)
    with pytest.raises(PartitionError, match="n_peers"):
        iid(y, 0, np.random.default_rng(0))
    with pytest.raises(PartitionError, match="at least one"):
        iid(y, 21, np.random.default_rng(0))
    with pytest.raises(PartitionError, match="1-D"):
        iid(y.reshape(4, 5), 2, np.random.default_rng(0))
    with pytest.raises(PartitionError, match="integers"):
        iid(y.astype(np.float32), 2, np.random.default_rng(0))
    with pytest.raises(PartitionError, match="shards cannot"):
        shards(y, 8, 3, np.random.default_rng(0))
    with pytest.raises(PartitionError, match="unknown partition scheme"):
        partition(y, 2, "random", np.random.default_rng(0))


def test_dispatch_matches_direct_calls() -> None:
    y = _labels(300)
    direct = shards(y, 5, 3, np.random.default_rng(2))
    via = partition(y, 5, "shards", np.random.default_rng(2), shards_per_peer=3)
    assert all(np.array_equal(a, b) for a, b in zip(direct, via, strict=True))
