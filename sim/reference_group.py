"""Group noise in the reference engine (``murmur-sim --mode reference --noise group``).

Each round, the peers still able to train are split at random into groups (as in
sim/reference.py, with at least ``honest_min + max_colluders`` members each) and every group
runs one lockstep epoch (docs/privacy.md, "Group noise"):

1. its members average their models (a function of earlier releases: no privacy cost);
2. ``local_steps`` private steps, each a group release: every member's
   :meth:`peer.training.group_epoch.GroupEpoch.share` is added in the field, the sum decoded and
   divided by the members' expected batch sizes, and every member's optimizer applies it.

Rounds of the averaging tail only average. What is left out is what does not change what a
model learns: the secure aggregation that rebuilds the sum (here a plain field sum, the value
the session would reveal), keys, sealing and timing.

Every member draws at one sigma: the noise multiplier sigma_eff that keeps the peer with the
largest sampling rate within ``target_epsilon`` over the planned private steps, computed by the
accountant (:func:`sim.setup.group_sigma_eff`, shared with the network engines).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from crypto.field import PRIME
from peer.errors import BudgetExhaustedError
from peer.training.group_noise import GroupNoise, decode_sum, to_field
from sim.scenario import Scenario

log = logging.getLogger(__name__)

#: The session's fixed point: the grid the shares are rounded on (s = 2^16).
GROUP_FRAC_BITS = 16


def group_noise_params(s: Scenario, trainer: Any) -> GroupNoise:
    return GroupNoise(honest_min=s.honest_min, max_colluders=s.max_colluders,
                      frac_bits=GROUP_FRAC_BITS, max_grad_norm=s.max_grad_norm,
                      dim=trainer.param_count)


def average_models(members: list[Any]) -> None:
    """Every member moves to the members' mean model (post-processing of released sums)."""
    vectors = [peer.trainer.parameter_vector() for peer in members]
    mean = np.mean(vectors, axis=0, dtype=np.float64).astype(np.float32)
    everything = np.arange(mean.size, dtype=np.uint32)
    for peer, own in zip(members, vectors, strict=True):
        peer.trainer.apply_update(everything, mean - own)


def run_group_epoch(members: list[Any], params: GroupNoise, steps: int) -> int:
    """One epoch of ``steps`` group releases; returns the releases made. A member whose
    budget cannot afford the epoch sits it out; fewer than h + c left: no release at all."""
    epochs = []
    for peer in members:
        try:
            epochs.append((peer, peer.trainer.begin_group_epoch(params, steps)))
        except BudgetExhaustedError:
            peer.budget_exhausted = True
    if len(epochs) < params.min_contributors:
        return 0
    divisor = sum(epoch.expected_batch for _peer, epoch in epochs)
    per_step_bytes = 2 * (len(epochs) - 1) * 4 * (params.dim + 1)
    for _ in range(steps):
        total = np.zeros(params.dim, dtype=np.int64)
        for _peer, epoch in epochs:
            total = (total + to_field(epoch.share()).astype(np.int64)) % PRIME
        gradient = decode_sum(total, params.scale) / divisor
        for peer, epoch in epochs:
            epoch.apply(gradient)
            peer.payload_bytes += per_step_bytes
            peer.counters.sessions_done += 1
    return steps
