"""Which announcement buckets a peer follows, so its view stays near ``view_size`` peers.

Pure planning (docs/design/partial-view.md): the node's view loop asks :func:`plan_follow`
what to subscribe to next, given what it follows and how many live peers it heard in each
followed bucket, and :func:`plan_rotation` which bucket to swap for a fresh one. Nothing
here touches the network; the caller passes the random source, so a plan is reproducible
under test and unpredictable in a peer (``secrets.SystemRandom``).

Why one bucket is enough to size the network: buckets are a uniform hash of peer ids
(protocol/buckets.py), so the peers heard in the followed buckets, scaled by the share of
buckets followed, estimate N without any peer having to know it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from protocol.buckets import ANNOUNCE_BUCKETS

#: The plan's answer for "follow every bucket" (the full view of a small network).
ALL_BUCKETS = -1

#: Buckets a peer follows before it trusts its estimate of the network's size.
MIN_ESTIMATE_BUCKETS = 8

#: A network estimated at most this many times ``view_size`` is followed whole.
SMALL_NETWORK_FACTOR = 1.5


@dataclass(frozen=True)
class ViewConfig:
    """How big a view a peer aims at and how it refreshes it.

    ``view_size`` 0 means the full view (follow every bucket from the start: what a small,
    fixed fleet wants). ``settle_s`` is how long after a SUBACK the retained announcements
    of a new bucket are given to arrive before the next decision.
    """

    view_size: int = 32
    settle_s: float = 1.0
    rotate_s: float = 120.0
    lookup_s: float = 2.0
    lookup_held: int = 16

    def __post_init__(self) -> None:
        if self.view_size < 0:
            raise ValueError("view_size must be >= 0 (0: follow every bucket)")
        if min(self.settle_s, self.rotate_s, self.lookup_s) <= 0 or self.lookup_held < 1:
            raise ValueError("settle_s, rotate_s and lookup_s must be > 0, lookup_held >= 1")


@dataclass
class Following:
    """What a peer follows now: every bucket, or the listed ones (in the order followed)."""

    everything: bool = False
    buckets: list[int] = field(default_factory=list)


def estimate_network(following: Following, heard: Mapping[int, int]) -> float:
    """Peers in the network, estimated from those heard in the followed buckets."""
    if following.everything or not following.buckets:
        return float(sum(heard.values()))
    total = sum(heard.get(b, 0) for b in following.buckets)
    return total * ANNOUNCE_BUCKETS / len(following.buckets)


def plan_follow(following: Following, heard: Mapping[int, int], view_size: int,
                rng: random.Random) -> int | None:
    """The next bucket to follow (ALL_BUCKETS for every one), or None when the view is
    big enough. Call it after each settle; it never proposes a bucket already followed."""
    if following.everything:
        return None
    if view_size == 0:
        return ALL_BUCKETS
    if not following.buckets:
        return rng.randrange(ANNOUNCE_BUCKETS)
    heard_total = sum(heard.get(b, 0) for b in following.buckets)
    if heard_total >= view_size:
        return None
    # Only a sample of several buckets tells a small network from a large one: one bucket
    # holds a Poisson count of mean N / 64, so "one peer in one bucket" fits N = 20 as well
    # as N = 200. Below MIN_ESTIMATE_BUCKETS keep adding buckets (they are needed anyway).
    if (len(following.buckets) >= MIN_ESTIMATE_BUCKETS
            and estimate_network(following, heard) <= SMALL_NETWORK_FACTOR * view_size):
        return ALL_BUCKETS  # a small network: its full view is the bounded view
    rest = sorted(set(range(ANNOUNCE_BUCKETS)) - set(following.buckets))
    return rng.choice(rest) if rest else None


def plan_rotation(following: Following, rng: random.Random) -> tuple[int, int] | None:
    """(bucket to follow, bucket to drop) for one refresh, or None when there is nothing
    to rotate (following everything, or nothing yet, or every bucket)."""
    if following.everything or not following.buckets:
        return None
    rest = sorted(set(range(ANNOUNCE_BUCKETS)) - set(following.buckets))
    if not rest:
        return None
    return rng.choice(rest), following.buckets[rng.randrange(len(following.buckets))]


def plan_trim(following: Following, heard: Mapping[int, int], view_size: int,
              rng: random.Random) -> int | None:
    """A followed bucket to drop because the view stays at ``view_size`` without it, or None.

    Why: a rotation swaps a bucket for one that may hold fewer peers, and :func:`plan_follow`
    then adds one; without trimming when the swap brings more, the followed set only grows
    (measured: about a bucket per five rotations in a 192-peer network)."""
    if following.everything or len(following.buckets) < 2 or view_size == 0:
        return None
    total = sum(heard.get(b, 0) for b in following.buckets)
    spare = [b for b in following.buckets if total - heard.get(b, 0) >= view_size]
    return rng.choice(spare) if spare else None
