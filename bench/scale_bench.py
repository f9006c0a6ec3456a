"""Measured scale: what one peer pays as the network grows, N = 8 ... 256.

Every peer is a real ``peer.network.node.Peer`` (real crypto, real sessions, a real Mosquitto on
loopback) with ``NodeConfig(train=False)`` and the daemon's other defaults (groups of 3, one
signed retained ANNOUNCE every 30 s). Instead of training, each peer offers one fixed random
sparse update (25 % of the digits MLP's coordinates, the default top-k) every
``--offer-interval`` seconds, at a random phase: the per-peer session rate is then set by this
pace, the same for every N, and not by how much CPU the machine has left.

Runs: N = 8, 32, 128, 256 peers as tasks of shared event loops ("in_process": the peers are
spread over ``--hosts`` processes, default 2, one loop per core of the 2-core machine), and
N = 16 peers as one OS process each ("processes"). Host processes are this file with
``--child``. The pace (default: one offer per peer every 30 s; 10 s in ``--quick``) keeps
N = 256 within the two cores; a host whose loop lags more than 50 ms on average, that
discarded incoming messages or that completed no session is flagged ``host_saturated`` and
left out of the growth figures, since it measured its CPU shortage, not the protocol.
Phases: start the peers (staggered, 0.12 s apart, so 256 of them spread their periodic
announcements over one 30 s interval), wait until every view holds every other peer (or stops
growing: a bounded view), note the start-up burst, let sessions settle, then measure a steady
window (90 s below N = 64, 60 s above: whole announce intervals). Per peer:

* bytes sent / received per session: all of a peer's MQTT payload bytes in the window
  (announcements included) over the sessions it completed there;
* announcement bytes received: payloads on announce topics (ANNOUNCE and LEAVE), counted by a
  wrapper around the node's inbound check (``peer.inbound.admit``), per minute in the window
  and in the start-up burst (from its start until every view was complete);
* membership state: entries in ``peer.membership`` and ``status().peers_live`` at the end, and
  an approximate deep byte size of the view object (sys.getsizeof over its object graph);
* CPU per session: process CPU (``time.process_time``, reported by each host process) in the
  window over the sessions completed there, summed over hosts: everything a peer spends
  (announcements, timers, keep-alives), not only its sessions;
* sessions per minute.

The broker's PUBLISH rates come from Mosquitto's own ``$SYS/broker/publish/messages/*`` counters
(``sys_interval 1``), read by one plain MQTT client, its own $SYS deliveries subtracted; the
broker's CPU from /proc/<pid>/stat.

    python bench/scale_bench.py --quick --out bench/results/scale_quick.json   # < 60 s
    python bench/scale_bench.py --out bench/results/scale.json                 # ~9 min
    python bench/scale_bench.py --plot bench/results/scale.json --img docs/img/scale.png

``--quick`` only checks that everything runs: its 10 s window is shorter than the announce
interval, so its announcement rate is aliased (often 0) and its session figures are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from crypto.admission import AdmissionKey, Certificate  # noqa: E402
from crypto.identity import Identity  # noqa: E402
from peer.network.node import NodeConfig, Peer  # noqa: E402
from peer.network.transport import BrokerSettings, Incoming  # noqa: E402
from peer.network.view.partial import ViewConfig  # noqa: E402
from protocol.errors import ProtocolError  # noqa: E402
from protocol.topics import parse_topic  # noqa: E402
from sim.broker import MosquittoBroker  # noqa: E402
from sim.idle_peer import IdleTrainer, write_identity  # noqa: E402

NETWORK = "scale"
MODEL_ID = "mlp-digits-synthetic"
TOPK_FRACTION = 0.25  # peer.training.config.TrainerConfig's default top-k
SYS_TOPICS = ("$SYS/broker/publish/messages/sent", "$SYS/broker/publish/messages/received",
              "$SYS/broker/bytes/sent")
#: A peer not started yet, as the start-up poll sees it.
EMPTY_SNAPSHOT = {"bytes_sent": 0, "bytes_received": 0, "messages_sent": 0,
                  "messages_received": 0, "announce_bytes": 0, "announce_messages": 0,
                  "sessions_done": 0, "sessions_aborted": 0, "sessions_not_formed": 0,
                  "offers": 0, "view_entries": 0, "peers_live": 0, "drops": 0, "time": 0.0,
                  "aborts_by_reason": {}}
#: aiomqtt's warning when a client's incoming queue (256 messages, the Transport's bound) is
#: full and a message is discarded: counted, because a start-up burst can cause it.
QUEUE_FULL = "Message queue is full"


# ------------------------------------------------------------------------------ peer side
class AnnounceTally:
    """Messages and payload bytes a peer received on announce topics (ANNOUNCE and LEAVE)."""

    def __init__(self, network: str) -> None:
        self.network, self.messages, self.bytes = network, 0, 0

    def wrap(self, peer: Peer) -> None:
        """Count every message before ``peer.inbound.admit`` sees it (behaviour unchanged)."""
        admit = peer.inbound.admit

        def counting_admit(incoming: Incoming, now: float) -> Any:
            try:
                kind = parse_topic(self.network, incoming.topic).kind
            except ProtocolError:
                kind = None
            if kind == "announce":
                self.messages += 1
                self.bytes += len(incoming.payload)
            return admit(incoming, now)

        peer.inbound.admit = counting_admit  # type: ignore[method-assign]


class QueueFullCounter(logging.Handler):
    """Counts aiomqtt's "incoming queue full, message discarded" warnings in this process."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith(QUEUE_FULL):
            self.count += 1

    @classmethod
    def install(cls) -> QueueFullCounter:
        counter = cls()
        mqtt_log = logging.getLogger("mqtt")
        mqtt_log.addHandler(counter)
        mqtt_log.propagate = False  # counted in the row; one line per message would flood
        return counter


@dataclasses.dataclass
class BenchPeer:
    """One synthetic peer: the node, its announce tally and its offers so far."""

    peer: Peer
    tally: AnnounceTally
    indices: np.ndarray
    values: np.ndarray
    offers: int = 0

    async def offer_loop(self, interval_s: float) -> None:
        """Offer the same sparse update every ``interval_s`` (a random phase first); an offer
        not yet shared is replaced, as a new training round replaces it."""
        rng = secrets.SystemRandom()
        await asyncio.sleep(rng.uniform(0.0, interval_s))
        while True:
            self.offers += 1
            self.peer.offer_update(self.indices, self.values, self.offers)
            await asyncio.sleep(interval_s)

    def snapshot(self) -> dict[str, float]:
        """Cumulative counters now (no process CPU: the caller adds what applies)."""
        st = self.peer.status()
        return {
            "bytes_sent": st.bytes_sent, "bytes_received": st.bytes_received,
            "messages_sent": st.messages_sent, "messages_received": st.messages_received,
            "announce_bytes": self.tally.bytes, "announce_messages": self.tally.messages,
            "sessions_done": st.sessions_done, "sessions_aborted": st.sessions_aborted,
            "sessions_not_formed": st.sessions_not_formed, "offers": self.offers,
            "view_entries": len(self.peer.membership), "peers_live": st.peers_live,
            "drops": sum(st.drops.values()), "time": time.monotonic(),
            "aborts_by_reason": dict(st.aborts_by_reason),
        }


def synthetic_update(param_count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random sparse update: TOPK_FRACTION of the coordinates, small normal values."""
    rng = np.random.default_rng(seed)
    k = max(1, round(TOPK_FRACTION * param_count))
    indices = np.sort(rng.choice(param_count, size=k, replace=False)).astype(np.uint32)
    return indices, rng.normal(0.0, 0.01, k).astype(np.float32)


def build_bench_peer(identity: Identity, certificate: Certificate, admission_public_key: bytes,
                     url: str, param_count: int, seed: int, view_size: int = 0) -> BenchPeer:
    """A daemon-default node that does not train (its updates come from ``offer_loop``);
    ``view_size`` > 0 bounds its membership view (docs/design/partial-view.md)."""
    peer = Peer(identity=identity, certificate=certificate,
                admission_public_key=admission_public_key, network_id=NETWORK,
                trainer=IdleTrainer(MODEL_ID, param_count), broker=BrokerSettings(url),
                config=NodeConfig(train=False, view=ViewConfig(view_size=view_size)))
    tally = AnnounceTally(NETWORK)
    tally.wrap(peer)
    return BenchPeer(peer, tally, *synthetic_update(param_count, seed))


def approx_deep_size(root: object, skip: tuple[type, ...] = ()) -> int:
    """Approximate bytes held by ``root``: sys.getsizeof over its graph of containers,
    dataclasses and plain objects, each object once; instances of ``skip`` are not entered."""
    seen: set[int] = set()
    stack = [root]
    total = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (*skip, type)) or callable(obj):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.append(vars(obj))
        elif hasattr(obj, "__slots__"):
            stack.extend(getattr(obj, s) for s in obj.__slots__ if hasattr(obj, s))
    return total


def view_bytes(peer: Peer) -> int:
    """Approximate bytes of a peer's membership view (its RNG object not counted)."""
    import random

    return approx_deep_size(peer.membership, skip=(random.Random,))


# ------------------------------------------------------------------------------ broker side
class SysReader:
    """Reads Mosquitto's $SYS counters (``sys_interval 1``): latest value and arrival time."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latest: dict[str, tuple[float, float]] = {}
        self.received = 0  # our own $SYS deliveries: the broker counts them as sent PUBLISHes
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        import aiomqtt

        host, port, _tls = BrokerSettings(self.url).endpoint()
        ready = asyncio.Event()

        async def read() -> None:
            async with aiomqtt.Client(host, port, identifier="scale-bench-sys") as client:
                for topic in SYS_TOPICS:
                    await client.subscribe(topic)
                ready.set()
                async for message in client.messages:
                    self.received += 1
                    payload = message.payload
                    if isinstance(payload, bytes | bytearray):
                        self.latest[str(message.topic)] = (float(payload), time.monotonic())

        self._task = asyncio.create_task(read())
        await asyncio.wait_for(ready.wait(), 10.0)

    def sample(self) -> dict[str, Any]:
        return {"values": dict(self.latest), "received": self.received, "time": time.monotonic()}

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def broker_rates(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """PUBLISH messages (and bytes) per second out of and into the broker between two
    SysReader samples, our own $SYS deliveries taken out of the outgoing rate. Mosquitto
    republishes a counter only when it changed, so the latest value holds at sampling time
    (to within ``sys_interval``)."""
    elapsed = after["time"] - before["time"]

    def rate(topic: str) -> float:
        if topic not in before["values"] or topic not in after["values"]:
            return float("nan")
        return (after["values"][topic][0] - before["values"][topic][0]) / elapsed

    own = (after["received"] - before["received"]) / elapsed
    return {"broker_publish_out_per_s": rate(SYS_TOPICS[0]) - own,
            "broker_publish_in_per_s": rate(SYS_TOPICS[1]),
            "broker_bytes_out_per_s": rate(SYS_TOPICS[2])}


def broker_pid(broker: MosquittoBroker) -> int | None:
    """The pid of the Mosquitto running this broker's configuration file (None: not found)."""
    assert broker.log_path is not None
    config = str(broker.log_path.parent / "mosquitto.conf").encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if config in (entry / "cmdline").read_bytes():
                    return int(entry.name)
            except OSError:
                continue
    return None


def proc_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` from /proc (NaN when unreadable)."""
    if pid is None:
        return float("nan")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------ rows
#: Per-peer figures that the issue wants flat in N, and the ones printed and plotted.
PER_PEER_FIGURES = (
    "bytes_sent_per_session", "bytes_received_per_session",
    "announce_bytes_received_per_peer_per_min", "startup_announce_bytes_received_per_peer",
    "view_entries_per_peer", "view_state_bytes_per_peer", "cpu_ms_per_session",
    "sessions_per_min_per_peer",
)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def scale_row(labels: dict[str, Any], startup: Sequence[dict[str, float]],
              before: Sequence[dict[str, float]], after: Sequence[dict[str, float]],
              cpu_s: float, view_state_bytes: float) -> dict[str, Any]:
    """One JSON row from per-peer counter snapshots: at the end of start-up, at the start and
    at the end of the window (same peer order), and the CPU seconds all peers spent in the
    window. Pure: every figure is a ratio of these counters."""
    n = len(after)
    if n == 0 or len(before) != n or len(startup) != n:
        raise ValueError("need one snapshot per peer in each phase")
    window_s = statistics.fmean(a["time"] - b["time"] for a, b in zip(after, before, strict=True))
    minutes = window_s / 60.0

    def delta(key: str) -> float:
        return float(sum(a[key] - b[key] for a, b in zip(after, before, strict=True)))

    sessions = delta("sessions_done")
    return {
        **labels,
        "window_s": round(window_s, 2),
        "sessions_per_min_per_peer": sessions / n / minutes,
        "bytes_sent_per_session": _ratio(delta("bytes_sent"), sessions),
        "bytes_received_per_session": _ratio(delta("bytes_received"), sessions),
        "bytes_sent_per_peer_per_min": delta("bytes_sent") / n / minutes,
        "bytes_received_per_peer_per_min": delta("bytes_received") / n / minutes,
        "messages_sent_per_peer_per_min": delta("messages_sent") / n / minutes,
        "messages_received_per_peer_per_min": delta("messages_received") / n / minutes,
        "announce_bytes_received_per_peer_per_min": delta("announce_bytes") / n / minutes,
        "announce_messages_received_per_peer_per_min": delta("announce_messages") / n / minutes,
        "announce_share_of_received_pct": 100.0 * _ratio(delta("announce_bytes"),
                                                         delta("bytes_received")),
        "startup_announce_bytes_received_per_peer":
            statistics.fmean(s["announce_bytes"] for s in startup),
        "startup_announce_messages_received_per_peer":
            statistics.fmean(s["announce_messages"] for s in startup),
        "view_entries_per_peer": statistics.fmean(a["view_entries"] for a in after),
        "view_entries_min": min(a["view_entries"] for a in after),
        "peers_live_per_peer": statistics.fmean(a["peers_live"] for a in after),
        "view_state_bytes_per_peer": view_state_bytes,
        "cpu_ms_per_session": 1000.0 * _ratio(cpu_s, sessions),
        "cpu_pct_per_peer": 100.0 * cpu_s / n / window_s,
        "offers_per_peer_per_min": delta("offers") / n / minutes,
        "sessions_aborted_per_peer_per_min": delta("sessions_aborted") / n / minutes,
        "sessions_not_formed_per_peer_per_min": delta("sessions_not_formed") / n / minutes,
        "drops_per_peer": delta("drops") / n,
        "abort_reasons": reason_deltas(before, after),
    }


def reason_deltas(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]]) -> str:
    """Failed sessions in the window by reason, over all peers, as "reason:count,..."."""
    total: dict[str, int] = {}
    for b, a in zip(before, after, strict=True):
        for reason, count in a["aborts_by_reason"].items():
            total[reason] = total.get(reason, 0) + count - b["aborts_by_reason"].get(reason, 0)
    return ",".join(f"{r}:{c}" for r, c in sorted(total.items()) if c)


def growth(rows: Sequence[dict[str, Any]], key: str, mode: str = "in_process") -> float:
    """``key`` at the largest N over its value at the smallest N, among the rows of ``mode``
    whose hosts were not saturated (``host_saturated``)."""
    chosen = sorted((r for r in rows if r["mode"] == mode and not r.get("host_saturated")),
                    key=lambda r: r["peers"])
    if len(chosen) < 2:
        return float("nan")
    return _ratio(chosen[-1][key], chosen[0][key])


# ------------------------------------------------------------------------------ runs
#: A host whose event loop wakes a sleeper this late on average (or that discarded incoming
#: messages, or completed no session) measured its own CPU shortage, not the protocol.
SATURATED_LAG_MS = 50.0
#: Below this N the steady window is longer (Settings.small_window_s).
SMALL_N = 64


@dataclasses.dataclass(frozen=True)
class Settings:
    """Phases and pace of one bench run; ``window_s(n)``: the steady window for N peers."""

    large_window_s: float  # N >= SMALL_N
    small_window_s: float  # N < SMALL_N: fewer sessions per second, so a longer window
    settle_s: float
    offer_interval_s: float
    # Between two peer starts (across all host processes): 256 peers start over one announce
    # interval, so their periodic announcements are spread over it as in a real network.
    stagger_s: float = 0.12
    stable_s: float = 5.0  # a view that stops growing this long counts as complete (bounded)
    view_size: int = 0  # 0: the full view (every peer follows every announcement)

    def window_s(self, n: int) -> float:
        return self.small_window_s if n < SMALL_N else self.large_window_s

    def labels(self, mode: str, n: int, param_count: int) -> dict[str, Any]:
        node = NodeConfig(train=False)
        return {"peers": n, "mode": mode, "group_size": node.group_size,
                "announce_interval_s": node.announce_interval_s,
                "offer_interval_s": self.offer_interval_s, "param_count": param_count,
                "view_size": self.view_size,
                "update_values": round(TOPK_FRACTION * param_count),
                "load_avg_1min": round(os.getloadavg()[0], 2)}


Poll = Callable[[], Any]  # async () -> list of per-peer snapshots


async def wait_for_views(poll: Poll, n: int, settings: Settings,
                         start: float) -> tuple[list[dict], float]:
    """Poll until every view holds the N - 1 others, or the total stopped growing for
    ``stable_s`` with every view usable (a bounded view), or a timeout; (snapshots, seconds
    since ``start``, the first peer's start)."""
    deadline = time.monotonic() + 30.0 + 0.3 * n
    last_total, last_change = -1, time.monotonic()
    while True:
        snaps = await poll()
        views = [s["view_entries"] for s in snaps]
        now = time.monotonic()
        if min(views) >= n - 1 or now > deadline:
            return snaps, now - start
        if sum(views) != last_total:
            last_total, last_change = sum(views), now
        elif min(views) >= 2 and now - last_change >= settings.stable_s:
            return snaps, now - start
        await asyncio.sleep(1.0)


async def measure(poll: Poll, cpu: Callable[[Sequence[dict]], float], sys_reader: SysReader,
                  pid: int | None, settings: Settings, window_s: float) -> dict[str, Any]:
    """The steady window: snapshots, CPU and broker figures before and after it."""
    await asyncio.sleep(settings.settle_s)
    before, sys0, broker0 = await poll(), sys_reader.sample(), proc_cpu_s(pid)
    cpu0 = cpu(before)
    await asyncio.sleep(window_s)
    after, sys1, broker1 = await poll(), sys_reader.sample(), proc_cpu_s(pid)
    wall = sys1["time"] - sys0["time"]
    return {"before": before, "after": after, "cpu_s": cpu(after) - cpu0,
            "broker": {**broker_rates(sys0, sys1),
                       "broker_cpu_pct": 100.0 * (broker1 - broker0) / wall}}


async def _ask(proc: asyncio.subprocess.Process, command: bytes) -> dict[str, Any]:
    """One command line to a host process, one JSON line back."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(command + b"\n")
    await proc.stdin.drain()
    line = await asyncio.wait_for(proc.stdout.readline(), 60.0)
    if not line:
        raise RuntimeError("a peer host process ended early (see its log)")
    return json.loads(line)


async def run_hosted(mode: str, n: int, hosts: int, broker: MosquittoBroker, param_count: int,
                     settings: Settings) -> dict[str, Any]:
    """N peers spread round-robin over ``hosts`` processes (this file with ``--child``), each
    running its peers as tasks of one event loop; one row."""
    admission = AdmissionKey.generate(NETWORK)
    labels = {**settings.labels(mode, n, param_count), "host_processes": hosts}
    sys_reader = SysReader(broker.url)
    await sys_reader.start()
    procs: list[asyncio.subprocess.Process] = []
    with tempfile.TemporaryDirectory(prefix="murmur-scale-") as tmp:
        directory = Path(tmp)
        try:
            names = [f"p{i:03d}" for i in range(n)]
            files = [write_identity(admission, name, directory) for name in names]
            first_start = time.monotonic()
            for h in range(hosts):
                spec = {"url": broker.url, "admission_hex": admission.public_key.hex(),
                        "param_count": param_count, "offer_interval_s": settings.offer_interval_s,
                        "stagger_s": settings.stagger_s * hosts,
                        "view_size": settings.view_size,
                        "peers": [{"key": str(files[i][0]), "cert": str(files[i][1]), "seed": i}
                                  for i in range(h, n, hosts)]}
                spec_path = directory / f"host{h}.json"
                spec_path.write_text(json.dumps(spec))
                with open(directory / f"host{h}.log", "wb") as log_file:
                    procs.append(await asyncio.create_subprocess_exec(
                        sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path),
                        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                        stderr=log_file))
                if hosts > 1:
                    await asyncio.sleep(settings.stagger_s)
            host_state: list[dict[str, Any]] = []

            async def poll() -> list[dict[str, float]]:
                host_state[:] = await asyncio.gather(*(_ask(p, b"snapshot") for p in procs))
                return [snap for host in host_state for snap in host["peers"]]

            startup, startup_s = await wait_for_views(poll, n, settings, first_start)
            hosts_before: list[dict[str, Any]] = []

            def host_cpu(_snaps: Sequence[dict[str, float]]) -> float:
                if not hosts_before:
                    hosts_before[:] = host_state
                return sum(host["cpu_s"] for host in host_state)

            window = await measure(poll, host_cpu, sys_reader, broker_pid(broker), settings,
                                   settings.window_s(n))
            discarded = sum(host["queue_full"] for host in host_state)
            lag = host_lag(hosts_before, host_state)
            sized = await asyncio.gather(*(_ask(p, b"size") for p in procs[:8]))
        finally:
            await sys_reader.close()
            for proc in procs:
                if proc.stdin is not None and not proc.stdin.is_closing():
                    proc.stdin.close()  # EOF: the host's peers leave cleanly
            for proc in procs:
                try:
                    await asyncio.wait_for(proc.wait(), 60.0)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
    row = scale_row(labels, startup, window["before"], window["after"], window["cpu_s"],
                    statistics.fmean(s["view_bytes"] for s in sized))
    saturated = (lag["host_loop_lag_mean_ms"] > SATURATED_LAG_MS or discarded > 0
                 or row["sessions_per_min_per_peer"] == 0)
    return {**row, "startup_s": round(startup_s, 2), **window["broker"],
            "incoming_discarded": discarded, **lag, "host_saturated": saturated}


def host_lag(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]]
             ) -> dict[str, float]:
    """Mean and largest event-loop lag of the host processes in the window, in ms."""
    count = sum(a["lag_count"] - b["lag_count"] for a, b in zip(after, before, strict=True))
    total = sum(a["lag_total_s"] - b["lag_total_s"] for a, b in zip(after, before, strict=True))
    return {"host_loop_lag_mean_ms": 1000.0 * _ratio(total, count),
            "host_loop_lag_max_ms": 1000.0 * max(a["lag_max_s"] for a in after)}


class LoopLag:
    """How late this event loop wakes a task that sleeps ``period_s`` (its queueing delay)."""

    def __init__(self, period_s: float = 0.1) -> None:
        self.period_s, self.total_s, self.count, self.max_s = period_s, 0.0, 0, 0.0

    async def run(self) -> None:
        while True:
            start = time.monotonic()
            await asyncio.sleep(self.period_s)
            lag = time.monotonic() - start - self.period_s
            self.total_s, self.count, self.max_s = self.total_s + lag, self.count + 1, max(
                self.max_s, lag)

    def take(self) -> dict[str, float]:
        """Cumulative lag, and the largest since the previous call."""
        largest, self.max_s = self.max_s, 0.0
        return {"lag_total_s": self.total_s, "lag_count": self.count, "lag_max_s": largest}


async def child_main(spec_path: Path) -> None:
    """A host process: its peers as tasks of one loop; answers "snapshot" / "size" lines on
    stdin with one JSON line (per-peer counters, this process's CPU); leaves on EOF."""
    spec = json.loads(spec_path.read_text())
    queue_full = QueueFullCounter.install()
    admission_public_key = bytes.fromhex(spec["admission_hex"])
    stop = asyncio.Event()
    peers: list[BenchPeer] = []
    runs: list[asyncio.Task[None]] = []
    offers: list[asyncio.Task[None]] = []

    async def start_peers() -> None:
        for entry in spec["peers"]:
            bp = build_bench_peer(Identity.load(Path(entry["key"])),
                                  Certificate.from_bytes(Path(entry["cert"]).read_bytes()),
                                  admission_public_key, spec["url"], int(spec["param_count"]),
                                  int(entry["seed"]), int(spec.get("view_size", 0)))
            peers.append(bp)
            runs.append(asyncio.create_task(bp.peer.run(stop)))
            offers.append(asyncio.create_task(bp.offer_loop(float(spec["offer_interval_s"]))))
            await asyncio.sleep(float(spec["stagger_s"]))

    starter = asyncio.create_task(start_peers())
    lag = LoopLag()
    lag_task = asyncio.create_task(lag.run())
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        if not starter.done():  # the parent polls start-up: not-yet-started peers see nobody
            pending = len(spec["peers"]) - len(peers)
            snaps = [bp.snapshot() for bp in peers] + [dict(EMPTY_SNAPSHOT)] * pending
        else:
            snaps = [bp.snapshot() for bp in peers]
        answer: dict[str, Any] = {"peers": snaps, "cpu_s": time.process_time(),
                                  "queue_full": queue_full.count, **lag.take()}
        if line.strip() == b"size":
            answer["view_bytes"] = view_bytes(peers[0].peer)
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
    for task in (starter, lag_task, *offers):
        task.cancel()
    stop.set()
    await asyncio.gather(*runs, return_exceptions=True)


# ------------------------------------------------------------------------------ output
PLOT_PANELS = (
    ("bytes_sent_per_session", "bytes sent / session"),
    ("bytes_received_per_session", "bytes received / session"),
    ("announce_bytes_received_per_peer_per_min", "announce bytes received / min"),
    ("startup_announce_bytes_received_per_peer", "start-up announce bytes received"),
    ("view_entries_per_peer", "membership view entries"),
    ("cpu_ms_per_session", "CPU ms / session"),
    ("sessions_per_min_per_peer", "sessions / min"),
    ("broker_publish_out_per_s", "broker PUBLISH out / s (whole broker)"),
)


def plot_rows(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Each per-peer figure against N (log x): in-process as a line, processes as squares,
    a bounded view dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(14, 6.5))
    for ax, (key, title) in zip(axes.flat, PLOT_PANELS, strict=True):
        views = sorted({int(r.get("view_size", 0)) for r in rows})
        for mode, style in (("in_process", "o-"), ("processes", "s")):
            for view in views:
                chosen = sorted((r for r in rows if r["mode"] == mode
                                 and int(r.get("view_size", 0)) == view),
                                key=lambda r: r["peers"])
                if chosen:
                    name = "full view" if view == 0 else f"view {view}"
                    ax.plot([r["peers"] for r in chosen], [r[key] for r in chosen],
                            style if view == 0 else style.replace("-", "--"),
                            label=f"{mode.replace('_', '-')}, {name}")
        finite = [r[key] for r in rows if math.isfinite(r[key])]
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["peers"] for r in rows}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_ylim(0, 1.15 * max(finite, default=1.0) or 1.0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("peers N")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Murmur per-peer cost against network size (bench/scale_bench.py)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    print(f"{'mode':<11} {'N':>4} {'sess/min':>8} {'sent/ses':>9} {'recv/ses':>9} "
          f"{'ann B/min':>10} {'start ann B':>11} {'view':>6} {'view kB':>8} {'CPU ms/ses':>10} "
          f"{'CPU %/peer':>10} {'brk pub/s':>9} {'start s':>7}")
    for r in rows:
        print(f"{r['mode']:<11} {r['peers']:>4} {r['sessions_per_min_per_peer']:>8.2f} "
              f"{r['bytes_sent_per_session']:>9.0f} {r['bytes_received_per_session']:>9.0f} "
              f"{r['announce_bytes_received_per_peer_per_min']:>10.0f} "
              f"{r['startup_announce_bytes_received_per_peer']:>11.0f} "
              f"{r['view_entries_per_peer']:>6.1f} {r['view_state_bytes_per_peer'] / 1e3:>8.1f} "
              f"{r['cpu_ms_per_session']:>10.1f} {r['cpu_pct_per_peer']:>10.2f} "
              f"{r['broker_publish_out_per_s']:>9.0f} {r['startup_s']:>7.1f}")
    print("(sent/ses, recv/ses: payload bytes per session, announcements included; ann B/min: "
          "announce bytes received per minute; start ann B: in the start-up burst)")
    fair = sorted(r["peers"] for r in rows if r["mode"] == "in_process"
                  and not r.get("host_saturated"))
    saturated = [f"{r['mode']} N={r['peers']}" for r in rows if r.get("host_saturated")]
    if saturated:
        print("saturated hosts (loop lag, discarded messages or no session): "
              + ", ".join(saturated))
    print(f"in-process growth, N = {fair[-1] if fair else '?'} over N = "
          f"{fair[0] if fair else '?'}, unsaturated rows (target: within 10 %):")
    for key in PER_PEER_FIGURES:
        ratio = growth(rows, key)
        verdict = ("n/a" if not math.isfinite(ratio)
                   else "flat" if abs(ratio - 1.0) <= 0.10 else "NOT flat")
        print(f"  {key:<45} x{ratio:.2f}  {verdict}")


def raise_fd_limit(needed: int) -> None:
    """Raise the soft open-file limit to ``needed`` (one socket per in-process peer, and
    Mosquitto, started after this, inherits it for one socket per client)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def mlp_param_count() -> int:
    """Parameters of the digits MLP (peer.training.models); torch only in the parent."""
    from peer.training.models import build_model, param_count

    return int(param_count(build_model("mlp", (64,), 10)))


async def main_async(args: argparse.Namespace, settings: Settings) -> list[dict[str, Any]]:
    if not MosquittoBroker.available():
        raise SystemExit("mosquitto is not installed")
    raise_fd_limit(4 * max([*args.sizes, args.process_peers]) + 256)
    param_count = mlp_param_count()
    print(f"pace: each peer offers one update every {settings.offer_interval_s:g} s; window "
          f"{settings.small_window_s:g} s (N < {SMALL_N}) / {settings.large_window_s:g} s; "
          f"param_count {param_count}; in-process peers on {args.hosts} host processes",
          flush=True)
    rows = []
    plan = [("in_process", n) for n in args.sizes]
    if args.process_peers:
        plan.append(("processes", args.process_peers))
    for mode, n in plan:
        broker = MosquittoBroker(extra_config="sys_interval 1\n")
        await broker.start()
        started = time.monotonic()
        try:
            hosts = min(n, args.hosts) if mode == "in_process" else n
            row = await run_hosted(mode, n, hosts, broker, param_count, settings)
        finally:
            await broker.close()
        rows.append(row)
        print(f"{mode} N={n}: {row['sessions_per_min_per_peer']:.2f} sessions/min/peer, "
              f"{row['cpu_ms_per_session']:.1f} CPU ms/session, view "
              f"{row['view_entries_per_peer']:.1f}, start-up {row['startup_s']:.1f} s, "
              f"row took {time.monotonic() - started:.0f} s", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 8, 32 and 6 processes (< 60 s)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON to this file")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                        help="in-process network sizes (default 8,32,128,256)")
    parser.add_argument("--process-peers", type=int, help="peers of the processes run (0: none)")
    parser.add_argument("--hosts", type=int, default=2,
                        help="processes the in-process peers are spread over (default 2: "
                             "one event loop per core)")
    parser.add_argument("--window", type=float, help="steady window in seconds")
    parser.add_argument("--offer-interval", type=float, help="seconds between a peer's offers")
    parser.add_argument("--view-size", type=int, default=0,
                        help="bound each peer's membership view (0: the full view)")
    parser.add_argument("--plot", type=Path, action="append",
                        help="only plot these JSON files (repeatable) to --img")
    parser.add_argument("--img", type=Path, help="where to write the plot (PNG)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.child is not None:
        asyncio.run(child_main(args.child))
        return
    if args.plot is not None:
        rows = [row for path in args.plot for row in json.loads(path.read_text())]
        plot_rows(rows, args.img or ROOT / "docs/img/scale.png")
        return
    args.sizes = args.sizes or ([8, 32] if args.quick else [8, 32, 128, 256])
    if args.process_peers is None:
        args.process_peers = 6 if args.quick else 16
    quick_window = 10.0 if args.quick else None
    settings = Settings(large_window_s=args.window or quick_window or 60.0,
                        small_window_s=args.window or quick_window or 90.0,
                        settle_s=2.0 if args.quick else 10.0,
                        offer_interval_s=args.offer_interval or (10.0 if args.quick else 30.0),
                        view_size=args.view_size)
    rows = asyncio.run(main_async(args, settings))
    print()
    print_table(rows)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    if args.img:
        plot_rows(rows, args.img)


if __name__ == "__main__":
    main()
