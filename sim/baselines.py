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

The runs themselves: sim.baselines_plain (no DP) and sim.baselines_dp (with DP).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from sim.baselines_dp import dp_baselines
from sim.baselines_plain import LabelledData, plain_baselines
from sim.scenario import Scenario

#: The no-DP baselines (always computed) and the DP ones (only for a DP scenario): the keys of
#: the dict compute_baselines returns and of "baselines" in result.json.
NO_DP_KEYS = ("centralized", "standalone")
DP_KEYS = ("centralized_dp", "standalone_dp")

log = logging.getLogger(__name__)


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
        result = plain_baselines(scenario, train, test, partitions, epochs_equivalent, lr)
        if with_dp:
            result.update(dp_baselines(scenario, train, test, partitions))
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
        result = dp_baselines(scenario, train, test, partitions)
    log.info("DP baselines trained in %.1f s", time.perf_counter() - started)
    return result
