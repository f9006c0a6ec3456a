"""Announcement buckets: where a peer announces, so others can follow a part of the network.

A peer's ANNOUNCE, LEAVE and last will go to ``murmur/{network}/{peer}/announce/{bb}``, where
``bb`` is its bucket in two lower-case hex digits (docs/design/partial-view.md). A peer that
follows a few buckets hears about a bounded share of the network instead of all of it.

Security property: the bucket is a public, deterministic function of the network and the
peer id (BLAKE2b under a domain tag). Anyone can compute where a given peer announces, which
is what lets a peer look up a sender it has never heard of; and nobody can pick a bucket
without picking the id, which the admission key fixes.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

#: How many buckets announcements are spread over. A protocol constant: every peer of a
#: network must compute the same bucket for the same id.
ANNOUNCE_BUCKETS: Final = 64

_DOMAIN: Final = b"murmur/v2/bucket\x00"
_LEVEL_RE: Final = re.compile(r"[0-9a-f]{2}")


def bucket_of(network: str, peer: str) -> int:
    """The bucket ``peer`` announces in, in ``range(ANNOUNCE_BUCKETS)``."""
    digest = hashlib.blake2b(_DOMAIN + network.encode() + b"\x00" + peer.encode(),
                             digest_size=8).digest()
    return digest[0] % ANNOUNCE_BUCKETS


def bucket_level(bucket: int) -> str:
    """A bucket as its topic level: two lower-case hex digits."""
    if isinstance(bucket, bool) or not isinstance(bucket, int) \
            or not 0 <= bucket < ANNOUNCE_BUCKETS:
        raise ValueError(f"bucket must be an int in [0, {ANNOUNCE_BUCKETS}), got {bucket!r}")
    return f"{bucket:02x}"


def parse_bucket_level(level: str) -> int | None:
    """The bucket a topic level names, or None when it is not a valid bucket level."""
    if _LEVEL_RE.fullmatch(level) is None:
        return None
    bucket = int(level, 16)
    return bucket if bucket < ANNOUNCE_BUCKETS else None
