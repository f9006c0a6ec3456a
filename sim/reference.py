"""The reference engine (``murmur-sim --mode reference``): the same learning, no network.

Every peer is the very trainer a real peer runs (``sim.setup.build_sim_trainer``: DP-SGD,
ledger, accountant, sharing strategy) and every merge is the real merge rule
(``peer.sharing.merge.merge_group_sum`` with the strategy's rule). What is left out is what
does not change what a model learns: MQTT, keys, sealing, Shamir shares and timing. Sessions
follow a seeded random schedule instead: in each round every peer still able to train runs
one local round, then the peers with a fresh update are split at random into groups of
``group_size`` (a remainder of fewer than 3 joins the last groups) and each group does what a
session does:

* the coordinates are the union of the members' top-k index sets; each member contributes its
  values there and its strategy's fill elsewhere (the residual fill);
* every contribution is rounded to the session's fixed point (what Shamir sharing over the
  field carries), the group sum is their sum;
* each member merges the sum with its strategy's merge rule, applies the result and settles
  what the fill lent.

So a recipe (learning rate, clipping, top-k, group size, rounds...) can be swept in minutes;
tests/test_reference.py checks that both engines build the same objects, and
docs/results.md compares their accuracy on the same scenarios.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from crypto.field import FixedPoint
from peer.errors import BudgetExhaustedError
from peer.network.counters import PeerStatus, SessionCounters
from peer.network.session.common import Contribution, dense_contribution, min_contributors
from peer.sharing.merge import MergeRejected, merge_group_sum
from protocol.limits import MAX_MEMBERS, MIN_GROUP_SIZE
from sim.metrics import EVENT_ROUND, EVENT_START, EVENT_STOP, MetricsWriter
from sim.progress import Progress
from sim.reference_group import average_models, group_noise_params, run_group_epoch
from sim.scenario import Scenario
from sim.setup import (
    PeerPlan,
    Prepared,
    build_group_trainer,
    build_sim_trainer,
    group_sigma_eff,
    node_config,
    private_rounds,
)

log = logging.getLogger(__name__)


@dataclass
class ReferencePeer:
    """One peer of the reference engine: its real trainer and what it counted."""

    plan: PeerPlan
    trainer: Any
    counters: SessionCounters = field(default_factory=SessionCounters)
    accuracy: float | None = None
    epsilon: float | None = None
    budget_exhausted: bool = False
    fresh: Any = None  # this round's LocalUpdate, until a group used it
    #: What the member would have sent: g - 1 shares and g - 1 partial sums of one field
    #: element (4 bytes) per session coordinate plus the weight slot; no framing or seals.
    payload_bytes: int = 0

    def status(self) -> PeerStatus:
        return PeerStatus(
            peer_id=self.plan.peer_id, connected=True, accuracy=self.accuracy,
            epsilon=self.epsilon, budget_exhausted=self.budget_exhausted,
            clip_norm=self.trainer.clip_norm,
            bytes_sent=self.payload_bytes, **vars(self.counters))


def schedule_groups(peer_ids: list[str], group_size: int, rng: np.random.Generator,
                    min_size: int = MIN_GROUP_SIZE) -> list[list[str]]:
    """A random split of ``peer_ids`` into groups of ``group_size``; a remainder too small for a
    session (fewer than ``min_size``: the sum invariant's max(3, c + 2)) is spread over the last
    groups, as late invitees would join them. Fewer than ``min_size`` peers: no group."""
    if len(peer_ids) < min_size:
        return []
    order = [peer_ids[i] for i in rng.permutation(len(peer_ids))]
    groups = [order[i:i + group_size] for i in range(0, len(order), group_size)]
    if len(groups[-1]) < min_size and len(groups) > 1:
        for k, peer_id in enumerate(groups.pop()):
            groups[-1 - k % len(groups)].append(peer_id)
    return [g[:MAX_MEMBERS] for g in groups]


def _contribution(peer: ReferencePeer, coords: np.ndarray,
                  fixed_point: FixedPoint) -> tuple[np.ndarray, np.ndarray]:
    """(dense values on ``coords`` as the session would carry them, the fill's coordinates):
    the sessions' own dense vector (common.dense_contribution: own values, the strategy's fill
    elsewhere, both clipped to the encodable range), rounded on the fixed-point grid."""
    update = peer.fresh
    contribution = Contribution(update.indices, update.values, fill=peer.trainer.sharing.fill)
    dense, (filled, _values) = dense_contribution(contribution, coords, fixed_point.max_abs,
                                                  label="reference")
    # Shamir shares carry fixed-point integers: round the same way.
    scale = float(2**fixed_point.frac_bits)
    return np.round(dense * scale) / scale, filled


def run_group(members: list[ReferencePeer], fixed_point: FixedPoint) -> None:
    """One session's effect: group sum, each member's merge, its fill settled."""
    coords = np.unique(np.concatenate([p.fresh.indices for p in members])).astype(np.uint32)
    parts = [_contribution(p, coords, fixed_point) for p in members]
    group_sum = np.sum([dense for dense, _filled in parts], axis=0)
    per_member = 2 * (len(members) - 1) * 4 * (coords.size + 1)
    for peer, (own, filled) in zip(members, parts, strict=True):
        peer.counters.sessions_done += 1
        peer.payload_bytes += per_member
        peer.fresh = None  # shared: as in the node, the next session needs a new update
        if filled.size:
            mask = np.isin(coords, filled)
            peer.trainer.sharing.settle(filled, own[mask].astype(np.float32))
        try:
            merged = merge_group_sum(coords, group_sum, own, len(members), 0,
                                     peer.trainer.sharing.merge)
        except MergeRejected as exc:
            peer.counters.count_rejected_merge(exc.reason)
            continue
        peer.trainer.apply_update(merged.indices, merged.values)
        peer.counters.merges_applied += 1


def _train(peer: ReferencePeer, evaluate: bool) -> None:
    try:
        update = peer.trainer.train_round()
    except BudgetExhaustedError:
        peer.budget_exhausted = True
        peer.fresh = None
        return
    peer.fresh = update
    peer.counters.round += 1
    peer.epsilon = float(update.epsilon)
    if evaluate:
        peer.accuracy = float(peer.trainer.evaluate())


@dataclass
class ReferenceNetwork:
    """All peers of a scenario, advanced one synchronous round at a time."""

    scenario: Scenario
    peers: list[ReferencePeer]
    rng: np.random.Generator
    fixed_point: FixedPoint

    @classmethod
    def build(cls, prep: Prepared) -> ReferenceNetwork:
        s = prep.scenario
        if prep.hostile_plans:
            log.warning("reference engine: hostile peers need a network; ignored")
        if s.noise == "group":
            sigma_eff = group_sigma_eff(s, prep.plans)
            log.info("group noise: sigma_eff %.4f for every peer (h = %d, c = %d)", sigma_eff,
                     s.honest_min, s.max_colluders)
            peers = [ReferencePeer(plan, build_group_trainer(s, prep.model_name, plan,
                                                             sigma_eff))
                     for plan in prep.plans]
        else:
            peers = [ReferencePeer(plan, build_sim_trainer(s, prep.model_name, plan))
                     for plan in prep.plans]
        # The schedule has its own stream: the scenario seed, never the trainers' noise.
        rng = np.random.default_rng([s.seed, 0x5EED])
        return cls(s, peers, rng, node_config(s).fixed_point)

    def step(self, evaluate: bool) -> None:
        """One round: every peer that can trains once, then the groups meet (with group
        noise: the groups meet and train together, :meth:`group_step`)."""
        if self.scenario.noise == "group":
            self.group_step(evaluate)
            return
        for peer in self.peers:
            if not peer.budget_exhausted and peer.counters.round < self.scenario.rounds:
                _train(peer, evaluate)
        ready = {p.plan.peer_id: p for p in self.peers if p.fresh is not None}
        for group in schedule_groups(sorted(ready), self.scenario.group_size, self.rng,
                                     min_contributors(self.scenario.max_colluders)):
            run_group([ready[peer_id] for peer_id in group], self.fixed_point)

    def group_step(self, evaluate: bool) -> None:
        """One round of group noise: each group averages, then runs one lockstep epoch of
        group releases (only averages in the averaging tail)."""
        s = self.scenario
        ready = {p.plan.peer_id: p for p in self.peers
                 if not p.budget_exhausted and p.counters.round < s.rounds}
        private = min(ready.values(), key=lambda p: p.counters.round, default=None)
        in_tail = private is None or private.counters.round >= private_rounds(s)
        least = max(min_contributors(s.max_colluders), s.honest_min + s.max_colluders)
        for group in schedule_groups(sorted(ready), s.group_size, self.rng, least):
            members = [ready[peer_id] for peer_id in group]
            average_models(members)
            if not in_tail:
                run_group_epoch(members, group_noise_params(s, members[0].trainer),
                                s.local_steps)
        for peer in ready.values():
            peer.counters.round += 1
            peer.epsilon = peer.trainer.epsilon
            if evaluate:
                peer.accuracy = float(peer.trainer.evaluate())

    def finished(self) -> bool:
        return all(p.budget_exhausted or p.counters.round >= self.scenario.rounds
                   for p in self.peers)

    def snapshot(self) -> dict[str, Any]:
        accuracies = [p.accuracy for p in self.peers if p.accuracy is not None]
        epsilons = [p.epsilon for p in self.peers if p.epsilon is not None]
        return {
            "alive": len(self.peers),
            "rounds": sum(min(p.counters.round, self.scenario.rounds) for p in self.peers),
            "sessions": sum(p.counters.sessions_done for p in self.peers),
            "accuracy": float(np.mean(accuracies)) if accuracies else None,
            "epsilon": float(np.mean(epsilons)) if epsilons else None,
        }


async def run_reference(prep: Prepared, writer: MetricsWriter, stop_requested: asyncio.Event,
                        progress: Progress) -> dict[str, Any]:
    """Run the scenario's rounds network-free; the same outcome shape as the network engines."""
    s = prep.scenario
    net = await asyncio.to_thread(ReferenceNetwork.build, prep)
    for peer in net.peers:
        writer.record_status(peer.status(), EVENT_START)
    started = time.monotonic()
    stopped_by = "rounds"
    evaluate_every = max(1, math.ceil(s.rounds / 10))  # the hold-out curve, ten points
    round_index = 0
    while not net.finished():
        if stop_requested.is_set():
            stopped_by = "interrupt"
            break
        if time.monotonic() - started >= s.duration_s:
            stopped_by = "duration"
            break
        round_index += 1
        await asyncio.to_thread(net.step, round_index % evaluate_every == 0)
        for peer in net.peers:
            writer.record_status(peer.status(), EVENT_ROUND)
        snap = net.snapshot()
        progress.update(snap["rounds"], alive=snap["alive"], sessions=snap["sessions"],
                        accuracy=snap["accuracy"], epsilon=snap["epsilon"])
    for peer in net.peers:
        accuracy = await asyncio.to_thread(peer.trainer.evaluate, prep.test)
        writer.record_status(peer.status(), EVENT_STOP, test_accuracy=float(accuracy),
                             incarnations=1, injected_losses=0)
    return {"stopped_by": stopped_by, "hostile": [], "faults": {}, "churn_events": 0}
