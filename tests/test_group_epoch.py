"""Group noise with real trainers: the ledger, the epoch's steps and the reference engine.

docs/privacy.md ("Group noise"): every step of an epoch is charged to the ledger, on disk,
before any share exists; the ledger's epsilon is the library accountant's for the recorded
(sigma_eff, q, steps); a release needs h + c contributors; modes never mix.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from crypto.field import PRIME
from peer.training.block_ledger import BlockLedgers
from peer.training.data import Dataset, load_digits
from peer.training.group_noise import GroupNoise, decode_sum, to_field
from peer.training.ledger import BudgetExhaustedError
from peer.training.privacy.accountant import epsilon
from peer.training.trainer import LocalTrainer, TrainerConfig
from sim.reference import ReferencePeer
from sim.reference_group import run_group_epoch
from sim.scenario import Scenario, ScenarioError
from sim.setup import PeerPlan

SIGMA_EFF = 1.2


def _digits(n: int, seed: int) -> Dataset:
    data = load_digits()
    pick = np.random.default_rng(seed).choice(len(data), n, replace=False)
    return data.subset(pick)


def _config(**changes: object) -> TrainerConfig:
    base = TrainerConfig(model="mlp", noise="group", honest_min=3, noise_multiplier=SIGMA_EFF,
                         batch_size=16, local_steps=4, lr=0.3, momentum=0.0, seed=7)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def _params(trainer: LocalTrainer, c: int = 1) -> GroupNoise:
    return GroupNoise(honest_min=3, max_colluders=c, frac_bits=16, max_grad_norm=1.0,
                      dim=trainer.param_count)


def test_an_epoch_is_charged_to_the_ledger_on_disk_before_its_first_share(
        tmp_path: Path) -> None:
    train = _digits(160, seed=1)
    trainer = LocalTrainer(_config(), train, _digits(20, seed=2), state_dir=tmp_path)
    epoch = trainer.begin_group_epoch(_params(trainer), steps=6)
    on_disk = BlockLedgers.load(trainer.ledger_path, len(train))
    assert on_disk.steps == 6  # before any share was made
    q = 16 / len(train)
    assert trainer.epsilon == pytest.approx(epsilon(6, SIGMA_EFF, q, 1e-5), abs=1e-9)
    shares = [epoch.share() for _ in range(6)]
    assert all(s.dtype == np.int64 and s.size == trainer.param_count for s in shares)
    with pytest.raises(ValueError, match="used up"):
        epoch.share()
    assert BlockLedgers.load(trainer.ledger_path, len(train)).steps == 6


def test_a_released_gradient_is_what_moves_the_model_and_nothing_else() -> None:
    trainer = LocalTrainer(_config(), _digits(120, seed=3), _digits(20, seed=4))
    epoch = trainer.begin_group_epoch(_params(trainer), steps=2)
    before = trainer.parameter_vector()
    epoch.share()  # a share alone changes nothing
    np.testing.assert_array_equal(trainer.parameter_vector(), before)
    gradient = np.linspace(-1, 1, trainer.param_count).astype(np.float32)
    epoch.apply(gradient)
    np.testing.assert_allclose(trainer.parameter_vector(), before - 0.3 * gradient, atol=1e-6)
    with pytest.raises(ValueError, match="finite"):
        epoch.apply(np.full(trainer.param_count, np.nan, dtype=np.float32))


def test_a_sum_of_shares_decodes_to_the_clipped_gradients_plus_group_noise() -> None:
    # Three members at the same model: the decoded sum is near the plain clipped sum, and its
    # noise has the variance of one Gaussian at sigma (m / h = 1 here).
    trainers = [LocalTrainer(_config(batch_size=40), _digits(40, seed=s), _digits(10, seed=9))
                for s in (11, 12, 13)]
    params = _params(trainers[0])
    epochs = [t.begin_group_epoch(params, steps=1) for t in trainers]  # q = 1: whole sets
    total = np.zeros(params.dim, dtype=np.int64)
    for epoch in epochs:
        total = (total + to_field(epoch.share()).astype(np.int64)) % PRIME
    released = decode_sum(total, params.scale)
    clean = sum(e.dp_step.engine.clipped_sum(e.x, e.y, 1.0).flat_sum.double().numpy()
                for e in epochs)
    sigma = params.sigma_for_effective(SIGMA_EFF)
    residual = released - clean
    assert residual.std() == pytest.approx(sigma, rel=0.1)  # ~4.8k coordinates


def test_group_mode_refuses_local_rounds_and_carries_its_parameters_in_the_model_id() -> None:
    train, holdout = _digits(80, seed=5), _digits(10, seed=6)
    group = LocalTrainer(_config(), train, holdout)
    local = LocalTrainer(_config(noise="local"), train, holdout)
    assert group.model_id != local.model_id
    assert "group-h3" in group.model_id and f"s{SIGMA_EFF:g}" in group.model_id
    with pytest.raises(ValueError, match="group releases"):
        group.train_round()
    with pytest.raises(ValueError, match="noise = 'group'"):
        local.begin_group_epoch(_params(local), steps=1)
    with pytest.raises(ValueError, match="noise_multiplier"):
        _config(noise_multiplier=None, target_epsilon=3.0).validate()
    with pytest.raises(ValueError, match="noise must be"):
        _config(noise="loud").validate()


def test_an_epoch_the_budget_cannot_afford_is_refused_before_anything() -> None:
    trainer = LocalTrainer(_config(budget_epsilon=0.5), _digits(80, seed=8), _digits(10, 9))
    with pytest.raises(BudgetExhaustedError):
        trainer.begin_group_epoch(_params(trainer), steps=500)
    assert trainer.epsilon == 0.0


def _reference_peer(index: int, train: Dataset, holdout: Dataset) -> ReferencePeer:
    plan = PeerPlan(index, f"p{index}", None, None,  # type: ignore[arg-type]
                    np.arange(1), train, holdout, Path("."))
    return ReferencePeer(plan, LocalTrainer(_config(), train, holdout))


def test_a_release_below_h_plus_c_contributors_applies_nothing() -> None:
    peers = [_reference_peer(i, _digits(60, seed=20 + i), _digits(10, 30)) for i in range(3)]
    trainers = [peer.trainer for peer in peers]
    params = _params(trainers[0], c=1)  # h + c = 4 > 3 members
    before = [t.parameter_vector() for t in trainers]
    assert run_group_epoch(peers, params, steps=2) == 0
    for trainer, vector in zip(trainers, before, strict=True):
        np.testing.assert_array_equal(trainer.parameter_vector(), vector)
    enough = _params(trainers[0], c=0)  # h + c = 3
    assert run_group_epoch(peers, enough, steps=2) == 2
    after = [t.parameter_vector() for t in trainers]
    assert not np.array_equal(after[0], before[0])
    # no averaging here: every member applied the same released gradients, so all moved alike
    moves = [a - b for a, b in zip(after, before, strict=True)]
    np.testing.assert_allclose(moves[0], moves[1], atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(moves[1]), torch.from_numpy(moves[2]))


def test_group_noise_runs_in_every_engine_and_refuses_groups_below_h_plus_c() -> None:
    for mode in ("inprocess", "processes", "reference"):
        assert Scenario(noise="group", mode=mode).honest_min == 3
    with pytest.raises(ScenarioError, match="honest_min"):
        Scenario(noise="group", honest_min=5, group_size=5)
    with pytest.raises(ScenarioError, match="dp = true"):
        Scenario(noise="group", dp=False, target_epsilon=None)
