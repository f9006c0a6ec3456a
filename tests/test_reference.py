"""The reference engine runs the real peers' learning code, and it learns."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from peer.network.transport import BrokerSettings
from peer.training.trainer import LocalTrainer
from sim.faults import FaultStats
from sim.reference import ReferenceNetwork, schedule_groups
from sim.runner import run_simulation
from sim.scenario import Scenario
from sim.setup import build_sim_peer, build_sim_trainer, prepare, trainer_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_both_engines_build_the_same_trainer_strategy_and_merge_rule(tmp_path: Path) -> None:
    scenario = Scenario(peers=4, rounds=6, out_dir=tmp_path)
    prep = prepare(scenario, tmp_path)
    reference = ReferenceNetwork.build(prep)
    plan = prep.plans[0]
    network_peer = build_sim_peer(
        scenario, plan, build_sim_trainer(scenario, prep.model_name, plan),
        admission_public_key=prep.admission.public_key,
        broker=BrokerSettings(url="mqtt://127.0.0.1:1"), round_pause_s=0.0,
        fault_rng=random.Random(0), fault_stats=FaultStats(), on_event=None)
    ours, theirs = reference.peers[0].trainer, network_peer.trainer
    assert type(ours) is type(theirs) is LocalTrainer
    assert ours.config == theirs.config == trainer_config(scenario, prep.model_name)
    assert type(ours.sharing) is type(theirs.sharing)
    assert ours.sharing.merge == theirs.sharing.merge == network_peer.config.merge
    assert ours.model_id == theirs.model_id  # same initial weights: they could group
    assert reference.fixed_point == network_peer.config.fixed_point


def test_schedule_covers_every_ready_peer_in_groups_a_session_allows() -> None:
    rng = np.random.default_rng(3)
    ids = [f"p{i:02d}" for i in range(11)]
    for _ in range(20):
        groups = schedule_groups(ids, 5, rng)
        assert sorted(p for g in groups for p in g) == ids
        assert all(3 <= len(g) <= 7 for g in groups)
    assert schedule_groups(ids[:2], 5, rng) == []
    for _ in range(20):  # with c = 2 a group holds at least 4 (the sum invariant)
        groups = schedule_groups(ids[:9], 5, rng, min_size=4)
        assert sorted(p for g in groups for p in g) == ids[:9]
        assert all(len(g) >= 4 for g in groups)
    assert schedule_groups(ids[:3], 5, rng, min_size=4) == []


async def test_reference_run_learns_and_spends_the_budget(tmp_path: Path) -> None:
    scenario = Scenario(peers=4, rounds=8, local_steps=5, mode="reference", out_dir=tmp_path)
    result = await run_simulation(scenario, progress=False, baselines=False)
    summary = result.summary
    assert result.stopped_by == "rounds"
    assert summary.sessions_done > 0
    # DP at eps 3 on ~250 examples a peer: measured 55-70 % here; chance is 10 %.
    assert summary.mean_accuracy is not None and summary.mean_accuracy > 0.35
    assert summary.max_epsilon == pytest.approx(3.0, abs=0.05)


async def test_reference_run_without_dp_learns_well(tmp_path: Path) -> None:
    scenario = Scenario(peers=4, rounds=8, local_steps=5, dp=False, mode="reference",
                        out_dir=tmp_path)
    result = await run_simulation(scenario, progress=False, baselines=False)
    assert result.summary.mean_accuracy is not None and result.summary.mean_accuracy > 0.7
