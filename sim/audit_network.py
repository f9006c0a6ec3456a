"""The one-run audit on the network engine: canaries in one peer of a real in-process run.

The peers are real ``Peer`` objects (sim/inprocess.py: the embedded or a managed broker, real
Shamir sessions, real sealing), built by the one builder (peer/assembly.py through
sim/setup.py); the target peer's trainer alone carries an audit hook, the same Dirac gradient
canaries as the reference-engine audit (:class:`sim.audit.GradientCanaries`): included with
a fair coin, Poisson-sampled at the target's q at every private step, added to its clipped sum
before the noise (local noise) or to its share before rounding (group noise).

Scored from two adversary views: ``own`` (the target's final model) and ``other`` (another
peer's final model), each minus the common initial model. The ``released`` view of the
reference audit needs the target's private outputs one by one; on the network they leave as
top-k updates and group sums, which this audit does not intercept. A weakened run
(``noise_scale`` below 1) gives every peer the same weakened noise through its hook, as the
reference audit does, to show the audit can fail on real sessions too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from sim.audit import (
    AuditOutcome,
    AuditSpec,
    GradientCanaries,
    quiet_coordinates,
    weakening_hook,
)
from sim.audit_bound import audit_scores
from sim.scenario import Scenario

__all__ = ["NETWORK_VIEWS", "run_network_audit"]

NETWORK_VIEWS = ("own", "other")


def run_network_audit(scenario: Scenario, spec: AuditSpec,
                      rng: np.random.Generator | None = None,
                      round_pause_s: float | None = None) -> AuditOutcome:
    """Run ``scenario`` once on the in-process engine with gradient canaries in peer
    ``spec.target``; the bound from each of :data:`NETWORK_VIEWS`. ``round_pause_s``: the
    peers' pause between rounds (None: the simulation's; tests shorten it)."""
    if spec.canary != "gradient":
        raise ValueError("the network audit runs gradient canaries only")
    return asyncio.run(_audit(dataclasses.replace(scenario, mode="inprocess"), spec,
                              rng or np.random.default_rng(), round_pause_s))


async def _audit(scenario: Scenario, spec: AuditSpec, rng: np.random.Generator,
                 round_pause_s: float | None) -> AuditOutcome:
    from peer import assembly
    from sim.broker_lifecycle import open_broker
    from sim.inprocess import InProcessNetwork, run_inprocess
    from sim.metrics import MetricsWriter
    from sim.progress import Progress
    from sim.setup import prepare, trainer_config

    started = time.monotonic()
    included = rng.random(spec.m) < 0.5
    with tempfile.TemporaryDirectory(prefix="murmur-audit-net-") as tmp:
        prep = await asyncio.to_thread(prepare, scenario, Path(tmp))
        if round_pause_s is not None:
            prep.round_pause_s = round_pause_s
        plan = prep.plans[spec.target]
        # A trainer of the same seeded model, only to choose the canaries' coordinates and
        # read the common initial model; never part of the run.
        probe = assembly.build_trainer(trainer_config(scenario, prep.model_name), plan.train,
                                       plan.holdout, None)
        if spec.m > probe.param_count:
            raise ValueError(f"{spec.m} gradient canaries, but the model has "
                             f"{probe.param_count} coordinates")
        initial = probe.parameter_vector().astype(np.float64)
        hook = GradientCanaries(quiet_coordinates(probe, plan.train, spec.m, rng), included,
                                scenario.max_grad_norm, spec.noise_scale, rng)
        hooks = {index: weakening_hook(spec.noise_scale) for index in range(len(prep.plans))
                 } if spec.noise_scale != 1.0 else {}
        hooks[spec.target] = hook
        writer = MetricsWriter(Path(tmp))
        try:
            async with open_broker(scenario) as broker:
                net = InProcessNetwork(prep, broker, writer, audits=hooks)
                await asyncio.to_thread(net.build)
                target = net.peers[spec.target].trainer
                hook.sample_rate = target.sample_rate
                await run_inprocess(prep, broker, writer, asyncio.Event(),
                                    Progress(scenario.peers * scenario.rounds, False), net)
        finally:
            writer.close()
        other = net.peers[(spec.target + 1) % len(net.peers)].trainer
        views = {"own": hook.scores(target.parameter_vector() - initial),
                 "other": hook.scores(other.parameter_vector() - initial)}
        ledger = target.ledger
        segments = tuple((float(s), float(q), int(n)) for s, q, n in ledger.segments)
        results = {view: audit_scores(scores, included, scenario.delta, spec.confidence)
                   for view, scores in views.items()}
        claimed = float(ledger.epsilon)
    return AuditOutcome(claimed, scenario.delta, spec.m, int(included.sum()), results,
                        hook.sampled_total, time.monotonic() - started, segments)
