"""The merge rule: how a rebuilt group sum becomes a bounded change to the local model.

A session ends, for each member, with the group sum ``S`` of every contributor's (noised, top-k)
vector over the session's coordinates, the number of contributors ``m`` (carried by the weight
slot, so it is rebuilt, not trusted), and the member's own contribution ``own`` on the same
coordinates (with the residual fill, every member contributes on every coordinate). Three rules,
chosen by ``MergeConfig.rule``; all members of a network must use the same rule and share mode:

* ``"group_average"`` (gossip averaging; ``murmur-sim`` and ``murmur-peer`` use it): members share
  their model's *displacement from the common initialisation* (``TrainerConfig(share="model")``),
  so ``S / m`` is the group's mean model and the member moves its shared snapshot onto it::

      delta = w * (S / m - own)

  Progress the member made after taking the snapshot stays on top (the change is relative).
  Information relays (a model carries what it averaged in to its next group) and independent
  DP noise averages out, so models converge to a consensus; measured in docs/results.md.
* ``"others_mean"`` (additive update gossip): members share their round's update
  (``share="delta"``) and add the others' mean, ``delta = w * (S - own) / (m - 1)``. Nothing
  relays and every model keeps its own full DP noise plus part of the others'.
* ``"others_sum"``: as above but ``delta = w * (S - own)``.

``w = base_weight / (1 + s)`` where ``s`` is the staleness of the session (local rounds the peer
trained since it produced what it contributed), or ``w = base_weight`` with
``staleness_decay=False``. Before anything touches the model the delta is checked:

* any non-finite value -> rejected (``MergeRejected("non_finite")``): it can only come from a
  corrupted partial or a bug; scaling cannot repair it;
* a norm beyond ``reject_factor`` times the bound -> rejected (``"implausible_norm"``): far
  outside what DP-SGD with clipping can produce, so it is a broken or hostile partial sum;
* otherwise a norm above the bound -> scaled down to the bound (clipped). Clipping rather than
  rejecting keeps honest but large updates useful and caps what a poisoning member can move the
  model per merge at ``bound`` (the bound is the only poisoning defence; secure aggregation hides
  who sent what, so per-contributor checks are impossible by design).

The bound is ``relative_norm * ||own||`` (honest members run the same DP-SGD with the same
clipping and learning rate, so their vectors have the same scale as ours; under averaging an
honest pull is at most about ``||own|| + ||mean||``), capped by ``max_norm`` when set, and never
below ``min_norm`` so a peer whose own vector happens to be tiny still learns. Under
``group_average`` ``own`` is the whole displacement, which a clipped hostile pull enlarges (and
with it the next bound), so use a tight clip and a low ``reject_factor`` there
(``GOSSIP_AVERAGING``: 2 and 5): a sum that only a hostile or broken member can produce is then
rejected rather than clipped. This module is pure numpy: no I/O, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from peer.errors import DroppedError
from protocol.limits import MIN_GROUP_SIZE

#: Fewest contributors a merged sum may have: with two, a member's sum minus its own vector is
#: the other member's vector. The sessions enforce the stricter max(t, c + 2, 3); this is the
#: floor that holds whatever produced the sum.
MIN_CONTRIBUTORS = MIN_GROUP_SIZE


class MergeRejected(DroppedError):
    """The rebuilt sum may not touch the model. ``reason`` is a short counter key."""


@dataclass(frozen=True)
class MergeConfig:
    """Parameters of the merge rule (see the module docstring)."""

    rule: str = "others_mean"  # one of MERGE_RULES
    base_weight: float = 1.0
    staleness_decay: bool = True  # False: w = base_weight whatever the staleness
    relative_norm: float = 3.0
    min_norm: float = 1e-3
    max_norm: float | None = None
    reject_factor: float = 1000.0

    def __post_init__(self) -> None:
        if self.rule not in MERGE_RULES:
            raise ValueError(f"rule must be one of {tuple(MERGE_RULES)}, got {self.rule!r}")
        if not (math.isfinite(self.base_weight) and 0.0 < self.base_weight <= 1.0):
            raise ValueError("base_weight must be in (0, 1]")
        if not (math.isfinite(self.relative_norm) and self.relative_norm > 0.0):
            raise ValueError("relative_norm must be > 0")
        if not (math.isfinite(self.min_norm) and self.min_norm > 0.0):
            raise ValueError("min_norm must be > 0")
        if self.max_norm is not None and not (
            math.isfinite(self.max_norm) and self.max_norm >= self.min_norm
        ):
            raise ValueError("max_norm must be finite and >= min_norm")
        if not (math.isfinite(self.reject_factor) and self.reject_factor >= 1.0):
            raise ValueError("reject_factor must be >= 1")


@dataclass(frozen=True)
class MergeResult:
    """The sparse change to add to the flat parameter vector, with what the rule did."""

    indices: np.ndarray  # uint32, sorted unique: the session coordinates
    values: np.ndarray  # float32, bounded and finite
    weight: float  # w(s)
    norm_before_clip: float
    bound: float
    clipped: bool


def staleness_weight(base_weight: float, staleness: int) -> float:
    """w(s) = base / (1 + s): an older group sum counts less, never negatively."""
    if staleness < 0:
        raise ValueError("staleness must be >= 0")
    return base_weight / (1.0 + staleness)


RuleDelta = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def _others_mean(group_sum: np.ndarray, own: np.ndarray, contributors: int) -> np.ndarray:
    return (group_sum - own) / float(contributors - 1)


def _others_sum(group_sum: np.ndarray, own: np.ndarray, contributors: int) -> np.ndarray:
    return group_sum - own


def _group_average(group_sum: np.ndarray, own: np.ndarray, contributors: int) -> np.ndarray:
    return group_sum / float(contributors) - own


#: The merge rules by name: (group sum, own values, contributors) -> unweighted change.
MERGE_RULES: dict[str, RuleDelta] = {
    "others_mean": _others_mean,
    "others_sum": _others_sum,
    "group_average": _group_average,
}


def rule_delta(
    rule: str, group_sum: np.ndarray, own_values: np.ndarray, contributors: int
) -> np.ndarray:
    """The unweighted, unbounded change the rule asks for (see the module docstring)."""
    try:
        delta_of = MERGE_RULES[rule]
    except KeyError:
        raise ValueError(f"unknown merge rule {rule!r}") from None
    return delta_of(group_sum, own_values, contributors)


def norm_bound(own_values: np.ndarray, config: MergeConfig) -> float:
    """The largest L2 norm a merged delta may have, given the peer's own contribution."""
    own_norm = float(np.linalg.norm(own_values.astype(np.float64)))
    bound = config.relative_norm * own_norm if math.isfinite(own_norm) else config.min_norm
    bound = max(bound, config.min_norm)
    if config.max_norm is not None:
        bound = min(bound, config.max_norm)
    return bound


def merge_group_sum(
    coordinates: np.ndarray,
    group_sum: np.ndarray,
    own_values: np.ndarray,
    contributors: int,
    staleness: int,
    config: MergeConfig,
) -> MergeResult:
    """Turn a rebuilt group sum into the bounded delta to apply (see module docstring).

    ``group_sum`` and ``own_values`` are float arrays aligned with ``coordinates``; ``own_values``
    is zero where the peer contributed nothing. Raises ``MergeRejected`` with a counter key.
    """
    coordinates = np.asarray(coordinates)
    group_sum = np.asarray(group_sum, dtype=np.float64)
    own_values = np.asarray(own_values, dtype=np.float64)
    if coordinates.ndim != 1 or group_sum.shape != coordinates.shape:
        raise MergeRejected("shape_mismatch", "group sum does not match the coordinates")
    if own_values.shape != coordinates.shape:
        raise MergeRejected("shape_mismatch", "own contribution does not match the coordinates")
    if contributors < MIN_CONTRIBUTORS:  # a sum of two is the other's vector: never merged
        raise MergeRejected("too_few_contributors", f"m={contributors}")
    if not (np.all(np.isfinite(group_sum)) and np.all(np.isfinite(own_values))):
        raise MergeRejected("non_finite")
    if staleness < 0:
        raise ValueError("staleness must be >= 0")
    weight = (
        staleness_weight(config.base_weight, staleness)
        if config.staleness_decay
        else config.base_weight
    )
    delta = weight * rule_delta(config.rule, group_sum, own_values, contributors)
    norm = float(np.linalg.norm(delta))
    if not math.isfinite(norm):
        raise MergeRejected("non_finite", "norm overflow")
    bound = norm_bound(own_values, config)
    if norm > config.reject_factor * bound:
        raise MergeRejected("implausible_norm", f"norm {norm:.3g} vs bound {bound:.3g}")
    clipped = norm > bound
    if clipped:
        delta *= bound / norm
    values = delta.astype(np.float32)
    if not np.all(np.isfinite(values)):  # float32 cast of a finite float64 can still overflow
        raise MergeRejected("non_finite", "float32 overflow")
    return MergeResult(
        indices=coordinates.astype(np.uint32, copy=False),
        values=values,
        weight=weight,
        norm_before_clip=norm,
        bound=bound,
        clipped=clipped,
    )


#: Gossip averaging (docs/sessions.md, "Merge rule"): members share their model's displacement
#: from the common init (``TrainerConfig.share = "model"``) and move to the group mean. The mean
#: already weighs every member equally and the pull is relative to the snapshot the peer shared,
#: so a stale session is not discounted further. An honest pull is at most about
#: ``||own|| + ||mean||``: clipped above 2x the own norm; beyond 10x (5x the bound) it is a
#: hostile or broken sum and rejected (clipping it would let it inflate the next bound).
GOSSIP_AVERAGING = MergeConfig(
    rule="group_average", staleness_decay=False, relative_norm=2.0, reject_factor=5.0
)

