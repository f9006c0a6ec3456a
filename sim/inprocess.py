"""The in-process engine (``mode = "inprocess"``): every peer a task of this event loop.

Each peer is a real ``peer.network.node.Peer`` built by :func:`sim.setup.build_sim_peer` and
talks to the others only through the broker. Training, merging and checkpoints run in worker
threads. A churned peer stops cleanly and rejoins as a new ``Peer`` around the same trainer,
which resumes from its checkpoint; its counters are carried over (sim/carry.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from peer.network.node import Peer, PeerEvent, PeerStatus
from peer.network.transport import BrokerSettings
from sim import hostile
from sim.carry import RECORDED_EVENTS, add_carry, event_extra
from sim.faults import ChurnDriver, ChurnEvent, FaultStats, scenario_churn
from sim.metrics import EVENT_JOIN, EVENT_LEAVE, EVENT_START, EVENT_STOP, MetricsWriter
from sim.progress import Progress, Snapshot, mean, peers_finished, watch
from sim.setup import PeerPlan, Prepared, build_sim_peer, build_sim_trainer

log = logging.getLogger(__name__)

#: Bound on stopping one peer (leave, checkpoint, disconnect).
STOP_TIMEOUT_S = 30.0


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
        return None if self.peer is None else self.peer.status().plus(self.carry)


class InProcessNetwork:
    """All peers as tasks of this event loop."""

    def __init__(self, prep: Prepared, broker: BrokerSettings, writer: MetricsWriter,
                 audits: dict[int, Any] | None = None) -> None:
        self.prep = prep
        #: a privacy audit's hooks by peer index (sim/audit_network.py); empty in every run
        self.audits = dict(audits or {})
        self.s = prep.scenario
        self.broker = broker
        self.writer = writer
        self.fault_rng = random.Random(self.s.seed)
        self.peers: list[SimPeer] = []
        self.hostile_peers: list[SimPeer] = []
        self.finished = False  # set when the run ends: no more rejoins

    def build(self) -> None:
        for plan in self.prep.plans:
            trainer = build_sim_trainer(self.s, self.prep.model_name, plan,
                                        self.prep.group_sigma_eff, self.audits.get(plan.index))
            self.peers.append(SimPeer(plan, trainer))
        for plan in self.prep.hostile_plans:
            trainer = build_sim_trainer(self.s, self.prep.model_name, plan,
                                        self.prep.group_sigma_eff)
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
        peer = build_sim_peer(
            self.s, plan, sim_peer.trainer,
            admission_public_key=self.prep.admission.public_key,
            broker=self.broker,
            round_pause_s=self.prep.round_pause_s,
            fault_rng=self.fault_rng,
            fault_stats=sim_peer.faults,
            on_event=self._on_event(sim_peer) if record else None,
        )
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

    async def churn_one(self, event: ChurnEvent) -> bool:
        """One leave/rejoin cycle; skipped (False) if the peer is down or already cycling:
        two overlapping cycles would start two peers with one identity."""
        sim_peer = self.peers[event.peer_index]
        if not sim_peer.alive or sim_peer.churning or self.finished:
            return False
        sim_peer.churning = True
        try:
            log.info("churn: %s leaves for %.1f s", sim_peer.plan.peer_id, event.downtime_s)
            await self.stop_peer(sim_peer)
            status = sim_peer.status()
            assert sim_peer.peer is not None and status is not None
            self.writer.record_status(status, EVENT_LEAVE)
            await asyncio.sleep(event.downtime_s)
            if self.finished:
                return True  # stays down; its last incarnation holds its final counters
            log.info("churn: %s rejoins", sim_peer.plan.peer_id)
            # Fold the ended incarnation into the carry only now that a new one replaces it.
            sim_peer.carry = add_carry(sim_peer.carry, sim_peer.peer.status())
            self.start(sim_peer, record=True, event=EVENT_JOIN)
            return True
        finally:
            sim_peer.churning = False

    def snapshot(self) -> Snapshot:
        statuses = [st for sp in self.peers if (st := sp.status()) is not None]
        rounds = self.s.rounds
        return {
            "alive": sum(1 for sp in self.peers if sp.alive),
            "rounds": sum(min(st.round, rounds) for st in statuses),
            "sessions": sum(st.sessions_done for st in statuses),
            "accuracy": mean([st.accuracy for st in statuses if st.accuracy is not None]),
            "epsilon": mean([st.epsilon for st in statuses if st.epsilon is not None]),
            "finished": peers_finished(self.s, [st.round >= rounds or st.budget_exhausted
                                                for st in statuses])
            and len(statuses) == len(self.peers),
            "in_session": any(sp.alive and sp.peer is not None and sp.peer.session is not None
                              for sp in self.peers),
        }

    async def record_final(self) -> None:
        """The stop row of every honest peer, with its accuracy on the shared test set."""
        for sim_peer in self.peers:
            if sim_peer.peer is None:
                continue
            accuracy = await asyncio.to_thread(sim_peer.trainer.evaluate, self.prep.test)
            status = sim_peer.status()
            assert status is not None
            self.writer.record_status(status, EVENT_STOP, test_accuracy=float(accuracy),
                                      incarnations=sim_peer.incarnations,
                                      injected_losses=sim_peer.faults.lost)

    def hostile_rows(self) -> list[dict[str, Any]]:
        """What the admitted hostile peers did, as result.json rows."""
        rows = []
        for sim_peer in self.hostile_peers:
            status = sim_peer.status()
            if status is not None:
                rows.append({"kind": sim_peer.plan.hostile_kind, "peer": sim_peer.plan.peer_id,
                             "sessions_done": status.sessions_done, "rounds": status.round})
        return rows

    def fault_counts(self) -> dict[str, int]:
        return {
            "messages_lost": sum(sp.faults.lost for sp in self.peers),
            "messages_delayed": sum(sp.faults.delayed for sp in self.peers),
        }


def _use_worker_threads(peer_count: int) -> None:
    import torch

    torch.set_num_threads(1)  # many peers on few cores: one intra-op thread each
    # Every peer trains, merges and checkpoints in worker threads: give each peer room so that
    # one peer's training never queues another peer's merge.
    asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(
        max_workers=2 * peer_count + 4, thread_name_prefix="murmur-sim"))


async def run_inprocess(prep: Prepared, broker: BrokerSettings, writer: MetricsWriter,
                        stop_requested: asyncio.Event, progress: Progress,
                        net: InProcessNetwork | None = None) -> dict[str, Any]:
    """Run every peer in this event loop until the run ends; the run's outcome. ``net``: a
    network, built or not, for a caller that reads its peers afterwards (an audit)."""
    s = prep.scenario
    _use_worker_threads(len(prep.plans) + len(prep.hostile_plans))
    net = net or InProcessNetwork(prep, broker, writer)
    if not net.peers:
        await asyncio.to_thread(net.build)
    started = time.monotonic()
    for sim_peer in net.peers:
        net.start(sim_peer, record=True)
    for sim_peer in net.hostile_peers:
        net.start(sim_peer, record=False)
    hostile_stop = asyncio.Event()
    hostile_tasks = hostile.start_raw_clients(
        s, broker, [p.peer_id for p in prep.plans], hostile_stop,
        param_count=net.peers[0].trainer.param_count)
    churn = ChurnDriver(scenario_churn(s), started, net.churn_one)
    churn.start()
    stopped_by = await watch(s, started, stop_requested, progress, net.snapshot)
    net.finished = True
    await churn.stop()
    hostile_stop.set()
    await asyncio.gather(*(net.stop_peer(sp) for sp in (*net.peers, *net.hostile_peers)))
    raw_hostile = await hostile.collect_raw_clients(hostile_tasks)
    await net.record_final()
    return {
        "stopped_by": stopped_by,
        "hostile": raw_hostile + net.hostile_rows(),
        "faults": net.fault_counts(),
        "churn_events": churn.completed(),  # completed leave/rejoin cycles
    }
