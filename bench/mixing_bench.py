"""Do models still mix with a bounded membership view? How fast an update reaches everyone.

A peer with a bounded view (docs/design/partial-view.md) invites only peers in the buckets it
follows. This bench measures what that does to mixing with the node's own planning code
(protocol.buckets.bucket_of, peer.network.view.partial.plan_follow / plan_rotation), in a
model of the network's group draws rather than real peers, so that N can reach thousands:

* N peers with the ids a real network would give them; each follows buckets by plan_follow
  (or every bucket: the full view) and, every ``rotate_every`` steps, swaps one by
  plan_rotation and tops its view up again;
* each step, in random order, every peer not yet grouped in that step invites g - 1 peers
  drawn uniformly from its view among those still free; a group forms when it finds them;
* an update starts at one peer; a group's members all carry the update afterwards if any of
  them did (a group merges its sum, so every member's model holds every member's update).

Figures per row: steps until a source's update has reached half the network and all of it
(mean over ``--sources`` random sources), and the distinct partners a peer has met after
``--steps`` steps. A step is one session opportunity per peer: the scale benchmark's peers
took about 2 sessions a minute, so the default rotation every 4 steps matches the node's
rotate_s = 120 s.

    python bench/mixing_bench.py --quick            # N = 64, 256 (< 60 s)
    python bench/mixing_bench.py --out bench/results/mixing.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from peer.network.view.partial import (  # noqa: E402
    ALL_BUCKETS,
    Following,
    plan_follow,
    plan_rotation,
)
from protocol.buckets import ANNOUNCE_BUCKETS, bucket_of  # noqa: E402

NETWORK = "mixing"


@dataclass
class ModelPeer:
    """One peer of the model: what it follows and whom it met."""

    peer_id: str
    following: Following = field(default_factory=Following)
    partners: set[str] = field(default_factory=set)


def top_up(peer: ModelPeer, members: dict[int, list[str]], view_size: int,
           rng: random.Random) -> None:
    """Follow buckets by plan_follow until it says the view is big enough."""
    for _ in range(ANNOUNCE_BUCKETS + 1):
        heard = {b: len([p for p in members[b] if p != peer.peer_id])
                 for b in peer.following.buckets}
        step = plan_follow(peer.following, heard, view_size, rng)
        if step is None:
            return
        if step == ALL_BUCKETS:
            peer.following = Following(everything=True)
            return
        peer.following.buckets.append(step)


def view_of(peer: ModelPeer, everyone: list[str], members: dict[int, list[str]]) -> list[str]:
    if peer.following.everything:
        return [p for p in everyone if p != peer.peer_id]
    return [p for b in peer.following.buckets for p in members[b] if p != peer.peer_id]


def pick_free(view: list[str], busy: set[str], k: int, rng: random.Random) -> list[str] | None:
    """k distinct peers of ``view`` not in ``busy``, uniformly; None when there are fewer.
    Rejection sampling first (a full scan of a 2,000-peer view per invitation is too slow),
    then a scan once most of the view is busy."""
    picked: set[str] = set()
    for _ in range(8 * k):
        candidate = view[rng.randrange(len(view))]
        if candidate not in busy:
            picked.add(candidate)
            if len(picked) == k:
                return list(picked)
    free = [p for p in view if p not in busy]
    return rng.sample(free, k) if len(free) >= k else None


def form_groups(views: dict[str, list[str]], everyone: list[str], group_size: int,
                rng: random.Random) -> list[list[str]]:
    """One step's groups: every free peer, in random order, invites g - 1 free peers of its
    view (uniformly); a peer is in at most one group per step."""
    busy: set[str] = set()
    groups = []
    order = everyone[:]
    rng.shuffle(order)
    for initiator in order:
        if initiator in busy or not views[initiator]:
            continue
        busy.add(initiator)
        invited = pick_free(views[initiator], busy, group_size - 1, rng)
        if invited is None:
            busy.discard(initiator)
            continue
        busy.update(invited)
        groups.append([initiator, *invited])
    return groups


def run_row(n: int, view_size: int, group_size: int, rotate_every: int, steps: int,
            sources: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    everyone = [f"p{i:05d}" for i in range(n)]
    members: dict[int, list[str]] = {b: [] for b in range(ANNOUNCE_BUCKETS)}
    for p in everyone:
        members[bucket_of(NETWORK, p)].append(p)
    peers = {p: ModelPeer(p) for p in everyone}
    for peer in peers.values():
        top_up(peer, members, view_size, rng)
    started = time.perf_counter()
    chosen = rng.sample(everyone, sources)
    carriers = {s: {s} for s in chosen}
    half_at: dict[str, int] = {}
    all_at: dict[str, int] = {}
    views = {p: view_of(peer, everyone, members) for p, peer in peers.items()}
    view_sizes = [len(v) for v in views.values()]
    for step in range(1, steps + 1):
        if view_size and step % rotate_every == 0:
            for peer in peers.values():
                swap = plan_rotation(peer.following, rng)
                if swap is not None:
                    new, old = swap
                    peer.following.buckets.remove(old)
                    peer.following.buckets.append(new)
                    top_up(peer, members, view_size, rng)
                    views[peer.peer_id] = view_of(peer, everyone, members)
        for group in form_groups(views, everyone, group_size, rng):
            for p in group:
                peers[p].partners.update(q for q in group if q != p)
            for s, carrying in carriers.items():
                if s not in all_at and any(p in carrying for p in group):
                    carrying.update(group)
        for s, carrying in carriers.items():
            if s not in half_at and 2 * len(carrying) >= n:
                half_at[s] = step
            if s not in all_at and len(carrying) == n:
                all_at[s] = step
    reached = [all_at.get(s) for s in chosen]
    return {
        "peers": n,
        "view": "full" if view_size == 0 else f"bounded {view_size}",
        "view_size": view_size,
        "group_size": group_size,
        "rotate_every_steps": rotate_every,
        "steps": steps,
        "sources": sources,
        "mean_view_entries": round(statistics.fmean(view_sizes), 1),
        "full_view_peers": sum(p.following.everything for p in peers.values()),
        "steps_to_half_mean": round(statistics.fmean(half_at.get(s, steps + 1)
                                                     for s in chosen), 2),
        "steps_to_all_mean": None if None in reached else round(statistics.fmean(reached), 2),
        "steps_to_all_max": None if None in reached else max(reached),
        "sources_not_everywhere": sum(r is None for r in reached),
        "distinct_partners_per_peer": round(statistics.fmean(
            len(p.partners) for p in peers.values()), 1),
        "seconds": round(time.perf_counter() - started, 2),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'N':>6} {'view':<11} {'mean view':>9} {'full-view peers':>15} "
            f"{'to half':>8} {'to all':>7} {'all max':>7} {'partners':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['peers']:>6} {r['view']:<11} {r['mean_view_entries']:>9} "
              f"{r['full_view_peers']:>15} {r['steps_to_half_mean']:>8} "
              f"{r['steps_to_all_mean']!s:>7} {r['steps_to_all_max']!s:>7} "
              f"{r['distinct_partners_per_peer']:>8}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 64 and 256 (< 60 s)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON to this file")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--view-size", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=3)
    parser.add_argument("--rotate-every", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--sources", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    sizes = args.sizes or ([64, 256] if args.quick else [64, 256, 1024, 2048])
    rows = []
    for n in sizes:
        for view_size in (0, args.view_size):
            rows.append(run_row(n, view_size, args.group_size, args.rotate_every, args.steps,
                                min(args.sources, n), args.seed))
    print_table(rows)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
