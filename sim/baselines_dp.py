"""The DP baselines of sim.baselines: Murmur's own DP-SGD trainer (LocalTrainer) with the
peers' recipe and secure noise, "standalone_dp" (each peer alone on its shard) and
"centralized_dp" (the pooled shards with the network's total private compute, at the same ε).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from sim.baselines_plain import LabelledData
from sim.scenario import Scenario, resolve_model

log = logging.getLogger(__name__)


def _dataset(x: np.ndarray, y: np.ndarray, num_classes: int, name: str) -> Any:
    from peer.training.data import Dataset

    return Dataset(x=x, y=y, num_classes=num_classes, name=name)


def _train_private(config: Any, train: Any, test: Any, rounds: int) -> tuple[Any, int]:
    """`rounds` rounds of the real LocalTrainer (no state directory, nothing merged); returns
    the trainer and the private steps it took. A round the ledger refuses ends training, as it
    ends a peer's (it cannot happen when σ was calibrated for these steps)."""
    from peer.training.trainer import BudgetExhaustedError, LocalTrainer

    trainer = LocalTrainer(config, train, test)
    if trainer.config.insecure_fast_noise:  # never: the baselines use the real noise
        raise ValueError("DP baselines must use the secure noise")
    steps = 0
    for _ in range(rounds):
        try:
            update = trainer.train_round()
        except BudgetExhaustedError:
            log.warning("DP baseline stopped after %d steps: budget spent", steps)
            break
        steps += update.steps
    return trainer, steps


def _eps_label(epsilon: float) -> str:
    return f"{epsilon:g}" if epsilon == round(epsilon, 2) else f"{epsilon:.2f}"


def dp_baselines(
    scenario: Scenario,
    train: LabelledData,
    test: LabelledData,
    partitions: Sequence[np.ndarray],
) -> dict[str, dict[str, Any]]:
    """{"centralized_dp": {...}, "standalone_dp": {...}} at the network's ε (its target, or
    with σ fixed instead, what a peer of it spends); see sim.baselines."""
    from sim.setup import trainer_config

    model_name = resolve_model(scenario.model, tuple(train.x.shape[1:]))
    # Exactly what a peer of the network trains with (model, initial weights, lr, momentum,
    # batch size, clipping, δ, ε target, rounds and averaging tail), secure noise.
    peer_config = dataclasses.replace(trainer_config(scenario, model_name),
                                      insecure_fast_noise=False, checkpoint_every_round=False)
    training_rounds = peer_config.planned_rounds - peer_config.averaging_rounds
    test_set = _dataset(test.x, test.y, test.num_classes, "test")

    standalone = _standalone_dp(peer_config, train, test_set, partitions, training_rounds)
    # The same ε as the network: its target, or (σ fixed instead) what a peer spends.
    target = (scenario.target_epsilon if scenario.target_epsilon is not None
              else max(standalone["per_peer_epsilon"]))
    central = _centralized_dp(peer_config, train, test_set, partitions, training_rounds, target)

    eps = _eps_label(target)
    recipe = (f"Murmur DP-SGD (lr {peer_config.lr:g}, momentum {peer_config.momentum:g}, "
              f"batch {peer_config.batch_size}, C = {peer_config.max_grad_norm:g}, "
              f"δ = {peer_config.delta:g})")
    per_peer_steps = training_rounds * peer_config.local_steps
    common = {"model": model_name, "target_epsilon": float(target), "delta": peer_config.delta}
    return {
        "centralized_dp": _centralized_dp_entry(central, peer_config, common, eps, recipe),
        "standalone_dp": _standalone_dp_entry(standalone, common, eps, recipe, per_peer_steps),
    }


def _standalone_dp(
    peer_config: Any,
    train: LabelledData,
    test_set: Any,
    partitions: Sequence[np.ndarray],
    training_rounds: int,
) -> dict[str, Any]:
    """Each peer alone on its shard with exactly its network trainer config."""
    started = time.perf_counter()
    per_peer: list[float] = []
    per_peer_epsilon: list[float] = []
    sigmas: list[float] = []
    rates: list[float] = []
    standalone_steps: list[int] = []
    for i, indices in enumerate(partitions):
        indices = np.asarray(indices, dtype=np.int64)
        shard = _dataset(train.x[indices], train.y[indices], train.num_classes, f"peer{i}")
        trainer, steps = _train_private(peer_config, shard, test_set, training_rounds)
        per_peer.append(trainer.evaluate(test_set))
        per_peer_epsilon.append(float(trainer.ledger.epsilon))
        sigmas.append(float(trainer.sigma))
        rates.append(float(trainer.sample_rate))
        standalone_steps.append(steps)
    return {
        "per_peer": per_peer,
        "per_peer_epsilon": per_peer_epsilon,
        "sigmas": sigmas,
        "rates": rates,
        "steps": standalone_steps,
        "seconds": time.perf_counter() - started,
    }


def _centralized_dp(
    peer_config: Any,
    train: LabelledData,
    test_set: Any,
    partitions: Sequence[np.ndarray],
    training_rounds: int,
    target: float,
) -> dict[str, Any]:
    """One trainer on the pooled shards with the network's total private compute."""
    per_peer_steps = training_rounds * peer_config.local_steps
    total_steps = per_peer_steps * len(partitions)
    started = time.perf_counter()
    pooled = np.concatenate([np.asarray(p, dtype=np.int64) for p in partitions])
    pooled_set = _dataset(train.x[pooled], train.y[pooled], train.num_classes, "pooled")
    # One round per network round, each with all peers' steps of that round: σ is calibrated
    # by the trainer (sigma_for) for q = batch / N_pooled over the network's total steps.
    central_config = dataclasses.replace(
        peer_config,
        local_steps=peer_config.local_steps * len(partitions),
        planned_rounds=training_rounds,
        averaging_rounds=0,
        planned_steps=total_steps,
        noise_multiplier=None,
        target_epsilon=target,
        budget_epsilon=target,
    )
    central, central_steps = _train_private(central_config, pooled_set, test_set,
                                            training_rounds)
    central_accuracy = central.evaluate(test_set)
    return {
        "trainer": central,
        "steps": central_steps,
        "accuracy": central_accuracy,
        "n_pooled": len(pooled),
        "seconds": time.perf_counter() - started,
    }


def _centralized_dp_entry(
    run: dict[str, Any], peer_config: Any, common: dict[str, Any], eps: str, recipe: str
) -> dict[str, Any]:
    central = run["trainer"]
    central_steps = run["steps"]
    n_pooled = run["n_pooled"]
    return {
        "accuracy": run["accuracy"],
        "steps": central_steps,
        "epochs": central_steps * peer_config.batch_size / n_pooled,
        "seconds": run["seconds"],
        "model": common["model"],
        "epsilon": float(central.ledger.epsilon),
        "target_epsilon": common["target_epsilon"],
        "delta": common["delta"],
        "sigma": float(central.sigma),
        "sample_rate": float(central.sample_rate),
        "label": f"centralized, DP eps={eps} (Murmur DP-SGD, pooled data)",
        "description": (
            f"all {n_pooled} training examples pooled, {recipe}, the network's "
            f"{central_steps} private steps in total at q = {central.sample_rate:.4f}, "
            f"σ = {central.sigma:.2f}, ε spent {central.ledger.epsilon:.2f}; test set"),
    }


def _standalone_dp_entry(
    run: dict[str, Any], common: dict[str, Any], eps: str, recipe: str, per_peer_steps: int
) -> dict[str, Any]:
    per_peer = run["per_peer"]
    per_peer_epsilon = run["per_peer_epsilon"]
    sigmas = run["sigmas"]
    return {
        "accuracy": float(np.mean(per_peer)),
        "accuracy_min": float(np.min(per_peer)),
        "accuracy_max": float(np.max(per_peer)),
        "per_peer": per_peer,
        "steps": int(np.mean(run["steps"])),
        "seconds": run["seconds"],
        "model": common["model"],
        "epsilon": float(max(per_peer_epsilon)),
        "target_epsilon": common["target_epsilon"],
        "delta": common["delta"],
        "sigma": float(np.mean(sigmas)),
        "sample_rate": float(np.mean(run["rates"])),
        "label": f"each peer alone, DP eps={eps}",
        "description": (
            f"each peer alone on its shard with its network trainer config, {recipe}, "
            f"{per_peer_steps} private steps, σ = {min(sigmas):.2f}–{max(sigmas):.2f}, "
            f"max ε spent {max(per_peer_epsilon):.2f}, no merges; test set"),
    }
