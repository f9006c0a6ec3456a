"""Reference accuracies for a simulation, trained on the same split with the same per-peer
compute as the network: centralized (all data pooled) and standalone (each peer alone on its
shard), without DP and — when the scenario has DP on — with DP at the same ε.

Compute budget: each simulated peer takes `rounds * local_steps` mini-batch steps of
`batch_size` examples. Unless `epochs_equivalent` is given:
- standalone: every peer takes exactly that many steps on its own shard;
- centralized: one model takes `peers` times that many steps on the pooled shards, i.e. the
  network's whole compute spent in one place.
With `epochs_equivalent = E`, standalone peer i takes ceil(E * n_i / batch) steps and the
centralized model ceil(E * N / batch), i.e. E passes over the data.

The no-DP baselines ("centralized", "standalone") are trained with Adam (lr 1e-3): they are the
upper and lower references, made as strong as the data allows.

The DP baselines ("centralized_dp", "standalone_dp"; only when the scenario has DP on) use
Murmur's own trainer, peer.training.trainer.LocalTrainer, with the peers' own recipe
(sim.setup.trainer_config: model, initial weights, lr, momentum, batch size, clipping norm, δ)
and real DP-SGD: secure noise and Poisson sampling from the OS CSPRNG, never
`insecure_fast_noise`, so their accuracy varies from run to run like the network's.
- standalone_dp: exactly a peer's trainer config on its own shard, nothing merged: the same
  private steps (`(rounds - averaging_rounds) * local_steps`; the averaging tail takes none)
  and the same ε as in the network.
- centralized_dp: one trainer on the pooled shards with the network's total private compute,
  `peers * (rounds - averaging_rounds) * local_steps` steps, at the pooled sample rate
  q = batch / N_pooled; the trainer calibrates σ with `sigma_for` so that those steps spend the
  scenario's target ε (with a fixed noise_multiplier instead: the ε a peer of the network
  spends, i.e. the largest of the standalone_dp peers').

The baselines see only data that the simulation itself holds on this machine — no privacy
property is at stake here. The accuracy reported is on the shared test set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from peer.training.models import build_model, split_frozen
from sim.scenario import Scenario, resolve_model

_EVAL_BATCH = 4096

#: The no-DP baselines (always computed) and the DP ones (only for a DP scenario): the keys of
#: the dict compute_baselines returns and of "baselines" in result.json.
NO_DP_KEYS = ("centralized", "standalone")
DP_KEYS = ("centralized_dp", "standalone_dp")

log = logging.getLogger(__name__)


class LabelledData(Protocol):
    """What the baselines need from peer.training.data.Dataset."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int


def _trainable_view(model: nn.Module, x: np.ndarray) -> tuple[nn.Module, Any]:
    """(what to run, its inputs): a model with a frozen feature prefix ("scatter") runs its
    trainable part on features computed once per image (peer.training.features), as a peer's
    trainer does; any other model runs whole on ``x``."""
    prefix, trainable = split_frozen(model)
    if prefix is None:
        return model, x
    from peer.training.features import cached_features

    return trainable, cached_features(prefix, x)


def _accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    if len(y) == 0:
        raise ValueError("cannot evaluate on an empty test set")
    model.eval()
    net, data = _trainable_view(model, x)
    correct = 0
    with torch.no_grad():
        for start in range(0, len(y), _EVAL_BATCH):
            inputs = torch.as_tensor(data[start:start + _EVAL_BATCH], dtype=torch.float32)
            predictions = net(inputs).argmax(dim=1).numpy()
            correct += int((predictions == y[start:start + _EVAL_BATCH]).sum())
    return correct / len(y)


def train_steps(
    model_name: str,
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    lr: float = 1e-3,
) -> nn.Module:
    """Plain (non-private) Adam training for `steps` mini-batches drawn by reshuffled epochs.

    Model initialisation and batch order depend only on `seed`; the global torch RNG state of
    the caller is restored afterwards.
    """
    if len(y) == 0:
        raise ValueError("cannot train on an empty data set")
    batch_rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(model_name, tuple(x.shape[1:]), num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    net, data = _trainable_view(model, x)
    order = batch_rng.permutation(len(y))
    cursor = 0
    for _ in range(steps):
        if cursor + batch_size > len(order):
            order = batch_rng.permutation(len(y))
            cursor = 0
        batch = order[cursor:cursor + batch_size]
        cursor += batch_size
        inputs = torch.as_tensor(data[batch], dtype=torch.float32)
        targets = torch.as_tensor(y[batch], dtype=torch.int64)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(net(inputs), targets).backward()
        optimizer.step()
    return model


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` (None: left alone), then restored."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def compute_baselines(
    scenario: Scenario,
    train: LabelledData,
    test: LabelledData,
    partitions: Sequence[np.ndarray],
    epochs_equivalent: float | None = None,
    *,
    lr: float = 1e-3,
    torch_threads: int | None = 1,
    dp: bool | None = None,
) -> dict[str, dict[str, Any]]:
    """Centralized and standalone test accuracies for this split (see the module docstring).

    partitions: each peer's training indices into `train` (what that peer trains on).
    torch_threads: intra-op threads while training (restored afterwards). One thread is the
    default because these models are small: on 2 busy cores, 2 threads measured ~20x slower
    than 1 (240 MLP steps: 10.3 s against 0.46 s). None leaves torch's setting alone.
    dp: whether to add the DP baselines; None (the default) follows `scenario.dp`. They always
    take the network's private step budget: `epochs_equivalent` applies to the no-DP ones only
    (the ε target is spent over the steps the trainer plans).
    Returns {"centralized": {...}, "standalone": {...}} and, with DP, also
    {"centralized_dp": {...}, "standalone_dp": {...}}; each has "accuracy", "steps",
    "seconds", "label" and "description"; the standalone ones also "accuracy_min",
    "accuracy_max", "per_peer"; the DP ones "epsilon" (spent), "target_epsilon", "delta",
    "sigma" and "sample_rate".
    """
    if not partitions:
        raise ValueError("need at least one peer partition")
    with_dp = scenario.dp if dp is None else dp
    started = time.perf_counter()
    with _torch_threads(torch_threads):
        result = _compute(scenario, train, test, partitions, epochs_equivalent, lr)
        if with_dp:
            result.update(_compute_dp(scenario, train, test, partitions))
    log.info("baselines trained in %.1f s: %s", time.perf_counter() - started,
             ", ".join(f"{k} {v['seconds']:.1f} s ({v['accuracy']:.1%})"
                       for k, v in result.items()))
    return result


def compute_dp_baselines(
    scenario: Scenario,
    train: LabelledData,
    test: LabelledData,
    partitions: Sequence[np.ndarray],
    *,
    torch_threads: int | None = 1,
) -> dict[str, dict[str, Any]]:
    """Only the DP baselines ("centralized_dp", "standalone_dp") of a DP scenario; arguments
    as for compute_baselines."""
    if not scenario.dp:
        raise ValueError("the DP baselines need a scenario with dp on")
    if not partitions:
        raise ValueError("need at least one peer partition")
    started = time.perf_counter()
    with _torch_threads(torch_threads):
        result = _compute_dp(scenario, train, test, partitions)
    log.info("DP baselines trained in %.1f s", time.perf_counter() - started)
    return result


def _compute(
    scenario: Scenario,
    train: LabelledData,
    test: LabelledData,
    partitions: Sequence[np.ndarray],
    epochs_equivalent: float | None,
    lr: float,
) -> dict[str, dict[str, Any]]:
    if epochs_equivalent is not None and not (epochs_equivalent > 0):
        raise ValueError(f"epochs_equivalent must be > 0, got {epochs_equivalent}")
    batch_size = scenario.batch_size
    model_name = resolve_model(scenario.model, tuple(train.x.shape[1:]))
    per_peer_steps = scenario.rounds * scenario.local_steps
    pooled = np.concatenate([np.asarray(p, dtype=np.int64) for p in partitions])

    def steps_for(n_examples: int, default: int) -> int:
        if epochs_equivalent is None:
            return default
        return max(1, math.ceil(epochs_equivalent * n_examples / batch_size))

    started = time.perf_counter()
    central_steps = steps_for(len(pooled), per_peer_steps * len(partitions))
    central = train_steps(
        model_name, train.x[pooled], train.y[pooled], train.num_classes,
        steps=central_steps, batch_size=batch_size, seed=scenario.seed, lr=lr,
    )
    central_accuracy = _accuracy(central, test.x, test.y)
    central_seconds = time.perf_counter() - started

    started = time.perf_counter()
    per_peer: list[float] = []
    standalone_steps: list[int] = []
    for i, indices in enumerate(partitions):
        indices = np.asarray(indices, dtype=np.int64)
        steps = steps_for(len(indices), per_peer_steps)
        model = train_steps(
            model_name, train.x[indices], train.y[indices], train.num_classes,
            steps=steps, batch_size=min(batch_size, len(indices)), seed=scenario.seed + 1 + i,
            lr=lr,
        )
        per_peer.append(_accuracy(model, test.x, test.y))
        standalone_steps.append(steps)
    standalone_seconds = time.perf_counter() - started

    budget = (f"{epochs_equivalent:g} epochs" if epochs_equivalent is not None
              else f"{per_peer_steps} steps per peer")
    return {
        "centralized": {
            "accuracy": central_accuracy,
            "steps": central_steps,
            "epochs": central_steps * batch_size / len(pooled),
            "seconds": central_seconds,
            "model": model_name,
            "label": "centralized, no DP",
            "description": f"all {len(pooled)} training examples pooled, {budget}, no DP; test set",
        },
        "standalone": {
            "accuracy": float(np.mean(per_peer)),
            "accuracy_min": float(np.min(per_peer)),
            "accuracy_max": float(np.max(per_peer)),
            "per_peer": per_peer,
            "steps": int(np.mean(standalone_steps)),
            "seconds": standalone_seconds,
            "model": model_name,
            "label": "each peer alone, no DP",
            "description": f"each peer alone on its shard, {budget}, no DP; test set",
        },
    }


# ----------------------------------------------------------------------------- with DP
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


def _compute_dp(
    scenario: Scenario,
    train: LabelledData,
    test: LabelledData,
    partitions: Sequence[np.ndarray],
) -> dict[str, dict[str, Any]]:
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
