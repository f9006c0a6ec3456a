"""Run a simulated Murmur network: N real peers, a real MQTT broker, a report at the end.

``run_simulation(scenario)`` does, in order:

1. creates the run directory ``out_dir/<UTC time>-<network>`` (scenario.toml, metrics.jsonl,
   sim.log, per-peer state directories, report.html);
2. loads the data set, splits the *training* set across the peers (sim.partition, seeded) and
   keeps a local hold-out per peer; the test set is used only for the final accuracies and the
   baselines;
3. creates the network's admission key and one identity + certificate per peer with the real
   crypto (keys come from the OS CSPRNG, never from the scenario seed);
4. starts the broker (embedded amqtt, a managed Mosquitto, or an external URL);
5. runs every peer as a real ``peer.node.Peer`` - as tasks of this event loop ("inprocess") or
   one OS process each ("processes", see sim/peer_process.py) - with the scenario's faults
   (sim/faults.py) and hostile peers (sim/hostile.py);
6. stops when every peer has trained ``rounds`` local rounds (or spent its privacy budget), or
   at ``duration_s``, or on Ctrl-C; evaluates every peer on the test set;
7. computes the centralized / standalone baselines on the same split and writes the report.

Every simulated peer has its own keys, certificate, privacy ledger and checkpoint directory and
talks to the others only through the broker: the simulation has no shortcut path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from crypto.admission import AdmissionKey, Certificate
from crypto.identity import Identity
from peer.merge import GOSSIP_AVERAGING
from peer.node import NodeConfig, Peer, PeerEvent, PeerStatus
from peer.session import SessionTimeouts
from peer.transport import BrokerSettings
from sim import hostile
from sim.broker import BrokerStartError
from sim.faults import ChurnEvent, FaultStats, churn_schedule, install_send_faults
from sim.metrics import (
    EVENT_JOIN,
    EVENT_LEAVE,
    EVENT_START,
    EVENT_STOP,
    METRICS_FILE,
    MetricsWriter,
    read_metrics_file,
)
from sim.partition import partition
from sim.report import RunSummary, summarize, terminal_summary, write_report
from sim.scenario import Scenario, resolve_model, scenario_to_toml

log = logging.getLogger(__name__)

LOG_FILE = "sim.log"
SCENARIO_FILE = "scenario.toml"
RESULT_FILE = "result.json"
CERT_VALIDITY_S = 7 * 24 * 3600.0
#: After every peer finished its rounds, wait at most this long for sessions in flight.
DRAIN_S = 3.0
#: Bound on stopping one peer (leave, checkpoint, disconnect).
STOP_TIMEOUT_S = 30.0
#: Node pacing. A local round of the default model takes a fraction of a second, far less than
#: an aggregation session; without a pause between rounds a peer would finish all its rounds
#: before its neighbours could merge anything. Random start jitter spreads the peers'
#: invitations so that they do not all start sessions at once and decline each other as busy.
ROUND_PAUSE_S = 2.0
START_JITTER_S = 1.5
COOLDOWN_S = 0.5
#: Peer events that become metrics rows.
RECORDED_EVENTS = ("round", "session_done", "session_aborted", "merge_rejected",
                   "budget_exhausted")


class SimulationError(RuntimeError):
    """The simulation could not run (data, broker or peers failed to start)."""


@dataclass
class RunResult:
    """What a run produced: where, how it went, and the figures shown at the end."""

    run_dir: Path
    report_path: Path | None
    metrics_path: Path
    summary: RunSummary
    baselines: dict[str, dict[str, Any]]
    wall_time_s: float
    interrupted: bool
    stopped_by: str  # "rounds" | "duration" | "interrupt"
    hostile: list[dict[str, Any]] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)
    churn_events: int = 0


# ----------------------------------------------------------------------------- peer counters
_SUMMED = ("round", "sessions_done", "sessions_aborted", "merges_applied", "bytes_sent",
           "bytes_received", "messages_sent", "messages_received", "reconnects")
_DICTS = ("aborts_by_reason", "merges_rejected", "drops")


def status_carry(status: PeerStatus) -> dict[str, Any]:
    """The cumulative counters of a peer incarnation, to add to its next one after a rejoin."""
    carry: dict[str, Any] = {name: int(getattr(status, name)) for name in _SUMMED}
    for name in _DICTS:
        carry[name] = {str(k): int(v) for k, v in getattr(status, name).items()}
    return carry


def with_carry(status: PeerStatus, carry: dict[str, Any] | None) -> PeerStatus:
    """``status`` with the counters of earlier incarnations (churn) added, so metrics rows stay
    cumulative over the whole run (the report reads each peer's last row as its total)."""
    if not carry:
        return status
    changes: dict[str, Any] = {}
    for name in _SUMMED:
        changes[name] = int(getattr(status, name)) + int(carry.get(name, 0))
    for name in _DICTS:
        merged = dict(carry.get(name, {}))
        for key, value in getattr(status, name).items():
            merged[key] = merged.get(key, 0) + int(value)
        changes[name] = merged
    return dataclasses.replace(status, **changes)


def add_carry(carry: dict[str, Any] | None, status: PeerStatus) -> dict[str, Any]:
    """Carry after one more incarnation ended with ``status`` (its own counters only)."""
    return status_carry(with_carry(status, carry))


def event_extra(event: PeerEvent) -> dict[str, Any]:
    """Plain details of a peer event worth a metrics row (never model data)."""
    extra: dict[str, Any] = {}
    if event.kind in ("session_aborted", "merge_rejected"):
        extra["reason"] = str(event.data.get("reason"))
    if event.kind == "session_done":
        extra["clipped"] = bool(event.data.get("clipped"))
        extra["contributors"] = len(event.data.get("contributors") or ())
    return extra


# ----------------------------------------------------------------------------- configuration
def node_config(s: Scenario, round_pause_s: float = ROUND_PAUSE_S) -> NodeConfig:
    """Node timing for a simulation: announcements and expiry fast enough that churn shows up
    within seconds; session timeouts stretched by the injected delay (a session makes ~4 hops)."""
    extra = 4 * s.delay_ms / 1000.0
    return NodeConfig(
        group_size=s.group_size,
        threshold=s.threshold,
        timeouts=SessionTimeouts(invite_s=2.0 + extra, start_s=3.0 + extra,
                                 share_s=4.0 + extra, partial_s=4.0 + extra),
        announce_interval_s=5.0,
        silence_expiry_s=30.0,
        checkpoint_interval_s=30.0,
        start_jitter_s=START_JITTER_S,
        cooldown_s=COOLDOWN_S,
        tick_s=0.05,
        round_pause_s=round_pause_s,
        evaluate_every=1,
        merge=SIM_MERGE,
    )


#: The simulation's merge rule: gossip averaging (see peer.merge.GOSSIP_AVERAGING); pairs
#: with ``share="model"`` in :func:`trainer_config`.
SIM_MERGE = GOSSIP_AVERAGING


def averaging_rounds(rounds: int) -> int:
    """Rounds at the end of a run that take no private step and only re-share the model, so
    the peers' independent DP noise keeps averaging out at no privacy cost (a sixth of the run;
    none for runs shorter than six rounds)."""
    return rounds // 6


def model_seed(network: str, seed: int) -> int:
    """The model-initialisation seed shared by every peer of a network.

    Gossip averaging only makes sense between models that start from the same point, so all
    peers of one network derive the same seed (from the network id and the scenario seed).
    It seeds weights and batch order only, never DP noise or keys.
    """
    digest = 0
    for ch in f"{network}:{seed}":
        digest = (digest * 131 + ord(ch)) % (2**31 - 1)
    return digest


def trainer_config(s: Scenario, model_name: str) -> Any:
    """peer.trainer.TrainerConfig for a simulated peer (imported lazily: pulls in torch).

    The same for every peer of a network: the seed there only initialises the model (batches
    and DP noise come from the OS CSPRNG), and all peers must start from the same weights.
    """
    from peer.trainer import TrainerConfig

    return TrainerConfig(
        model=model_name,
        lr=s.lr,
        batch_size=s.batch_size,
        local_steps=s.local_steps,
        dp=s.dp,
        noise_multiplier=s.noise_multiplier if s.dp else None,
        target_epsilon=s.target_epsilon if s.dp else None,
        planned_rounds=s.rounds,
        delta=s.delta,
        max_grad_norm=s.max_grad_norm,
        # The budget is the target: a peer stops sharing once it spent what was planned.
        budget_epsilon=s.target_epsilon if s.dp else None,
        topk_fraction=s.topk_fraction,
        share="model",  # displacement from the common init; merged by SIM_MERGE
        averaging_rounds=averaging_rounds(s.rounds),
        seed=model_seed(s.network, s.seed),
    )


def broker_settings_for_url(s: Scenario) -> BrokerSettings:
    return BrokerSettings(url=s.broker, username=s.broker_username,
                          password=s.broker_password, ca_file=s.broker_ca_file)


@contextlib.asynccontextmanager
async def open_broker(s: Scenario) -> AsyncIterator[BrokerSettings]:
    """Start the scenario's broker (or point at an external one) for the length of the run."""
    from sim.broker import EmbeddedBroker, MosquittoBroker, wait_until_accepting

    if s.broker == "embedded":
        async with EmbeddedBroker() as embedded:
            yield BrokerSettings(url=embedded.url)
    elif s.broker == "mosquitto":
        if not MosquittoBroker.available():
            raise SimulationError("broker = 'mosquitto' but /usr/sbin/mosquitto is not installed")
        async with MosquittoBroker() as mosquitto:
            yield BrokerSettings(url=mosquitto.url)
    else:
        settings = broker_settings_for_url(s)
        host, port, _tls = settings.endpoint()
        # Fail in seconds, not at duration_s, when nothing listens there.
        await wait_until_accepting(host, port, timeout_s=10.0)
        yield settings


# ----------------------------------------------------------------------------- preparation
@dataclass
class PeerPlan:
    """Everything one simulated peer is made of."""

    index: int
    peer_id: str
    identity: Identity
    certificate: Certificate
    shard: np.ndarray  # indices into the training set
    train: Any  # peer.data.Dataset
    holdout: Any
    state_dir: Path
    hostile_kind: str | None = None


@dataclass
class Prepared:
    run_dir: Path
    scenario: Scenario
    train: Any
    test: Any
    model_name: str
    admission: AdmissionKey
    plans: list[PeerPlan]
    hostile_plans: list[PeerPlan]
    round_pause_s: float = ROUND_PAUSE_S


def make_run_dir(out_dir: Path, network: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 1000):
        name = f"{stamp}-{network}" if attempt == 1 else f"{stamp}-{network}-{attempt}"
        run_dir = out_dir / name
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        return run_dir
    raise SimulationError(f"cannot create a run directory in {out_dir}")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def prepare(s: Scenario, run_dir: Path) -> Prepared:
    """Data split, keys and certificates for every peer (honest and hostile)."""
    from peer.data import load_source, split_holdout

    try:
        train, test = load_source(s.dataset)
    except Exception as exc:  # DataError, OSError, ValueError: the data set is unusable
        raise SimulationError(f"cannot load data set {s.dataset!r}: {exc}") from exc
    model_name = resolve_model(s.model, tuple(train.x.shape[1:]))
    rng = np.random.default_rng(s.seed)
    try:
        shards = partition(train.y, s.peers, s.partition, rng, alpha=s.alpha,
                           shards_per_peer=s.shards_per_peer, min_size=s.min_partition_size)
    except ValueError as exc:
        raise SimulationError(f"cannot split {len(train.y)} examples over {s.peers} peers: "
                              f"{exc}") from exc
    admission = AdmissionKey.generate(s.network)
    now = time.time()
    plans: list[PeerPlan] = []
    for i, shard in enumerate(shards):
        peer_id = f"p{i:02d}"
        identity = Identity.generate(peer_id)
        local_train, holdout = split_holdout(train.subset(shard, name=f"{train.name}[{peer_id}]"),
                                             s.holdout_fraction, s.seed + i)
        plans.append(PeerPlan(
            index=i, peer_id=peer_id, identity=identity,
            certificate=admission.issue(identity.public, valid_for_s=CERT_VALIDITY_S, now=now),
            shard=np.asarray(shard, dtype=np.int64), train=local_train, holdout=holdout,
            state_dir=run_dir / "peers" / peer_id,
        ))
    hostile_plans: list[PeerPlan] = []
    if "huge_norm" in s.hostile_peers:
        # An admitted insider with its own (IID) data of a typical shard size.
        size = int(np.median([len(p) for p in shards]))
        shard = np.sort(rng.choice(len(train.y), size=max(size, 4), replace=False))
        identity = Identity.generate(hostile.HUGE_NORM_ID)
        local_train, holdout = split_holdout(train.subset(shard), s.holdout_fraction, s.seed)
        hostile_plans.append(PeerPlan(
            index=len(plans), peer_id=hostile.HUGE_NORM_ID, identity=identity,
            certificate=admission.issue(identity.public, valid_for_s=CERT_VALIDITY_S, now=now),
            shard=shard, train=local_train, holdout=holdout,
            state_dir=run_dir / "peers" / hostile.HUGE_NORM_ID, hostile_kind="huge_norm",
        ))
    for plan in (*plans, *hostile_plans):
        plan.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return Prepared(run_dir, s, train, test, model_name, admission, plans, hostile_plans)


def build_trainer(s: Scenario, model_name: str, plan: PeerPlan) -> Any:
    """The peer's real LocalTrainer (resumes from its state_dir when a checkpoint exists)."""
    from peer.trainer import LocalTrainer

    config = trainer_config(s, model_name)
    trainer = LocalTrainer(config, plan.train, plan.holdout, plan.state_dir)
    if plan.hostile_kind == "huge_norm":
        return hostile.HugeNormTrainer(trainer)
    return trainer


# ----------------------------------------------------------------------------- progress
class Progress:
    """tqdm bar over local rounds (peers x rounds) with live network figures."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="round", dynamic_ncols=True, file=sys.stderr,
                            desc="murmur-sim")

    def update(self, done: int, *, alive: int, sessions: int, accuracy: float | None,
               epsilon: float | None) -> None:
        if self.bar is None:
            return
        self.bar.n = min(done, self.bar.total)
        self.bar.set_postfix(
            alive=alive,
            sessions=sessions,
            acc="-" if accuracy is None else f"{accuracy:.3f}",
            eps="-" if epsilon is None else f"{epsilon:.2f}",
            refresh=False,
        )
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


# ----------------------------------------------------------------------------- in-process
@dataclass
class SimPeer:
    """A simulated peer across its incarnations (a churned peer rejoins as a new Peer)."""

    plan: PeerPlan
    trainer: Any
    peer: Peer | None = None
    task: asyncio.Task[None] | None = None
    stop: asyncio.Event | None = None
    carry: dict[str, Any] | None = None
    alive: bool = False
    incarnations: int = 0
    churning: bool = False
    faults: FaultStats = field(default_factory=FaultStats)

    def status(self) -> PeerStatus | None:
        return None if self.peer is None else with_carry(self.peer.status(), self.carry)


class InProcessNetwork:
    """All peers as tasks of this event loop."""

    def __init__(self, prep: Prepared, broker: BrokerSettings, writer: MetricsWriter) -> None:
        self.prep = prep
        self.s = prep.scenario
        self.broker = broker
        self.writer = writer
        self.config = node_config(self.s, prep.round_pause_s)
        self.fault_rng = random.Random(self.s.seed)
        self.peers: list[SimPeer] = []
        self.hostile_peers: list[SimPeer] = []

    def build(self) -> None:
        for plan in self.prep.plans:
            trainer = build_trainer(self.s, self.prep.model_name, plan)
            self.peers.append(SimPeer(plan, trainer))
        for plan in self.prep.hostile_plans:
            trainer = build_trainer(self.s, self.prep.model_name, plan)
            self.hostile_peers.append(SimPeer(plan, trainer))

    def _on_event(self, sim_peer: SimPeer) -> Callable[[PeerEvent], None]:
        def handle(event: PeerEvent) -> None:
            if event.kind not in RECORDED_EVENTS:
                return
            status = sim_peer.status()
            if status is None:
                return
            self.writer.record_status(status, event.kind, **event_extra(event))

        return handle

    def start(self, sim_peer: SimPeer, *, record: bool, event: str = EVENT_START) -> None:
        plan = sim_peer.plan
        peer = Peer(
            identity=plan.identity,
            certificate=plan.certificate,
            admission_public_key=self.prep.admission.public_key,
            network_id=self.s.network,
            trainer=sim_peer.trainer,
            broker=self.broker,
            config=self.config,
            on_event=self._on_event(sim_peer) if record else None,
        )
        install_send_faults(peer.transport, delay_ms=self.s.delay_ms,
                            loss_rate=self.s.loss_rate, rng=self.fault_rng,
                            stats=sim_peer.faults)
        sim_peer.peer = peer
        sim_peer.stop = asyncio.Event()
        sim_peer.task = asyncio.create_task(peer.run(sim_peer.stop), name=f"peer-{plan.peer_id}")
        sim_peer.alive = True
        sim_peer.incarnations += 1
        if record:
            status = sim_peer.status()
            assert status is not None
            self.writer.record_status(status, event)

    async def stop_peer(self, sim_peer: SimPeer) -> None:
        """Stop one incarnation cleanly (leave message, checkpoint, disconnect)."""
        if not sim_peer.alive or sim_peer.stop is None or sim_peer.task is None:
            return
        sim_peer.stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(sim_peer.task), timeout=STOP_TIMEOUT_S)
        except TimeoutError:
            log.error("%s did not stop within %.0f s", sim_peer.plan.peer_id, STOP_TIMEOUT_S)
        except Exception:
            log.exception("%s ended with an error", sim_peer.plan.peer_id)
        sim_peer.alive = False

    async def churn_one(self, event: ChurnEvent, finished: Callable[[], bool]) -> bool:
        """One leave/rejoin cycle; skipped (False) if the peer is down or already cycling:
        two overlapping cycles would start two peers with one identity."""
        sim_peer = self.peers[event.peer_index]
        if not sim_peer.alive or sim_peer.churning or finished():
            return False
        sim_peer.churning = True
        try:
            log.info("churn: %s leaves for %.1f s", sim_peer.plan.peer_id, event.downtime_s)
            await self.stop_peer(sim_peer)
            status = sim_peer.status()
            assert sim_peer.peer is not None and status is not None
            self.writer.record_status(status, EVENT_LEAVE)
            await asyncio.sleep(event.downtime_s)
            if finished():
                return True  # stays down; its last incarnation holds its final counters
            log.info("churn: %s rejoins", sim_peer.plan.peer_id)
            # Fold the ended incarnation into the carry only now that a new one replaces it.
            sim_peer.carry = add_carry(sim_peer.carry, sim_peer.peer.status())
            self.start(sim_peer, record=True, event=EVENT_JOIN)
            return True
        finally:
            sim_peer.churning = False

    def snapshot(self) -> dict[str, Any]:
        statuses = [st for sp in self.peers if (st := sp.status()) is not None]
        return {
            "alive": sum(1 for sp in self.peers if sp.alive),
            "rounds": sum(min(st.round, self.s.rounds) for st in statuses),
            "sessions": sum(st.sessions_done for st in statuses),
            "accuracy": _mean([st.accuracy for st in statuses if st.accuracy is not None]),
            "epsilon": _mean([st.epsilon for st in statuses if st.epsilon is not None]),
            "finished": all(st.round >= self.s.rounds or st.budget_exhausted
                            for st in statuses) and len(statuses) == len(self.peers),
            "in_session": any(sp.alive and sp.peer is not None and sp.peer.session is not None
                              for sp in self.peers),
        }


async def _run_inprocess(prep: Prepared, broker: BrokerSettings, writer: MetricsWriter,
                         stop_requested: asyncio.Event, progress: Progress) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # many peers on few cores: one intra-op thread each
    s = prep.scenario
    loop = asyncio.get_running_loop()
    # Every peer trains, merges and checkpoints in worker threads: give each peer room so that
    # one peer's training never queues another peer's merge.
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(
        max_workers=2 * (len(prep.plans) + len(prep.hostile_plans)) + 4,
        thread_name_prefix="murmur-sim"))
    net = InProcessNetwork(prep, broker, writer)
    await asyncio.to_thread(net.build)
    started = time.monotonic()
    for sim_peer in net.peers:
        net.start(sim_peer, record=True)
    for sim_peer in net.hostile_peers:
        net.start(sim_peer, record=False)

    hostile_stop = asyncio.Event()
    hostile_tasks = _start_raw_hostiles(s, broker, [p.peer_id for p in prep.plans], hostile_stop,
                                        param_count=net.peers[0].trainer.param_count)
    finished_flag = False
    churn_tasks: list[asyncio.Task[bool]] = []
    schedule = churn_schedule(peers=s.peers, churn_rate_per_min=s.churn_rate,
                              downtime_s=s.churn_downtime_s, horizon_s=s.duration_s, seed=s.seed)

    async def churn_driver() -> None:
        for event in schedule:
            delay = started + event.leave_at_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            churn_tasks.append(asyncio.create_task(
                net.churn_one(event, lambda: finished_flag)))

    driver = asyncio.create_task(churn_driver())
    stopped_by = await _watch(
        s, started, stop_requested, progress, net.snapshot)
    finished_flag = True
    await _cancel_all([driver, *churn_tasks])
    hostile_stop.set()
    await asyncio.gather(*(net.stop_peer(sp) for sp in (*net.peers, *net.hostile_peers)))
    hostile_stats = await _collect_hostiles(hostile_tasks)

    # Final accuracy of every honest peer on the shared test set.
    for sim_peer in net.peers:
        if sim_peer.peer is None:
            continue
        accuracy = await asyncio.to_thread(sim_peer.trainer.evaluate, prep.test)
        status = sim_peer.status()
        assert status is not None
        writer.record_status(status, EVENT_STOP, test_accuracy=float(accuracy),
                             incarnations=sim_peer.incarnations,
                             injected_losses=sim_peer.faults.lost)
    faults = {
        "messages_lost": sum(sp.faults.lost for sp in net.peers),
        "messages_delayed": sum(sp.faults.delayed for sp in net.peers),
    }
    extra = []
    for sim_peer in net.hostile_peers:
        status = sim_peer.status()
        if status is not None:
            extra.append({"kind": sim_peer.plan.hostile_kind, "peer": sim_peer.plan.peer_id,
                          "sessions_done": status.sessions_done, "rounds": status.round})
    return {
        "stopped_by": stopped_by,
        "hostile": [dataclasses.asdict(h) for h in hostile_stats] + extra,
        "faults": faults,
        "churn_events": sum(1 for t in churn_tasks
                            if t.done() and not t.cancelled() and t.exception() is None
                            and t.result()),  # completed leave/rejoin cycles
    }


def _start_raw_hostiles(s: Scenario, broker: BrokerSettings, targets: list[str],
                        stop: asyncio.Event, *, param_count: int) -> list[asyncio.Task[Any]]:
    tasks: list[asyncio.Task[Any]] = []
    if "garbage" in s.hostile_peers:
        tasks.append(asyncio.create_task(hostile.run_garbage(
            broker, s.network, targets, stop, seed=s.seed + 1, param_count=param_count)))
    if "replay" in s.hostile_peers:
        tasks.append(asyncio.create_task(hostile.run_replay(
            broker, s.network, stop, seed=s.seed + 2)))
    return tasks


async def _cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel background tasks (churn) and wait for them; a task that had failed is logged."""
    for task in tasks:
        task.cancel()
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(outcome, BaseException) and not isinstance(outcome,
                                                                 asyncio.CancelledError):
            log.error("background task failed: %r", outcome)


async def _collect_hostiles(tasks: list[asyncio.Task[Any]]) -> list[hostile.HostileStats]:
    """Results of the hostile clients; one that failed is logged, never fatal to the run."""
    stats: list[hostile.HostileStats] = []
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(outcome, hostile.HostileStats):
            stats.append(outcome)
        else:
            log.error("hostile client failed: %r", outcome)
    return stats


async def _watch(s: Scenario, started: float, stop_requested: asyncio.Event,
                 progress: Progress, snapshot: Callable[[], dict[str, Any]]) -> str:
    """Update the progress bar until rounds are done, time is up, or a stop is requested."""
    drain_until: float | None = None
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_requested.wait(), timeout=0.5)
        snap = snapshot()
        progress.update(snap["rounds"], alive=snap["alive"], sessions=snap["sessions"],
                        accuracy=snap["accuracy"], epsilon=snap["epsilon"])
        if stop_requested.is_set():
            return "interrupt"
        now = time.monotonic()
        if now - started >= s.duration_s:
            return "duration"
        if snap["finished"]:
            # Let sessions in flight finish so the last updates are merged.
            drain_until = drain_until or now + DRAIN_S
            if not snap["in_session"] or now >= drain_until:
                return "rounds"


# ----------------------------------------------------------------------------- processes
def _write_spec(prep: Prepared, plan: PeerPlan, broker: BrokerSettings, start_time: float,
                secrets_dir: Path) -> Path:
    """Key files and a JSON spec for one peer process (all mode 0600 in run_dir/secrets)."""
    from crypto._atomic import write_private_file

    s = prep.scenario
    key_path = secrets_dir / f"{plan.peer_id}.key"
    cert_path = secrets_dir / f"{plan.peer_id}.cert"
    shard_path = plan.state_dir / "shard.npy"
    plan.identity.save(key_path, overwrite=True)
    write_private_file(cert_path, plan.certificate.to_bytes(), overwrite=True)
    tmp = shard_path.with_name(".shard.npy.tmp")
    with open(tmp, "wb") as out:
        np.save(out, plan.shard)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, shard_path)
    spec = {
        "peer_id": plan.peer_id,
        "index": plan.index,
        "hostile_kind": plan.hostile_kind,
        "run_dir": str(prep.run_dir),
        "state_dir": str(plan.state_dir),
        "start_time": start_time,
        "identity_file": str(key_path),
        "certificate_file": str(cert_path),
        "admission_public_key": prep.admission.public_key.hex(),
        "broker": {"url": broker.url, "username": broker.username,
                   "password": broker.password,
                   "ca_file": None if broker.ca_file is None else str(broker.ca_file)},
        "shard_file": str(shard_path),
        "scenario": scenario_to_toml(s),
        "round_pause_s": prep.round_pause_s,
    }
    spec_path = secrets_dir / f"{plan.peer_id}.json"
    write_private_file(spec_path, json.dumps(spec, indent=1).encode(), overwrite=True)
    return spec_path


class MetricsTail:
    """Follows metrics.jsonl written by the peer processes (complete lines only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.latest: dict[str, dict[str, Any]] = {}

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as source:
                source.seek(self.offset)
                data = source.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return
        self.offset += end + 1
        for line in data[: end + 1].splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("peer"), str):
                self.latest[row["peer"]] = row


@dataclass
class ProcPeer:
    plan: PeerPlan
    spec: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    spawned_t: float = 0.0  # metrics time of the last spawn
    churning: bool = False


def _spawn(proc_peer: ProcPeer, *, rejoin: bool) -> None:
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    args = [sys.executable, "-m", "sim.peer_process", "--spec", str(proc_peer.spec)]
    if rejoin:
        args.append("--rejoin")
    with open(proc_peer.log_path, "ab") as log_file:
        proc_peer.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
            cwd=str(root))


async def _wait_exit(process: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return process.poll()


async def _end_process(proc_peer: ProcPeer, sig: int, timeout_s: float) -> None:
    process = proc_peer.process
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    if await _wait_exit(process, timeout_s) is None:
        log.error("%s (pid %d) did not exit after signal %d; killing it",
                  proc_peer.plan.peer_id, process.pid, sig)
        process.kill()
        await _wait_exit(process, 5.0)


async def _run_processes(prep: Prepared, broker: BrokerSettings, writer: MetricsWriter,
                         stop_requested: asyncio.Event, progress: Progress) -> dict[str, Any]:
    s = prep.scenario
    secrets_dir = prep.run_dir / "secrets"
    secrets_dir.mkdir(mode=0o700, exist_ok=True)
    prep.admission.save(secrets_dir / "admission.key", overwrite=True)
    procs: list[ProcPeer] = []
    hostile_procs: list[ProcPeer] = []
    for plan in (*prep.plans, *prep.hostile_plans):
        spec = _write_spec(prep, plan, broker, writer.start_time, secrets_dir)
        proc_peer = ProcPeer(plan, spec, plan.state_dir / "process.log")
        (hostile_procs if plan.hostile_kind else procs).append(proc_peer)
    started = time.monotonic()
    for proc_peer in (*procs, *hostile_procs):
        _spawn(proc_peer, rejoin=False)
    from peer.models import build_model, param_count

    param_total = param_count(build_model(prep.model_name, tuple(prep.train.x.shape[1:]),
                                          prep.train.num_classes))
    hostile_stop = asyncio.Event()
    hostile_tasks = _start_raw_hostiles(s, broker, [p.peer_id for p in prep.plans],
                                        hostile_stop, param_count=param_total)
    tail = MetricsTail(writer.path)
    finished_flag = False
    churn_done = 0
    away = 0  # peers between a churn leave and their rejoin
    schedule = churn_schedule(peers=s.peers, churn_rate_per_min=s.churn_rate,
                              downtime_s=s.churn_downtime_s, horizon_s=s.duration_s, seed=s.seed)

    async def churn_one(event: ChurnEvent) -> None:
        nonlocal churn_done, away
        proc_peer = procs[event.peer_index]
        if (finished_flag or proc_peer.churning or proc_peer.process is None
                or proc_peer.process.poll() is not None):
            return
        # Only a peer that is up can leave: a process still importing torch is not yet a peer.
        tail.poll()
        row = tail.latest.get(proc_peer.plan.peer_id)
        if row is None or float(row.get("t", -1.0)) < proc_peer.spawned_t:
            log.info("churn: %s is still starting; leave skipped", proc_peer.plan.peer_id)
            return
        log.info("churn: %s leaves for %.1f s", proc_peer.plan.peer_id, event.downtime_s)
        away += 1
        proc_peer.churning = True
        try:
            # SIGUSR1: leave (clean stop, checkpoint, no final evaluation): sim/peer_process.py
            await _end_process(proc_peer, signal.SIGUSR1, STOP_TIMEOUT_S)
            await asyncio.sleep(event.downtime_s)
            if finished_flag:
                return
            log.info("churn: %s rejoins", proc_peer.plan.peer_id)
            proc_peer.spawned_t = writer.elapsed()
            _spawn(proc_peer, rejoin=True)
            churn_done += 1
        finally:
            away -= 1
            proc_peer.churning = False

    churn_tasks: list[asyncio.Task[None]] = []

    async def churn_driver() -> None:
        for event in schedule:
            delay = started + event.leave_at_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            churn_tasks.append(asyncio.create_task(churn_one(event)))

    def snapshot() -> dict[str, Any]:
        tail.poll()
        rows = [tail.latest.get(p.plan.peer_id) for p in procs]
        present = [r for r in rows if r is not None]
        alive = sum(1 for p in procs if p.process is not None and p.process.poll() is None)
        if alive == 0 and away == 0:
            # Every peer process ended on its own (crashed, see its process.log): nothing
            # more will happen, so end the run and report what there is.
            log.error("all peer processes have exited; ending the run")
            return {"alive": 0, "rounds": 0, "sessions": 0, "accuracy": None,
                    "epsilon": None, "finished": True, "in_session": False}
        return {
            "alive": alive,
            "rounds": sum(min(int(r.get("round") or 0), s.rounds) for r in present),
            "sessions": sum(int(r.get("sessions_done", 0)) for r in present),
            "accuracy": _mean([r["accuracy"] for r in present if r.get("accuracy") is not None]),
            "epsilon": _mean([r["epsilon"] for r in present if r.get("epsilon") is not None]),
            "finished": len(present) == len(procs) and all(
                int(r.get("round") or 0) >= s.rounds
                or bool(r.get("extra", {}).get("budget_exhausted")) for r in present),
            "in_session": False,
        }

    driver = asyncio.create_task(churn_driver())
    stopped_by = await _watch(s, started, stop_requested, progress, snapshot)
    if stopped_by == "rounds":
        await asyncio.sleep(DRAIN_S / 2)  # sessions in flight are invisible from here
    finished_flag = True
    await _cancel_all([driver, *churn_tasks])
    hostile_stop.set()
    # SIGTERM: stop, evaluate on the test set, write the final row, exit.
    await asyncio.gather(*(_end_process(p, signal.SIGTERM, 60.0)
                           for p in (*procs, *hostile_procs)))
    hostile_stats = await _collect_hostiles(hostile_tasks)
    for proc_peer in procs:
        code = None if proc_peer.process is None else proc_peer.process.returncode
        if code not in (0, None):
            log.warning("%s exited with code %s (see %s)", proc_peer.plan.peer_id, code,
                        proc_peer.log_path)
    return {
        "stopped_by": stopped_by,
        "hostile": [dataclasses.asdict(h) for h in hostile_stats]
        + [{"kind": p.plan.hostile_kind, "peer": p.plan.peer_id} for p in hostile_procs],
        "faults": {},
        "churn_events": churn_done,
    }


# ----------------------------------------------------------------------------- the run
def _attach_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / LOG_FILE, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler


def _install_interrupt(stop_requested: asyncio.Event) -> Callable[[], None]:
    """First Ctrl-C (or SIGTERM) stops the peers cleanly and still writes the report."""
    loop = asyncio.get_running_loop()
    installed: list[int] = []

    def on_signal(signum: int) -> None:
        if not stop_requested.is_set():
            print("\nstopping peers and writing the report (Ctrl-C again to abort)...",
                  file=sys.stderr)
            stop_requested.set()
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):
            # Not the main thread (e.g. a test runner thread): no signal handling there.
            continue

    def remove() -> None:
        for signum in installed:
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(signum)

    return remove


def _baseline_inputs(prep: Prepared) -> tuple[Any, list[np.ndarray]]:
    """The peers' local training sets pooled, with each peer's rows as its partition: the
    baselines train on exactly what the peers trained on (hold-outs excluded)."""
    from peer.data import Dataset

    xs = [p.train.x for p in prep.plans]
    ys = [p.train.y for p in prep.plans]
    pooled = Dataset(x=np.concatenate(xs), y=np.concatenate(ys),
                     num_classes=prep.train.num_classes, name="pooled")
    bounds = np.cumsum([0, *[len(y) for y in ys]])
    parts = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(ys))]
    return pooled, parts


async def run_simulation(scenario: Scenario, *, progress: bool = True,
                         baselines: bool = True,
                         round_pause_s: float = ROUND_PAUSE_S) -> RunResult:
    """Run the scenario end to end and write its report (see the module docstring).

    ``baselines=False`` skips the centralized/standalone references; ``round_pause_s`` paces
    the peers' training (see ROUND_PAUSE_S; tests shorten it).
    """
    wall_start = time.monotonic()
    run_dir = make_run_dir(Path(scenario.out_dir), scenario.network)
    handler = _attach_log_file(run_dir)
    try:
        return await _run(scenario, run_dir, wall_start, progress=progress,
                          baselines=baselines, round_pause_s=round_pause_s)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


async def _run(scenario: Scenario, run_dir: Path, wall_start: float, *, progress: bool,
               baselines: bool, round_pause_s: float) -> RunResult:
    _write_text_atomic(run_dir / SCENARIO_FILE, scenario_to_toml(scenario))
    log.info("run directory %s", run_dir)
    stop_requested = asyncio.Event()
    remove_handlers = _install_interrupt(stop_requested)
    bar = Progress(scenario.peers * scenario.rounds, progress)
    writer = MetricsWriter(run_dir)
    try:
        prep = await asyncio.to_thread(prepare, scenario, run_dir)
        prep.round_pause_s = round_pause_s
        log.info("data %s: %d train / %d test, model %s, shards %s", scenario.dataset,
                 len(prep.train.y), len(prep.test.y), prep.model_name,
                 [len(p.shard) for p in prep.plans])
        runner = _run_processes if scenario.mode == "processes" else _run_inprocess
        try:
            async with open_broker(scenario) as broker:
                log.info("broker %s", broker.url)
                outcome = await runner(prep, broker, writer, stop_requested, bar)
        except BrokerStartError as exc:
            raise SimulationError(f"broker: {exc}") from exc
    finally:
        bar.close()
        writer.close()
        remove_handlers()
    base: dict[str, dict[str, Any]] = {}
    if baselines and not stop_requested.is_set():
        from sim.baselines import compute_baselines

        pooled, parts = _baseline_inputs(prep)
        base = await asyncio.to_thread(compute_baselines, scenario, pooled, prep.test, parts)
    report_path = await asyncio.to_thread(write_report, run_dir, scenario, base)
    metrics = read_metrics_file(run_dir / METRICS_FILE)
    result = RunResult(
        run_dir=run_dir,
        report_path=report_path,
        metrics_path=run_dir / METRICS_FILE,
        summary=summarize(metrics.rows, metrics.skipped_lines),
        baselines=base,
        wall_time_s=time.monotonic() - wall_start,
        interrupted=stop_requested.is_set(),
        stopped_by=outcome["stopped_by"],
        hostile=outcome["hostile"],
        faults=outcome["faults"],
        churn_events=outcome["churn_events"],
    )
    _write_text_atomic(run_dir / RESULT_FILE, json.dumps(result_dict(result), indent=1))
    log.info("done in %.1f s (%s); report %s", result.wall_time_s, result.stopped_by,
             report_path)
    return result


def result_dict(result: RunResult) -> dict[str, Any]:
    """JSON-ready summary of a run (written to run_dir/result.json)."""
    summary = dataclasses.asdict(result.summary)
    return {
        "run_dir": str(result.run_dir),
        "report": None if result.report_path is None else str(result.report_path),
        "wall_time_s": round(result.wall_time_s, 2),
        "stopped_by": result.stopped_by,
        "interrupted": result.interrupted,
        "summary": summary,
        "baselines": {k: {kk: vv for kk, vv in v.items() if kk != "per_peer"}
                      for k, v in result.baselines.items()},
        "hostile": result.hostile,
        "faults": result.faults,
        "churn_events": result.churn_events,
    }


def _describe_hostile(h: dict[str, Any]) -> str:
    if "published" in h:
        return f"{h.get('kind')} client sent {h['published']} messages"
    if "sessions_done" in h:
        return f"{h.get('kind')} insider completed {h['sessions_done']} sessions"
    return f"{h.get('kind')} insider ran"


def format_result(result: RunResult) -> str:
    """The lines printed at the end of a run: the table, then where the report is."""
    lines = [terminal_summary(result.summary, result.baselines)]
    how = {"rounds": "all rounds done", "duration": "time cap reached",
           "interrupt": "interrupted"}.get(result.stopped_by, result.stopped_by)
    lines.append(f"run: {result.wall_time_s:.0f} s ({how}); accuracy on the "
                 f"{result.summary.accuracy_source}")
    if result.hostile:
        lines.append("hostile: " + "; ".join(_describe_hostile(h) for h in result.hostile))
    if result.churn_events:
        lines.append(f"churn: {result.churn_events} leave/rejoin cycles")
    lines.append(f"report: {result.report_path}")
    return "\n".join(lines)
