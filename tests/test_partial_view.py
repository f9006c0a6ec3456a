"""Announcement buckets (protocol/buckets.py) and the bucket-following plan
(peer/network/view/partial.py): pure parts of the bounded membership view."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from peer.network.view.partial import (
    ALL_BUCKETS,
    Following,
    ViewConfig,
    estimate_network,
    plan_follow,
    plan_rotation,
    plan_trim,
)
from protocol.buckets import ANNOUNCE_BUCKETS, bucket_level, bucket_of, parse_bucket_level


def test_buckets_are_deterministic_per_network_and_spread_evenly() -> None:
    ids = [f"peer{i}" for i in range(6400)]
    buckets = Counter(bucket_of("net", p) for p in ids)
    assert set(buckets) == set(range(ANNOUNCE_BUCKETS))
    assert max(buckets.values()) < 2 * 6400 / ANNOUNCE_BUCKETS  # no bucket twice its share
    assert bucket_of("net", "peer1") == bucket_of("net", "peer1")
    moved = sum(bucket_of("net", p) != bucket_of("other", p) for p in ids[:640])
    assert moved > 500  # the network id salts the hash


@pytest.mark.parametrize("bucket", [0, 9, 63])
def test_bucket_levels_round_trip(bucket: int) -> None:
    level = bucket_level(bucket)
    assert len(level) == 2 and level == level.lower()
    assert parse_bucket_level(level) == bucket


@pytest.mark.parametrize("level", ["40", "4", "0a0", "0A", "+", "", "zz"])
def test_invalid_bucket_levels(level: str) -> None:
    assert parse_bucket_level(level) is None


@pytest.mark.parametrize("bad", [-1, 64, True, 1.0])
def test_bucket_level_rejects_out_of_range(bad: object) -> None:
    with pytest.raises(ValueError):
        bucket_level(bad)  # type: ignore[arg-type]


def simulate(n_peers: int, view_size: int, seed: int = 1) -> tuple[Following, int]:
    """Follow buckets as a peer would in a network of n_peers; return (following, view)."""
    rng = random.Random(seed)
    per_bucket = Counter(bucket_of("net", f"p{i}") for i in range(n_peers))
    following = Following()
    for _ in range(ANNOUNCE_BUCKETS + 2):
        heard = {b: per_bucket[b] for b in range(ANNOUNCE_BUCKETS)} if following.everything \
            else {b: per_bucket[b] for b in following.buckets}
        step = plan_follow(following, heard, view_size, rng)
        if step is None:
            break
        if step == ALL_BUCKETS:
            following = Following(everything=True)
        else:
            assert step not in following.buckets
            following.buckets.append(step)
    view = n_peers if following.everything else sum(per_bucket[b] for b in following.buckets)
    return following, view


@pytest.mark.parametrize("n_peers", [8, 32])
def test_small_networks_follow_every_bucket(n_peers: int) -> None:
    for seed in range(20):
        following, view = simulate(n_peers, 32, seed)
        assert following.everything and view == n_peers


@pytest.mark.parametrize("n_peers", [96, 128, 256, 1024, 2048])
def test_large_networks_follow_just_enough_buckets(n_peers: int) -> None:
    for seed in range(20):
        following, view = simulate(n_peers, 32, seed)
        assert not following.everything
        assert 32 <= view <= 32 + 2 * n_peers / ANNOUNCE_BUCKETS, (seed, view)
        assert len(following.buckets) < ANNOUNCE_BUCKETS


def test_view_size_zero_means_the_full_view() -> None:
    assert plan_follow(Following(), {}, 0, random.Random(0)) == ALL_BUCKETS


def test_estimate_scales_the_followed_share_of_buckets() -> None:
    assert estimate_network(Following(buckets=[1, 2]), {1: 3, 2: 5}) == 8 * ANNOUNCE_BUCKETS / 2
    assert estimate_network(Following(everything=True), {1: 3, 2: 5}) == 8


def test_rotation_swaps_a_followed_bucket_for_a_new_one() -> None:
    rng = random.Random(3)
    following = Following(buckets=[4, 7, 9])
    new, old = plan_rotation(following, rng)  # type: ignore[misc]
    assert new not in following.buckets and old in following.buckets
    assert plan_rotation(Following(everything=True), rng) is None
    assert plan_rotation(Following(), rng) is None
    assert plan_rotation(Following(buckets=list(range(ANNOUNCE_BUCKETS))), rng) is None


def test_view_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        ViewConfig(view_size=-1)
    with pytest.raises(ValueError):
        ViewConfig(rotate_s=0)
    with pytest.raises(ValueError):
        ViewConfig(lookup_held=0)


def test_empty_buckets_do_not_make_a_network_look_small() -> None:
    # 20 peers, a view of 4: one empty bucket must not switch to every bucket (20 > 2 x 4).
    rng = random.Random(0)
    assert plan_follow(Following(buckets=[5]), {5: 0}, 4, rng) not in (None, ALL_BUCKETS)
    # ... nor seven with one peer heard (one bucket's count is too noisy an estimate) ...
    assert plan_follow(Following(buckets=list(range(7))), {3: 1}, 4, rng) not in (
        None, ALL_BUCKETS)
    # ... but eight empty buckets of 64 do (at most about 8 peers expected).
    assert plan_follow(Following(buckets=list(range(8))), {}, 4, rng) == ALL_BUCKETS
    following, view = simulate(20, 4, seed=3)
    assert not following.everything and 4 <= view < 20


def test_trim_drops_only_buckets_the_view_does_not_need() -> None:
    rng = random.Random(5)
    following = Following(buckets=[1, 2, 3])
    # 10 + 12 + 20 heard, view 30: only bucket 1 or 2 can go (42 - 20 < 30)
    dropped = {plan_trim(following, {1: 10, 2: 12, 3: 20}, 30, rng) for _ in range(40)}
    assert dropped == {1, 2}
    assert plan_trim(following, {1: 10, 2: 12, 3: 9}, 30, rng) is None  # all needed
    assert plan_trim(Following(buckets=[1]), {1: 99}, 30, rng) is None
    assert plan_trim(Following(everything=True), {}, 30, rng) is None


def test_rotating_and_trimming_keeps_the_followed_set_from_growing() -> None:
    """Many rotations in a 256-peer network: follow again, trim, and the view stays near
    view_size instead of ratcheting up a bucket at a time."""
    rng = random.Random(11)
    per_bucket = Counter(bucket_of("net", f"p{i}") for i in range(256))
    following, _view = simulate(256, 32, seed=11)
    for _ in range(300):
        new, old = plan_rotation(following, rng)  # type: ignore[misc]
        following.buckets.remove(old)
        following.buckets.append(new)
        for plan in (plan_follow, plan_trim):
            while True:
                heard = {b: per_bucket[b] for b in following.buckets}
                step = plan(following, heard, 32, rng)
                if step is None:
                    break
                if plan is plan_follow:
                    following.buckets.append(step)
                else:
                    following.buckets.remove(step)
        view = sum(per_bucket[b] for b in following.buckets)
        assert 32 <= view <= 32 + max(per_bucket.values()), view
