"""Reference accuracies for a simulation: centralized (all data pooled) and standalone (each peer
alone on its shard), trained on the same split with the same per-peer compute as the network.

Compute budget: each simulated peer takes `rounds * local_steps` mini-batch steps of
`batch_size` examples. Unless `epochs_equivalent` is given:
- standalone: every peer takes exactly that many steps on its own shard;
- centralized: one model takes `peers` times that many steps on the pooled shards, i.e. the
  network's whole compute spent in one place.
With `epochs_equivalent = E`, standalone peer i takes ceil(E * n_i / batch) steps and the
centralized model ceil(E * N / batch), i.e. E passes over the data.

Baselines are trained without DP and with Adam (lr 1e-3): they are the upper (centralized) and
lower (standalone) references, so they are made as strong as the data allows. They see only
data that the simulation itself holds on this machine — no privacy property is at stake here.
The accuracy reported is on the shared test set.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from peer.training.models import build_model
from sim.scenario import Scenario, resolve_model

_EVAL_BATCH = 4096


class LabelledData(Protocol):
    """What the baselines need from peer.training.data.Dataset."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int


def _accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    if len(y) == 0:
        raise ValueError("cannot evaluate on an empty test set")
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(y), _EVAL_BATCH):
            inputs = torch.as_tensor(x[start:start + _EVAL_BATCH], dtype=torch.float32)
            predictions = model(inputs).argmax(dim=1).numpy()
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
    order = batch_rng.permutation(len(y))
    cursor = 0
    for _ in range(steps):
        if cursor + batch_size > len(order):
            order = batch_rng.permutation(len(y))
            cursor = 0
        batch = order[cursor:cursor + batch_size]
        cursor += batch_size
        inputs = torch.as_tensor(x[batch], dtype=torch.float32)
        targets = torch.as_tensor(y[batch], dtype=torch.int64)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(inputs), targets).backward()
        optimizer.step()
    return model


def compute_baselines(
    scenario: Scenario,
    train: LabelledData,
    test: LabelledData,
    partitions: Sequence[np.ndarray],
    epochs_equivalent: float | None = None,
    *,
    lr: float = 1e-3,
    torch_threads: int | None = 1,
) -> dict[str, dict[str, Any]]:
    """Centralized and standalone test accuracies for this split (see the module docstring).

    partitions: each peer's training indices into `train` (what that peer trains on).
    torch_threads: intra-op threads while training (restored afterwards). One thread is the
    default because these models are small: on 2 busy cores, 2 threads measured ~20x slower
    than 1 (240 MLP steps: 10.3 s against 0.46 s). None leaves torch's setting alone.
    Returns {"centralized": {...}, "standalone": {...}}; each has "accuracy", "steps",
    "seconds" and "description"; standalone also "accuracy_min", "accuracy_max", "per_peer".
    """
    if not partitions:
        raise ValueError("need at least one peer partition")
    previous_threads = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    try:
        return _compute(scenario, train, test, partitions, epochs_equivalent, lr)
    finally:
        torch.set_num_threads(previous_threads)


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
            "description": f"each peer alone on its shard, {budget}, no DP; test set",
        },
    }
