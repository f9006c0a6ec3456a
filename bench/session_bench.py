"""Time and bytes of one aggregation session over a real Mosquitto broker on loopback.

For each group size g and top-k fraction, g real ``peer.network.node.Peer`` objects (one event loop,
real crypto, real MQTT) run back-to-back sessions with synthetic update vectors of the small
CNN's parameter count (session cost does not depend on training, only on the vector sizes).
Reported per configuration:

* median / p95 session time: from the initiator's invite until every member has rebuilt the
  group sum;
* bytes each member publishes per session (all its MQTT payloads of that session) against the
  dense float32 model sent once in the clear, and against the dense model sent to each of
  the g - 1 other members (what plain gossip in the same group would send);
* ``bytes_vs_own_vector``: the same bytes against the member's own vector on the session's
  coordinate union (4 bytes per union coordinate: the dense float32 vector over the union of
  the group's index sets), median over the sessions. 1.0 means the session costs what sending
  that vector once in the clear would; the masked session's floor is a little above 1 (the
  count slot, the seal, the envelope and the small KEYS / CONFIRM / REVEAL messages);
* ``load_1m``: the 1-minute load average when the configuration started.

Index sets are drawn independently per member (worst case: nearly disjoint, so the coordinate
union is ~g*k); ``--overlap`` makes a fraction of each set common to the group, as real top-k
sets of peers training the same model partly are. ``--session-kind masked`` runs the masked
session (one masked vector per member, docs/design/masked-sessions.md) instead of the default
Shamir session; each row names its ``session_kind``.

    python bench/session_bench.py [--quick] [--out FILE] [--sessions N] [--overlap F]
                                  [--session-kind {shamir,masked}]

Configurations: g = 3, 5, 8 at top-1 % and top-10 %, 40 sessions each. ``--quick`` (< 60 s):
g = 3 and 5 at both fractions with 8 sessions, and g = 8 at top-1 % with 4.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crypto.admission import AdmissionKey
from crypto.identity import Identity
from peer.network.node import NodeConfig, Peer, PeerEvent
from peer.network.session.kinds import SESSION_KINDS
from peer.network.session.shamir import SessionTimeouts
from peer.network.transport import BrokerSettings
from sim.broker import MosquittoBroker

NETWORK = "bench"


class NoDelayMosquitto(MosquittoBroker):
    """Mosquitto with ``set_tcp_nodelay true``.

    Measured here: without it the broker's own Nagle + delayed ACK add ~40 ms to every hop
    (request/response between two peers: 44 ms median vs 1.7 ms with it). A session has four
    dependent hops, so any Mosquitto carrying Murmur should set it.
    """

    def config_text(self) -> str:
        text = super().config_text()
        return text if "set_tcp_nodelay" in text else text + "set_tcp_nodelay true\n"


def cnn_param_count() -> int:
    """The small CNN's parameter count (peer.training.models), without keeping torch around."""
    from peer.training.models import build_model, param_count

    return int(param_count(build_model("cnn", (28, 28), 10)))


class VectorOnlyTrainer:
    """Stands in for the trainer: the node only needs the model identity and apply_update."""

    def __init__(self, param_count: int) -> None:
        self.param_count = param_count
        self.model_id = "cnn-bench"
        self.applied = 0

    def train_round(self) -> None:
        raise RuntimeError("the benchmark supplies updates itself")

    def apply_update(self, indices: np.ndarray, values: np.ndarray) -> None:
        self.applied += 1

    def evaluate(self) -> float:
        return 0.0

    def save_checkpoint(self) -> None:
        return None


QUICK_CONFIGS = ((3, 0.01, 8), (3, 0.10, 8), (5, 0.01, 8), (5, 0.10, 8), (8, 0.01, 4))
FULL_CONFIGS = tuple((g, fraction, 40) for g in (3, 5, 8) for fraction in (0.01, 0.10))


def own_vector_bytes(index_sets: list[np.ndarray]) -> int:
    """Bytes of one member's vector on the session's union: 4 per coordinate of the union."""
    if not index_sets:
        return 0
    return 4 * int(np.unique(np.concatenate(index_sets)).size)


def bytes_vs_own_vector(bytes_sent: float, index_sets: list[np.ndarray]) -> float:
    """What a member sent in one session, over the size of its own vector on the union."""
    own = own_vector_bytes(index_sets)
    if own == 0:
        raise ValueError("the union of the index sets is empty")
    return bytes_sent / own


def synthetic_indices(rng: np.random.Generator, n: int, k: int, common: np.ndarray) -> np.ndarray:
    own = rng.choice(n, size=k, replace=False)
    merged = np.unique(np.concatenate([common, own]))[:k] if common.size else np.unique(own)
    if merged.size < k:
        extra = np.setdiff1d(rng.choice(n, size=2 * k, replace=False), merged)[: k - merged.size]
        merged = np.unique(np.concatenate([merged, extra]))
    return merged.astype(np.uint32)


async def run_config(url: str, g: int, fraction: float, sessions: int, warmup: int,
                     overlap: float, param_count: int,
                     session_kind: str = "shamir") -> dict[str, float | int | str]:
    load_1m = round(os.getloadavg()[0], 2)  # the VM is shared: say how busy it was
    admission = AdmissionKey.generate(NETWORK)
    done: dict[bytes, dict[str, float]] = {}
    started: dict[bytes, float] = {}
    aborted: set[bytes] = set()
    changed = asyncio.Event()

    def on_event(event: PeerEvent) -> None:
        sid = event.data.get("session_id")
        if not isinstance(sid, bytes):
            return
        if event.kind == "session_done":
            done.setdefault(sid, {})[event.peer_id] = event.time
            if event.data["role"] == "initiator":
                started[sid] = float(event.data["started_at"])
        elif event.kind == "session_aborted":
            aborted.add(sid)
        changed.set()

    config = NodeConfig(
        group_size=g,
        threshold=max(2, (g + 1) // 2),
        timeouts=SessionTimeouts(invite_s=5.0, start_s=8.0, share_s=8.0, partial_s=8.0),
        train=False,
        auto_start=False,
        cooldown_s=0.0,  # sessions back to back: the benchmark starts each one itself
        session_kind=session_kind,
    )
    peers = []
    now = time.time()
    for i in range(g):
        ident = Identity.generate(f"b{i}")
        cert = admission.issue(ident.public, valid_for_s=3600, now=now)
        peers.append(Peer(identity=ident, certificate=cert,
                          admission_public_key=admission.public_key, network_id=NETWORK,
                          trainer=VectorOnlyTrainer(param_count),
                          broker=BrokerSettings(url=url), config=config, on_event=on_event))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(p.run(stop)) for p in peers]
    rng = np.random.default_rng(0)
    k = max(1, round(fraction * param_count))
    times_ms: list[float] = []
    bytes_per_member: list[float] = []
    vs_own_vector: list[float] = []
    union_sizes: list[int] = []
    failures = 0
    try:
        deadline = time.monotonic() + 20
        while any(p.status().peers_live < g - 1 for p in peers):
            if time.monotonic() > deadline:
                raise RuntimeError("peers did not see each other")
            await asyncio.sleep(0.05)
        for n in range(warmup + sessions):
            common = rng.choice(param_count, size=int(overlap * k), replace=False)
            index_sets = []
            for p in peers:
                idx = synthetic_indices(rng, param_count, k, common)
                index_sets.append(idx)
                p.offer_update(idx, rng.normal(0.0, 0.01, idx.size).astype(np.float32), n)
            sent_before = [p.transport.bytes_sent for p in peers]
            initiator = peers[n % g]
            if not initiator.try_start_session():
                failures += 1
                continue
            assert initiator.session is not None
            sid = initiator.session.session_id
            t_end = time.monotonic() + 30
            while len(done.get(sid, {})) < g and sid not in aborted:
                changed.clear()
                remaining = t_end - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(changed.wait(), timeout=remaining)
                except TimeoutError:
                    break
            # let the surplus partials and acks settle before counting bytes
            while any(p.session is not None for p in peers):
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.02)
            if len(done.get(sid, {})) < g:
                failures += 1
                continue
            if n < warmup:
                continue
            times_ms.append((max(done[sid].values()) - started[sid]) * 1000.0)
            sent = [p.transport.bytes_sent - b for p, b in zip(peers, sent_before, strict=True)]
            bytes_per_member.append(statistics.mean(sent))
            vs_own_vector.append(bytes_vs_own_vector(statistics.mean(sent), index_sets))
            union_sizes.append(own_vector_bytes(index_sets) // 4)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    dense = 4 * param_count
    median_bytes = statistics.median(bytes_per_member) if bytes_per_member else float("nan")
    times_sorted = sorted(times_ms)
    p95 = times_sorted[min(len(times_sorted) - 1, int(0.95 * len(times_sorted)))] \
        if times_sorted else float("nan")
    return {
        "group_size": g,
        "topk_fraction": fraction,
        "overlap": overlap,
        "param_count": param_count,
        "sessions": len(times_ms),
        "failed": failures,
        "median_ms": statistics.median(times_ms) if times_ms else float("nan"),
        "p95_ms": p95,
        "bytes_per_member": median_bytes,
        "dense_bytes": dense,
        "ratio_vs_dense_once": median_bytes / dense,
        "ratio_vs_dense_to_each": median_bytes / (dense * (g - 1)),
        "session_kind": session_kind,
        "union_coordinates": statistics.median(union_sizes) if union_sizes else float("nan"),
        "bytes_vs_own_vector": statistics.median(vs_own_vector) if vs_own_vector
        else float("nan"),
        "load_1m": load_1m,
    }


async def main_async(args: argparse.Namespace) -> list[dict[str, float | int | str]]:
    if not NoDelayMosquitto.available():
        raise SystemExit("mosquitto is not installed")
    param_count = cnn_param_count()
    configs = QUICK_CONFIGS if args.quick else FULL_CONFIGS
    rows = []
    broker = NoDelayMosquitto()
    await broker.start()
    try:
        for g, fraction, sessions in configs:
            rows.append(await run_config(broker.url, g, fraction, args.sessions or sessions, 2,
                                         args.overlap, param_count, args.session_kind))
            r = rows[-1]
            print(f"[{args.session_kind}] g={g} top-k={fraction:.0%}: "
                  f"median {r['median_ms']:.1f} ms, "
                  f"p95 {r['p95_ms']:.1f} ms, {r['bytes_per_member']:.0f} B/member "
                  f"({r['ratio_vs_dense_once']:.2f}x dense, "
                  f"{r['ratio_vs_dense_to_each']:.3f}x dense to each, "
                  f"{r['bytes_vs_own_vector']:.2f}x own vector on the union), "
                  f"{r['sessions']} ok / {r['failed']} failed, load {r['load_1m']}", flush=True)
    finally:
        await broker.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and sessions (< 60 s)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON to this file")
    parser.add_argument("--sessions", type=int, default=0, help="measured sessions per config")
    parser.add_argument("--overlap", type=float, default=0.0,
                        help="fraction of each index set common to the group (0..1)")
    parser.add_argument("--session-kind", choices=sorted(SESSION_KINDS), default="shamir",
                        help="which aggregation session the peers run (default: shamir)")
    args = parser.parse_args()
    if not 0.0 <= args.overlap <= 1.0:
        parser.error("--overlap must be in [0, 1]")
    rows = asyncio.run(main_async(args))
    print()
    print(f"{'g':>3} {'top-k':>6} {'median ms':>10} {'p95 ms':>8} {'B/member':>10} "
          f"{'x dense':>8} {'x dense*(g-1)':>14} {'x own vec':>10}")
    for r in rows:
        print(f"{r['group_size']:>3} {r['topk_fraction']:>6.0%} {r['median_ms']:>10.1f} "
              f"{r['p95_ms']:>8.1f} {r['bytes_per_member']:>10.0f} "
              f"{r['ratio_vs_dense_once']:>8.3f} {r['ratio_vs_dense_to_each']:>14.3f} "
              f"{r['bytes_vs_own_vector']:>10.3f}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
