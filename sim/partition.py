"""Splitting one labelled data set among simulated peers: IID, Dirichlet non-IID, label shards.

Pure numpy functions. Every function returns one sorted int64 index array per peer; each index
of `labels` is used at most once across peers (disjointness), so no two simulated peers ever
train on the same example. All randomness comes from the caller's `numpy.random.Generator`
(simulation seed), never from a global state; this is data placement, not cryptography.
"""

from __future__ import annotations

import math

import numpy as np

PARTITION_SCHEMES = ("iid", "dirichlet", "shards")


class PartitionError(ValueError):
    """The requested partition is impossible or its arguments are invalid."""


def _check_labels(labels: np.ndarray, n_peers: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise PartitionError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise PartitionError(f"labels must be integers, got dtype {labels.dtype}")
    if isinstance(n_peers, bool) or not isinstance(n_peers, int | np.integer) or n_peers < 1:
        raise PartitionError(f"n_peers must be a positive integer, got {n_peers!r}")
    if n_peers > labels.size:
        raise PartitionError(f"cannot give {n_peers} peers at least one of {labels.size} examples")
    return labels


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid(labels: np.ndarray, n_peers: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle all indices and deal them into n_peers near-equal parts (sizes differ by <= 1)."""
    labels = _check_labels(labels, n_peers)
    order = rng.permutation(labels.size)
    return _finish(np.array_split(order, n_peers))


def dirichlet(
    labels: np.ndarray,
    n_peers: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
    max_attempts: int = 200,
) -> list[np.ndarray]:
    """Label-skewed split: for each class, its examples go to peers in Dir(alpha) proportions.

    Small alpha (0.1) gives each peer a few dominant classes; large alpha (100) approaches IID.
    All examples are used. Draws are repeated until every peer holds at least min_size examples;
    PartitionError if that does not happen within max_attempts (alpha too small for the data).
    """
    labels = _check_labels(labels, n_peers)
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise PartitionError(f"alpha must be a finite number > 0, got {alpha!r}")
    if min_size < 0:
        raise PartitionError(f"min_size must be >= 0, got {min_size}")
    if n_peers * min_size > labels.size:
        raise PartitionError(
            f"{n_peers} peers x min_size {min_size} exceeds the {labels.size} examples available"
        )
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    for _ in range(max_attempts):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_peers)]
        for members in by_class:
            shuffled = rng.permutation(members)
            proportions = rng.dirichlet(np.full(n_peers, float(alpha)))
            # Cut points from cumulative proportions; rounding keeps every example exactly once.
            cuts = np.round(np.cumsum(proportions)[:-1] * shuffled.size).astype(np.int64)
            for peer, piece in enumerate(np.split(shuffled, cuts)):
                parts[peer].append(piece)
        merged = [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]
        if min(m.size for m in merged) >= min_size:
            return _finish(merged)
    raise PartitionError(
        f"no Dirichlet(alpha={alpha}) split gave all {n_peers} peers >= {min_size} examples in "
        f"{max_attempts} attempts; raise alpha, lower min_size or use fewer peers"
    )


def shards(
    labels: np.ndarray, n_peers: int, shards_per_peer: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Pathological non-IID split: sort by label, cut into n_peers*shards_per_peer contiguous
    shards, give each peer shards_per_peer random shards (so each peer sees few classes).

    All examples are used; shard sizes differ by at most one.
    """
    labels = _check_labels(labels, n_peers)
    if isinstance(shards_per_peer, bool) or shards_per_peer < 1:
        raise PartitionError(f"shards_per_peer must be >= 1, got {shards_per_peer!r}")
    n_shards = n_peers * shards_per_peer
    if n_shards > labels.size:
        raise PartitionError(f"{n_shards} shards cannot be cut from {labels.size} examples")
    # A random permutation first, then a stable sort by label: same-label examples land in a
    # shard in random order instead of dataset order.
    shuffled = rng.permutation(labels.size)
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = np.array_split(by_label, n_shards)
    assignment = rng.permutation(n_shards).reshape(n_peers, shards_per_peer)
    return _finish([np.concatenate([pieces[s] for s in row]) for row in assignment])


def partition(
    labels: np.ndarray,
    n_peers: int,
    scheme: str,
    rng: np.random.Generator,
    *,
    alpha: float = 0.5,
    shards_per_peer: int = 2,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Dispatch on scheme name ("iid" | "dirichlet" | "shards")."""
    if scheme == "iid":
        return iid(labels, n_peers, rng)
    if scheme == "dirichlet":
        return dirichlet(labels, n_peers, alpha, rng, min_size=min_size)
    if scheme == "shards":
        return shards(labels, n_peers, shards_per_peer, rng)
    raise PartitionError(
        f"unknown partition scheme {scheme!r}; expected one of {PARTITION_SCHEMES}"
    )


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each peer's label distribution and the global one.

    0 means every peer sees the global class mix; values near 1 mean peers see disjoint classes.
    Used in the report and to check that smaller alpha gives a more skewed split.
    """
    labels = np.asarray(labels)
    classes, global_counts = np.unique(labels, return_counts=True)
    global_dist = global_counts / global_counts.sum()
    distances = []
    for part in parts:
        if part.size == 0:
            continue
        counts = np.array([(labels[part] == c).sum() for c in classes], dtype=np.float64)
        distances.append(0.5 * np.abs(counts / counts.sum() - global_dist).sum())
    return float(np.mean(distances)) if distances else 0.0
