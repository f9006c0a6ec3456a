"""The no-DP baselines of sim.baselines: plain Adam training (`train_steps`) and the
"centralized" (all shards pooled) and "standalone" (each peer alone) runs on the same split.

Model initialisation and batch order depend only on the scenario's seed, so these accuracies
are the same from run to run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from peer.training.models import build_model, split_frozen
from sim.scenario import Scenario, resolve_model

_EVAL_BATCH = 4096


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



@dataclass(frozen=True)
class _PlainPlan:
    """What every no-DP run shares: the model, the recipe and the compute budget."""

    model_name: str
    batch_size: int
    per_peer_steps: int  # the network's steps per peer: rounds * local_steps
    epochs_equivalent: float | None
    lr: float
    seed: int

    def steps_for(self, n_examples: int, default: int) -> int:
        """``default`` steps, or with epochs_equivalent E, E passes over ``n_examples``."""
        if self.epochs_equivalent is None:
            return default
        return max(1, math.ceil(self.epochs_equivalent * n_examples / self.batch_size))

    @property
    def budget(self) -> str:
        return (f"{self.epochs_equivalent:g} epochs" if self.epochs_equivalent is not None
                else f"{self.per_peer_steps} steps per peer")


def plain_baselines(
    scenario: Scenario,
    train: LabelledData,
    test: LabelledData,
    partitions: Sequence[np.ndarray],
    epochs_equivalent: float | None,
    lr: float,
) -> dict[str, dict[str, Any]]:
    """{"centralized": {...}, "standalone": {...}}, both trained with Adam at ``lr`` on the
    peers' shards (see sim.baselines for the compute budget)."""
    if epochs_equivalent is not None and not (epochs_equivalent > 0):
        raise ValueError(f"epochs_equivalent must be > 0, got {epochs_equivalent}")
    plan = _PlainPlan(
        model_name=resolve_model(scenario.model, tuple(train.x.shape[1:])),
        batch_size=scenario.batch_size,
        per_peer_steps=scenario.rounds * scenario.local_steps,
        epochs_equivalent=epochs_equivalent,
        lr=lr,
        seed=scenario.seed,
    )
    return {
        "centralized": _centralized(plan, train, test, partitions),
        "standalone": _standalone(plan, train, test, partitions),
    }


def _centralized(
    plan: _PlainPlan, train: LabelledData, test: LabelledData, partitions: Sequence[np.ndarray]
) -> dict[str, Any]:
    """One model on the pooled shards with the network's whole compute (or E epochs)."""
    pooled = np.concatenate([np.asarray(p, dtype=np.int64) for p in partitions])
    started = time.perf_counter()
    steps = plan.steps_for(len(pooled), plan.per_peer_steps * len(partitions))
    model = train_steps(
        plan.model_name, train.x[pooled], train.y[pooled], train.num_classes,
        steps=steps, batch_size=plan.batch_size, seed=plan.seed, lr=plan.lr,
    )
    accuracy = _accuracy(model, test.x, test.y)
    return {
        "accuracy": accuracy,
        "steps": steps,
        "epochs": steps * plan.batch_size / len(pooled),
        "seconds": time.perf_counter() - started,
        "model": plan.model_name,
        "label": "centralized, no DP",
        "description": f"all {len(pooled)} training examples pooled, {plan.budget}, no DP; "
                       "test set",
    }


def _standalone(
    plan: _PlainPlan, train: LabelledData, test: LabelledData, partitions: Sequence[np.ndarray]
) -> dict[str, Any]:
    """Each peer alone on its shard with a peer's compute (or E epochs of its shard)."""
    started = time.perf_counter()
    per_peer: list[float] = []
    standalone_steps: list[int] = []
    for i, indices in enumerate(partitions):
        indices = np.asarray(indices, dtype=np.int64)
        steps = plan.steps_for(len(indices), plan.per_peer_steps)
        model = train_steps(
            plan.model_name, train.x[indices], train.y[indices], train.num_classes,
            steps=steps, batch_size=min(plan.batch_size, len(indices)), seed=plan.seed + 1 + i,
            lr=plan.lr,
        )
        per_peer.append(_accuracy(model, test.x, test.y))
        standalone_steps.append(steps)
    return {
        "accuracy": float(np.mean(per_peer)),
        "accuracy_min": float(np.min(per_peer)),
        "accuracy_max": float(np.max(per_peer)),
        "per_peer": per_peer,
        "steps": int(np.mean(standalone_steps)),
        "seconds": time.perf_counter() - started,
        "model": plan.model_name,
        "label": "each peer alone, no DP",
        "description": f"each peer alone on its shard, {plan.budget}, no DP; test set",
    }
