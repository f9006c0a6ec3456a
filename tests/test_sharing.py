"""Sharing strategies: the registry, what each shares, the fill it lends and the rule it pairs."""

from __future__ import annotations

import numpy as np
import pytest

from peer.sharing import (
    DEFAULT_STRATEGY,
    STRATEGIES,
    DeltaSharing,
    DisplacementSharing,
    SharingStrategy,
    build_strategy,
    strategy_class,
)
from peer.sharing.merge import GOSSIP_AVERAGING
from peer.training.config import TrainerConfig

N = 50


def test_registry_names_the_two_strategies_and_the_default_is_averaging() -> None:
    assert {"model": DisplacementSharing, "delta": DeltaSharing} == STRATEGIES
    assert TrainerConfig().share == DEFAULT_STRATEGY
    assert DEFAULT_STRATEGY == "model"
    assert all(issubclass(cls, SharingStrategy) for cls in STRATEGIES.values())
    with pytest.raises(ValueError, match="share must be one of"):
        strategy_class("gradients")


def test_each_strategy_pairs_with_its_merge_rule() -> None:
    assert DisplacementSharing.merge == GOSSIP_AVERAGING
    assert DisplacementSharing.merge.rule == "group_average"
    assert DeltaSharing.merge.rule == "others_mean"
    assert DisplacementSharing.needs_common_init and not DeltaSharing.needs_common_init


def test_displacement_shares_top_k_of_the_displacement_and_lends_the_rest() -> None:
    strategy = build_strategy("model", 0.1, N)
    rng = np.random.default_rng(1)
    displacement = rng.normal(size=N).astype(np.float32)
    indices, values = strategy.after_round(rng.normal(size=N).astype(np.float32), displacement)
    assert indices.size == 5
    np.testing.assert_array_equal(values, displacement[indices])
    outside = np.setdiff1d(np.arange(N), indices)
    assert np.abs(displacement[outside]).max() <= np.abs(values).min()
    np.testing.assert_array_equal(strategy.fill(outside), displacement[outside])
    strategy.settle(outside, displacement[outside])  # the model still holds it: nothing removed
    np.testing.assert_array_equal(strategy.fill(outside), displacement[outside])
    assert strategy.model_id("mlp-50", "abcd1234") == "mlp-50-avg-abcd1234"


def test_delta_keeps_what_top_k_held_back_and_settles_what_was_lent() -> None:
    strategy = build_strategy("delta", 0.1, N)
    delta = np.arange(N, dtype=np.float32) - 25.0
    indices, values = strategy.after_round(delta, np.zeros(N, dtype=np.float32))
    kept = strategy.state
    np.testing.assert_array_equal(kept[indices], 0.0)
    np.testing.assert_array_equal(values + kept[indices], delta[indices])
    outside = np.setdiff1d(np.arange(N), indices)[:3]
    lent = strategy.fill(outside)
    np.testing.assert_array_equal(lent, delta[outside])
    strategy.settle(outside, lent)
    np.testing.assert_array_equal(strategy.fill(outside), 0.0)
    assert strategy.model_id("mlp-50", "abcd1234") == "mlp-50"
    with pytest.raises(ValueError, match="no averaging-only rounds"):
        strategy.reshare(delta)


def test_state_round_trips_and_bad_input_is_refused() -> None:
    strategy = build_strategy("delta", 0.5, N)
    state = np.linspace(-1, 1, N).astype(np.float32)
    strategy.restore(state)
    np.testing.assert_array_equal(strategy.state, state)
    with pytest.raises(ValueError, match="shape"):
        strategy.restore(np.zeros(N + 1, dtype=np.float32))
    with pytest.raises(ValueError, match="out of range"):
        strategy.fill(np.array([N]))
    with pytest.raises(ValueError, match="finite"):
        strategy.settle(np.array([0]), np.array([np.inf], dtype=np.float32))
    with pytest.raises(ValueError, match="top-k fraction"):
        build_strategy("model", 0.0, N)


def test_averaging_tail_needs_a_strategy_that_averages() -> None:
    TrainerConfig(share="model", averaging_rounds=2, planned_rounds=10, dp=False).validate()
    with pytest.raises(ValueError, match="averaging_rounds needs"):
        TrainerConfig(share="delta", averaging_rounds=2, planned_rounds=10, dp=False).validate()
