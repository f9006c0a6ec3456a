"""The DP baselines (sim/baselines.py): Murmur's own DP-SGD on the pooled data and on each
peer's shard alone, beside the no-DP references, on a small digits scenario."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from sim.baselines import DP_KEYS, NO_DP_KEYS, compute_baselines
from sim.runner import baseline_inputs
from sim.scenario import Scenario
from sim.setup import prepare, trainer_config

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")

PEERS, ROUNDS, LOCAL_STEPS, BATCH = 4, 6, 5, 16


def _scenario(tmp_path: Path, **changes: Any) -> Scenario:
    base: dict[str, Any] = dict(peers=PEERS, dataset="digits", rounds=ROUNDS,
                                local_steps=LOCAL_STEPS, batch_size=BATCH, seed=2,
                                out_dir=tmp_path)
    base.update(changes)
    return Scenario(**base)


def _inputs(scenario: Scenario, tmp_path: Path) -> tuple[Any, Any, list[Any]]:
    prep = prepare(scenario, tmp_path / "run")
    pooled, parts = baseline_inputs(prep)
    return pooled, prep.test, parts


def test_dp_baselines_exist_with_dp_and_keep_the_epsilon(tmp_path: Path) -> None:
    scenario = _scenario(tmp_path, dp=True, target_epsilon=3.0)
    pooled, test, parts = _inputs(scenario, tmp_path)
    result = compute_baselines(scenario, pooled, test, parts)

    assert set(result) == {*NO_DP_KEYS, *DP_KEYS}
    central, alone = result["centralized_dp"], result["standalone_dp"]
    for entry in (central, alone):
        assert 0.0 < entry["accuracy"] <= 1.0
        assert entry["target_epsilon"] == 3.0
        assert entry["seconds"] > 0
    # Centralized with DP: the network's total private steps, at the pooled sample rate,
    # with sigma calibrated so that they spend at most the target.
    tail = trainer_config(scenario, "mlp").averaging_rounds  # no private step in the tail
    assert tail > 0
    private_steps = (ROUNDS - tail) * LOCAL_STEPS
    assert central["steps"] == PEERS * private_steps
    assert central["sample_rate"] == pytest.approx(BATCH / len(pooled.y))
    assert 0.0 < central["epsilon"] <= 3.0
    assert central["epsilon"] > 2.5  # calibrated to the target, not far below it
    assert central["sigma"] > 0
    # Each peer alone with DP: a peer's own private steps and budget.
    assert alone["steps"] == private_steps
    assert len(alone["per_peer"]) == PEERS
    assert alone["accuracy_min"] <= alone["accuracy"] <= alone["accuracy_max"]
    assert 0.0 < alone["epsilon"] <= 3.0
    # Labels say what each row is; the no-DP ones keep their keys and say "no DP".
    assert central["label"] == "centralized, DP eps=3 (Murmur DP-SGD, pooled data)"
    assert alone["label"] == "each peer alone, DP eps=3"
    assert result["centralized"]["label"] == "centralized, no DP"
    assert result["standalone"]["label"] == "each peer alone, no DP"


def test_no_dp_baselines_without_dp(tmp_path: Path) -> None:
    scenario = _scenario(tmp_path, dp=False)
    pooled, test, parts = _inputs(scenario, tmp_path)
    result = compute_baselines(scenario, pooled, test, parts)
    assert set(result) == set(NO_DP_KEYS)
    assert not set(DP_KEYS) & set(result)
    # A DP scenario can still skip them explicitly.
    dp_scenario = _scenario(tmp_path, dp=True, target_epsilon=3.0)
    assert set(compute_baselines(dp_scenario, pooled, test, parts, dp=False)) == set(NO_DP_KEYS)


def test_dp_baselines_use_the_peers_trainer_config_with_secure_noise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import peer.training.trainer as trainer_module

    configs: list[Any] = []
    original = trainer_module.LocalTrainer.__init__

    def spy(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        configs.append(config)
        original(self, config, *args, **kwargs)

    monkeypatch.setattr(trainer_module.LocalTrainer, "__init__", spy)
    scenario = _scenario(tmp_path, dp=True, target_epsilon=3.0)
    pooled, test, parts = _inputs(scenario, tmp_path)
    compute_baselines(scenario, pooled, test, parts)

    assert len(configs) == PEERS + 1  # one trainer per peer, then the pooled one
    peer_config = dataclasses.replace(trainer_config(scenario, "mlp"),
                                      checkpoint_every_round=False)
    assert all(c == peer_config for c in configs[:PEERS])  # exactly a peer's recipe
    assert all(c.dp and not c.insecure_fast_noise for c in configs)
    central = configs[PEERS]
    assert (central.lr, central.momentum, central.batch_size, central.max_grad_norm,
            central.seed, central.model) == (
        peer_config.lr, peer_config.momentum, peer_config.batch_size,
        peer_config.max_grad_norm, peer_config.seed, peer_config.model)
    assert central.target_epsilon == 3.0 and central.noise_multiplier is None


def test_fixed_noise_multiplier_gives_centralized_dp_the_peers_epsilon(tmp_path: Path) -> None:
    scenario = _scenario(tmp_path, dp=True, target_epsilon=None, noise_multiplier=1.0)
    pooled, test, parts = _inputs(scenario, tmp_path)
    result = compute_baselines(scenario, pooled, test, parts)
    alone, central = result["standalone_dp"], result["centralized_dp"]
    assert alone["sigma"] == pytest.approx(1.0)
    assert central["target_epsilon"] == pytest.approx(alone["epsilon"])
    assert 0.0 < central["epsilon"] <= central["target_epsilon"]
