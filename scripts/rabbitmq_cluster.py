"""Murmur on a two-node RabbitMQ cluster with the MQTT plugin (issue 14), measured.

    python scripts/rabbitmq_cluster.py [--out FILE] [--announce-interval S] [--sessions K]

Starts two RabbitMQ nodes as the current user on loopback ports (their own node names, AMQP,
MQTT and Erlang distribution ports, a private epmd, a shared random Erlang cookie, Mnesia and
logs in a temporary directory), enables ``rabbitmq_mqtt`` on each, joins the second node to
the first with ``rabbitmqctl join_cluster``, then:

1. probes the broker semantics Murmur relies on (granted QoS, retained messages on exact and
   wildcard subscriptions on both nodes, an 8 MiB payload across nodes);
2. runs real peers (real ``LocalTrainer``s, MLP on digits, DP-SGD, top-10 %, groups of 3):
   three on each node, one idle peer in its own process on the second node (killed with
   SIGKILL to test the last will) and one newcomer on the second node;
3. measures, with a deadline on every wait: how long until every peer sees every other, how
   long a newcomer takes to see the established peers, how long the will of a killed peer
   takes to clear it from the views on both nodes, how many sessions with members on both
   nodes complete, whether every session's members agree on the group sum, and the drops by
   reason.

It prints a table and, with ``--out``, writes the rows as JSON. Exit status 0 when every
wait met its deadline and every completed session's members agree; 1 otherwise. Every
process it starts (epmd, both nodes, the victim peer) is stopped and the temporary directory
removed, also on failure or Ctrl-C. Nothing listens beyond 127.0.0.1. Murmur is not changed
for RabbitMQ: the point is to measure what its semantics do to an unmodified peer.

Security: the cluster accepts anonymous MQTT clients (RabbitMQ maps them to ``guest``, which
it admits over loopback only) and is no security boundary; as with any broker, Murmur's
guarantees rest on signed messages and sealed shares, not on the broker. The Erlang cookie is
random per run and lives in the temporary directory (mode 0400).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np

from crypto.admission import AdmissionKey
from crypto.identity import Identity
from peer.assembly import build_peer
from peer.network.node import NodeConfig, Peer, PeerEvent
from peer.network.session.shamir import SessionTimeouts
from peer.network.transport import BrokerSettings
from sim.broker import LOOPBACK, free_loopback_port
from sim.idle_peer import spawn_idle_peer, write_identity

ROOT = Path(__file__).resolve().parent.parent
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")  # Debian's rabbitmq-server package
NET = "rabbitmq"
RESOLUTION = 2.0**-16  # fixed-point resolution of a share (crypto.field.FixedPoint default)
MAX_PAYLOAD = 8 * 1024 * 1024  # protocol/limits.py MAX_PAYLOAD_BYTES: the most Murmur sends

# FAST timings of tests/test_node_mosquitto.py, with a long silence expiry so that within a
# run a peer leaves a view only through a LEAVE (its will), never through silence.
BASE_CONFIG = NodeConfig(
    group_size=3, threshold=2,
    timeouts=SessionTimeouts(invite_s=1.0, start_s=2.0, share_s=2.0, partial_s=2.0),
    silence_expiry_s=600.0, checkpoint_interval_s=3600.0, start_jitter_s=0.2, tick_s=0.02,
    round_pause_s=0.5, evaluate_every=4, cooldown_s=0.0,
)


class ScenarioError(RuntimeError):
    """A deadline was missed or a check failed; the message says which."""


@dataclass
class Row:
    name: str
    value: float | int | str | bool
    unit: str = ""
    note: str = ""


# ---------------------------------------------------------------------------- the cluster
@dataclass
class RabbitNode:
    name: str  # Erlang node name, e.g. murmur-a-1a2b@localhost
    amqp_port: int
    dist_port: int
    mqtt_port: int
    base: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{LOOPBACK}:{self.mqtt_port}"


@dataclass
class RabbitCluster:
    """Two RabbitMQ nodes and their epmd, all children of this process, all on loopback."""

    bin_dir: Path = RABBITMQ_BIN
    boot_timeout_s: float = 90.0
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="murmur-rabbitmq-")))
    nodes: list[RabbitNode] = field(default_factory=list)
    epmd: subprocess.Popen[bytes] | None = None
    epmd_port: int = 0

    def env(self, node: RabbitNode | None = None) -> dict[str, str]:
        """The environment of a node (or of the CLI tools): HOME holds the shared cookie."""
        env = dict(os.environ, HOME=str(self.tmp / "home"), ERL_EPMD_PORT=str(self.epmd_port),
                   ERL_EPMD_ADDRESS=LOOPBACK)
        if node is not None:
            env.update(
                RABBITMQ_NODENAME=node.name, RABBITMQ_NODE_IP_ADDRESS=LOOPBACK,
                RABBITMQ_NODE_PORT=str(node.amqp_port), RABBITMQ_DIST_PORT=str(node.dist_port),
                RABBITMQ_MNESIA_BASE=str(node.base / "mnesia"),
                RABBITMQ_LOG_BASE=str(node.base / "log"),
                RABBITMQ_CONFIG_FILE=str(node.base / "rabbitmq.conf"),
                RABBITMQ_ENABLED_PLUGINS_FILE=str(node.base / "enabled_plugins"),
                RABBITMQ_PID_FILE=str(node.base / "pid"),
                # Erlang distribution on loopback too (it binds 0.0.0.0 by default).
                RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            )
        return env

    def ctl(self, node: RabbitNode, *args: str, tool: str = "rabbitmqctl",
            timeout_s: float = 60.0) -> str:
        """Run a RabbitMQ CLI command against node; ScenarioError with its output on failure."""
        cmd = [str(self.bin_dir / tool), "-n", node.name, *args]
        done = subprocess.run(cmd, env=self.env(node), capture_output=True, timeout=timeout_s,
                              check=False)
        out = (done.stdout + done.stderr).decode(errors="replace")
        if done.returncode != 0:
            raise ScenarioError(f"{' '.join(cmd[1:])} failed ({done.returncode}): {out[-800:]}")
        return out

    def start(self, rows: list[Row]) -> None:
        t0 = time.monotonic()
        home = self.tmp / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))
        cookie.chmod(0o400)  # Erlang refuses a cookie file others can read
        self.epmd_port = free_loopback_port()
        epmd = shutil.which("epmd") or "/usr/bin/epmd"
        # Our own epmd in the foreground: a node would otherwise start a daemon epmd that
        # outlives it.
        self.epmd = subprocess.Popen([epmd, "-port", str(self.epmd_port), "-address", LOOPBACK],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        tag = secrets.token_hex(2)
        for letter in "ab":
            base = self.tmp / letter
            base.mkdir()
            node = RabbitNode(f"murmur-{letter}-{tag}@localhost", free_loopback_port(),
                              free_loopback_port(), free_loopback_port(), base)
            (base / "rabbitmq.conf").write_text(textwrap.dedent(f"""\
                listeners.tcp.default = {LOOPBACK}:{node.amqp_port}
                mqtt.listeners.tcp.default = {LOOPBACK}:{node.mqtt_port}
                """))
            self.ctl(node, "enable", "--offline", "rabbitmq_mqtt", tool="rabbitmq-plugins")
            self.nodes.append(node)
        for node in self.nodes:  # both boot at once
            log = (node.base / "server.out").open("wb")
            node.process = subprocess.Popen([str(self.bin_dir / "rabbitmq-server")],
                                            env=self.env(node), stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
        for node in self.nodes:
            try:
                self.ctl(node, "wait", "--timeout", str(int(self.boot_timeout_s)),
                         str(node.base / "pid"), timeout_s=self.boot_timeout_s + 10)
            except ScenarioError as exc:  # the node's own output, before close() removes it
                tail = (node.base / "server.out").read_bytes()[-1500:].decode(errors="replace")
                raise ScenarioError(f"{exc}\n{node.name} said:\n{tail}") from exc
        t_booted = time.monotonic()
        a, b = self.nodes
        self.ctl(b, "stop_app")
        self.ctl(b, "join_cluster", a.name)
        self.ctl(b, "start_app")
        status = json.loads(self.ctl(a, "cluster_status", "--formatter", "json"))
        running = set(status.get("running_nodes", []))
        if running != {a.name, b.name}:
            raise ScenarioError(f"cluster runs {sorted(running)}, expected both nodes")
        t_joined = time.monotonic()
        version = self.ctl(a, "version").strip()
        rows += [Row("rabbitmq version", version),
                 Row("both nodes booted (in parallel)", round(t_booted - t0, 1), "s",
                     "from the first command, plugins enabled offline"),
                 Row("join_cluster (stop_app, join, start_app)", round(t_joined - t_booted, 1),
                     "s")]

    def close(self) -> None:
        """Stop both nodes (politely, then SIGKILL to their process groups) and epmd; remove
        the temporary directory. Safe to call after a partial start."""
        for node in reversed(self.nodes):
            proc = node.process
            if proc is None:
                continue
            if proc.poll() is None:
                with contextlib.suppress(ScenarioError, subprocess.TimeoutExpired):
                    self.ctl(node, "stop", timeout_s=30)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=15)
            # Whatever the node left behind in its session (erl_child_setup, inet_gethost).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        if self.epmd is not None:
            self.epmd.kill()
            self.epmd.wait(timeout=10)
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- probes
async def _receive(port: int, topic_filter: str, wait_s: float, *,
                   qos: int = 1) -> tuple[int, list[aiomqtt.Message]]:
    """(granted QoS, messages) of a fresh subscription listening for wait_s."""
    got: list[aiomqtt.Message] = []
    async with aiomqtt.Client(LOOPBACK, port, identifier=f"probe-{secrets.token_hex(4)}") as c:
        granted = await c.subscribe(topic_filter, qos=qos)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                async for msg in c.messages:
                    got.append(msg)
    return int(granted[0].value), got


async def probe_semantics(a: RabbitNode, b: RabbitNode, rows: list[Row]) -> None:
    """What the cluster does with QoS 2, retained messages and a maximal payload."""
    granted, _ = await _receive(a.mqtt_port, "murmur/probe/qos", 0.1, qos=2)
    rows.append(Row("QoS granted for a QoS 2 subscription", granted, "", "Murmur asks for 1"))
    topic = "murmur/probe/somepeer/announce"
    async with aiomqtt.Client(LOOPBACK, a.mqtt_port, identifier="probe-retain") as pub:
        await pub.publish(topic, b"retained", qos=1, retain=True)
    filters = ((topic, "exact topic"), ("murmur/probe/+/announce", "'+' wildcard"))
    cases = [(node, where, filt, kind)
             for node, where in ((a, "node A (published there)"), (b, "node B"))
             for filt, kind in filters]
    results = await asyncio.gather(*(_receive(node.mqtt_port, filt, 1.0)
                                     for node, _, filt, _ in cases))
    for (_node, where, _filt, kind), (_granted, got) in zip(cases, results, strict=True):
        rows.append(Row(f"retained delivered: {kind}, {where}", any(m.retain for m in got)))
    for size in (256 * 1024, MAX_PAYLOAD):
        async with aiomqtt.Client(LOOPBACK, b.mqtt_port, identifier="probe-big-sub") as sub:
            await sub.subscribe("murmur/probe/big", qos=1)
            t0 = time.monotonic()
            async with aiomqtt.Client(LOOPBACK, a.mqtt_port, identifier="probe-big-pub") as pub:
                await pub.publish("murmur/probe/big", os.urandom(size), qos=1, timeout=30)
            delivered = 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    async for msg in sub.messages:
                        delivered = len(msg.payload) if isinstance(msg.payload, bytes) else -1
                        break
        rows.append(Row(f"{size} B payload A -> B delivered intact", delivered == size, "",
                        f"{time.monotonic() - t0:.2f} s" if delivered == size else ""))


# ---------------------------------------------------------------------------- peers
def make_trainers(n: int) -> Callable[[int], Any]:
    """make(i): a real LocalTrainer on a 1/n shard of digits (MLP, DP-SGD, top-10 %)."""
    import torch

    from peer.training.data import load_source, split_holdout
    from peer.training.trainer import LocalTrainer, TrainerConfig

    torch.set_num_threads(1)  # many peers in one process on a small machine
    train, _test = load_source("digits")
    config = TrainerConfig(model="mlp", lr=0.1, batch_size=32, local_steps=2, dp=True,
                           noise_multiplier=1.0, delta=1e-5, max_grad_norm=1.0,
                           budget_epsilon=1e6, topk_fraction=0.1, seed=7, share="delta")

    def make(i: int) -> Any:
        local, holdout = split_holdout(train.subset(np.arange(i, len(train.y), n)), 0.2, i)
        return LocalTrainer(config, local, holdout, None)

    return make


@dataclass
class Swarm:
    admission: AdmissionKey
    config: NodeConfig
    peers: dict[str, Peer] = field(default_factory=dict)
    node_of: dict[str, str] = field(default_factory=dict)  # peer id -> "A" / "B"
    events: list[PeerEvent] = field(default_factory=list)
    stops: list[asyncio.Event] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def add(self, peer_id: str, node: str, url: str, trainer: Any) -> Peer:
        ident = Identity.generate(peer_id)
        cert = self.admission.issue(ident.public, valid_for_s=3600, now=time.time())
        peer = build_peer(identity=ident, certificate=cert,
                          admission_public_key=self.admission.public_key, network_id=NET,
                          trainer=trainer, broker=BrokerSettings(url=url), node=self.config,
                          on_event=self.events.append)
        self.peers[peer_id], self.node_of[peer_id] = peer, node
        self.stops.append(asyncio.Event())
        self.tasks.append(asyncio.create_task(peer.run(self.stops[-1])))
        return peer

    def sees(self, watchers: list[str], ids: set[str]) -> bool:
        return all(self.peers[w].membership.get(o) is not None
                   for w in watchers for o in ids - {w})

    async def close(self, timeout_s: float = 30.0) -> None:
        for stop in self.stops:
            stop.set()
        _done, pending = await asyncio.wait(self.tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()

    def sessions(self) -> tuple[int, int, int]:
        """(sessions every member finished, of those with members on both nodes, sessions
        whose finishers disagree on the group sum or whose sum is not the members' plain
        sum)."""
        by_session: dict[bytes, list[PeerEvent]] = {}
        for e in self.events:
            if e.kind == "session_done":
                by_session.setdefault(e.data["session_id"], []).append(e)
        complete = cross = bad = 0
        for events in by_session.values():
            first = events[0].data
            if not all(np.array_equal(e.data["coordinates"], first["coordinates"])
                       and np.array_equal(e.data["group_sum"], first["group_sum"])
                       for e in events[1:]):
                bad += 1
                continue
            members = set(first["members"])
            if {e.peer_id for e in events} != members:
                continue  # a member did not finish; the others agree (checked above)
            coords, plain = first["coordinates"], np.zeros(first["coordinates"].size)
            for e in events:
                plain[np.searchsorted(coords, e.data["own_indices"])] += e.data["own_values"]
                plain[np.searchsorted(coords, e.data["filled_indices"])] += \
                    e.data["filled_values"]
            if not np.allclose(first["group_sum"], plain, atol=len(members) * RESOLUTION,
                               rtol=0):
                bad += 1
                continue
            complete += 1
            cross += len({self.node_of.get(p, "?") for p in members}) > 1
        return complete, cross, bad


async def time_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Seconds until predicate() holds (polled every 50 ms); ScenarioError after timeout_s."""
    return (await times_until({what: predicate}, timeout_s, what))[what]


async def times_until(predicates: dict[str, Callable[[], bool]], timeout_s: float,
                      what: str) -> dict[str, float]:
    """{name: seconds until predicates[name]() first held}, once all have; ScenarioError
    naming the ones still false after timeout_s."""
    t0 = time.monotonic()
    first_true: dict[str, float] = {}
    while True:
        for name, predicate in predicates.items():
            if name not in first_true and predicate():
                first_true[name] = time.monotonic() - t0
        if len(first_true) == len(predicates):
            return first_true
        if time.monotonic() - t0 > timeout_s:
            missing = sorted(set(predicates) - set(first_true))
            raise ScenarioError(f"timed out after {timeout_s:g} s waiting for {what}"
                                f" (still false: {', '.join(missing)})")
        await asyncio.sleep(0.05)


def start_victim(swarm: Swarm, url: str, workdir: Path) -> subprocess.Popen[bytes]:
    # An idle peer in its own process, under another model id so nobody groups with it: the
    # scenario SIGKILLs it, and the node it was connected to publishes its signed will.
    key_file, cert_file = write_identity(swarm.admission, "victim", workdir)
    return spawn_idle_peer(url, NET, key_file, cert_file, swarm.admission.public_key.hex(),
                           model_id="idle-victim", param_count=1,
                           announce_interval_s=swarm.config.announce_interval_s,
                           silence_expiry_s=600.0, stderr=subprocess.DEVNULL, new_session=True)


async def run_murmur(cluster: RabbitCluster, args: argparse.Namespace, rows: list[Row]) -> None:
    a, b = cluster.nodes
    interval = args.announce_interval
    swarm = Swarm(AdmissionKey.generate(NET), replace(BASE_CONFIG, announce_interval_s=interval))
    make = make_trainers(args.per_node * 2 + 1)
    victim: subprocess.Popen[bytes] | None = None
    try:
        t0 = time.monotonic()
        for i in range(args.per_node):
            swarm.add(f"a{i}", "A", a.url, make(i))
            swarm.add(f"b{i}", "B", b.url, make(args.per_node + i))
        first = sorted(swarm.peers)
        victim = start_victim(swarm, b.url, cluster.tmp)
        # --- every peer sees every other (no retained announcement reaches '+' filters) ---
        seen = await times_until({p: (lambda p=p: swarm.sees([p], set(first))) for p in first},
                                 3 * interval + 30, "every peer to see every other")
        rows.append(Row("views complete (6 peers started together)", round(max(seen.values()),
                        1), "s", f"first peer complete after {min(seen.values()):.1f} s; "
                        f"announce_interval_s = {interval:g}"))
        # --- a newcomer on B, with every established peer already announced -------------
        newcomer = swarm.add("new", "B", b.url, make(2 * args.per_node))
        joined = await times_until(
            {"sees": lambda: swarm.sees(["new"], set(first)),
             "seen": lambda: swarm.sees(first, {"new"})},
            3 * interval + 30, "the newcomer and the established peers to see each other")
        rows.append(Row("newcomer on B sees the established peers after",
                        round(joined["sees"], 1), "s",
                        f"announce_interval_s = {interval:g}; its drops meanwhile: "
                        f"{newcomer.drops.snapshot() or 'none'}"))
        rows.append(Row("established peers see the newcomer after", round(joined["seen"], 1),
                        "s", "its live announcement on connect"))
        # --- the victim's will ------------------------------------------------------------
        everyone = sorted(swarm.peers)
        await time_until(lambda: swarm.sees(everyone, {"victim"}), 3 * interval + 30,
                         "every peer to see the victim")
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        gone = await times_until(
            {node: (lambda node=node: all(swarm.peers[p].membership.get("victim") is None
                                          for p in everyone if swarm.node_of[p] == node))
             for node in ("A", "B")}, 15, "the will to clear the victim from every view")
        for node, seconds in sorted(gone.items()):
            rows.append(Row(f"SIGKILLed peer on B leaves the views on {node} after",
                            round(seconds, 2), "s",
                            "its signed last will (silence expiry is 600 s)"))
        # --- sessions across the two nodes --------------------------------------------------
        await time_until(lambda: swarm.sessions()[1] >= args.sessions, args.session_timeout,
                         f"{args.sessions} completed sessions with members on both nodes")
        rows.append(Row("time from peer start to the target", round(time.monotonic() - t0, 1),
                        "s", f"{args.sessions} cross-node sessions"))
    finally:
        if victim is not None and victim.poll() is None:
            victim.kill()
            victim.wait(timeout=10)
        await swarm.close()
    complete, cross, bad = swarm.sessions()
    rows += [Row("sessions completed by every member", complete),
             Row("  of which with members on both nodes", cross),
             Row("sessions whose members disagree on the sum", bad)]
    drops: dict[str, Counter[str]] = {}
    for peer_id, peer in sorted(swarm.peers.items()):
        for reason, n in peer.drops.snapshot().items():
            drops.setdefault(reason, Counter())[peer_id] += n
    rows += [Row(f"drops: {reason}", sum(by_peer.values()), "",
                 ", ".join(f"{p} {n}" for p, n in sorted(by_peer.items())))
             for reason, by_peer in sorted(drops.items())] or [Row("drops", 0)]
    if bad:
        raise ScenarioError(f"{bad} sessions whose members disagree on the group sum")


# ---------------------------------------------------------------------------- main
def print_table(rows: list[Row]) -> None:
    width = max(len(r.name) for r in rows)
    for r in rows:
        value = f"{r.value} {r.unit}".strip()
        print(f"{r.name:<{width}}  {value:>12}  {r.note}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--announce-interval", type=float, default=5.0,
                        help="announce_interval_s of every peer (default 5)")
    parser.add_argument("--per-node", type=int, default=3, help="training peers per node")
    parser.add_argument("--sessions", type=int, default=3,
                        help="cross-node sessions to wait for (default 3)")
    parser.add_argument("--session-timeout", type=float, default=120.0)
    parser.add_argument("--rabbitmq-bin", type=Path, default=RABBITMQ_BIN)
    args = parser.parse_args(argv)
    if args.per_node < 2 or args.announce_interval <= 0 or args.sessions < 1:
        parser.error("--per-node >= 2, --announce-interval > 0 and --sessions >= 1 required")
    if not (args.rabbitmq_bin / "rabbitmq-server").exists():
        parser.error(f"no rabbitmq-server in {args.rabbitmq_bin} (apt-get install rabbitmq-server)")
    return args


def _interrupt(signum: int, _frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so the finally clauses stop every process started here."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows: list[Row] = []
    error = ""
    signal.signal(signal.SIGTERM, _interrupt)
    cluster = RabbitCluster(bin_dir=args.rabbitmq_bin)
    t0 = time.monotonic()
    try:
        cluster.start(rows)
        asyncio.run(probe_semantics(*cluster.nodes, rows))
        asyncio.run(run_murmur(cluster, args, rows))
    except (ScenarioError, subprocess.TimeoutExpired, OSError, aiomqtt.MqttError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        t_stop = time.monotonic()
        cluster.close()
        rows.append(Row("cluster stopped and cleaned up", round(time.monotonic() - t_stop, 1),
                        "s"))
    rows.append(Row("total wall time", round(time.monotonic() - t0, 1), "s"))
    if error:
        rows.append(Row("error", error))
    print_table(rows)
    if args.out is not None:
        args.out.write_text(json.dumps([vars(r) for r in rows], indent=1) + "\n")
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
