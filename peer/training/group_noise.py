"""Group noise: each honest member adds 1/h of one Gaussian, on the field's integer grid.

docs/privacy.md ("Group noise") gives the argument this module implements:

* a member rounds its clipped gradient sum S on the fixed-point grid, ``Q = R(s S)`` with
  ``R(x) = floor(x + 1/2)`` (round half up: numpy's and torch's ``round`` round half to even,
  which is another function);
* it draws ``G ~ N(0, s^2 sigma^2 C^2 / h)`` per coordinate from the secure source and sends
  ``Y = Q + R(G)``: integers, so ``Y = R(Q + G)`` exactly, and no value is clipped to a range;
* the group's rebuilt sum of at least ``h + c`` contributions is the Poisson-sampled Gaussian
  mechanism with noise multiplier at least :meth:`GroupNoise.effective_sigma`, which is what
  the member's ledger records for the step.

Security property: the released sum of any ``h`` honest members' ``Y`` carries the noise of one
Gaussian of multiplier ``sigma_eff`` for any one record; one member's ``Y`` carries only
``sigma_eff / sqrt(h)`` and must never leave the secure aggregation in the clear.

Pure: numpy only, no I/O, and no torch import (the node's group steps,
peer/network/group_steps.py, use it without reaching torch); the noise comes from the
caller's :class:`peer.training.privacy.noise.GaussianSource` and a clipped sum may be a torch
tensor, both used through their methods only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from crypto.field import HALF_PRIME, PRIME

__all__ = ["GroupNoise", "decode_sum", "member_share", "round_half_up", "to_field"]


def round_half_up(values: np.ndarray) -> np.ndarray:
    """``floor(x + 1/2)`` per value, exactly, as int64 (float64 inputs of magnitude < 2^52).

    Computed as ``floor(x) + (x - floor(x) >= 1/2)``: the difference is exact in float64,
    while the naive ``floor(x + 0.5)`` rounds the addition first (0.49999999999999994 + 0.5
    is 1.0) and would break ``R(x + k) = R(x) + k`` for integers k, which the argument uses.
    """
    x = np.asarray(values, dtype=np.float64)
    whole = np.floor(x)
    return whole.astype(np.int64) + (x - whole >= 0.5)


@dataclass(frozen=True)
class GroupNoise:
    """The public parameters of group noise for one model: every member of a group shares them
    (they are part of the model id), so every member computes the same ``sigma_eff``."""

    honest_min: int  #: h: honest members assumed to contribute to every release
    max_colluders: int  #: c: colluders tolerated per group
    frac_bits: int  #: f: the fixed-point scale s = 2^f
    max_grad_norm: float  #: C
    dim: int  #: d: coordinates shared per step (every trainable parameter)

    def __post_init__(self) -> None:
        if self.honest_min < 2:
            raise ValueError(f"honest_min must be >= 2 (one member's share carries only "
                             f"1/h of the noise), got {self.honest_min}")
        if self.max_colluders < 0:
            raise ValueError(f"max_colluders must be >= 0, got {self.max_colluders}")
        if not 0 <= self.frac_bits <= 30:
            raise ValueError(f"frac_bits must be in [0, 30], got {self.frac_bits}")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"max_grad_norm must be positive, got {self.max_grad_norm}")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")

    @property
    def scale(self) -> float:
        return float(2**self.frac_bits)

    @property
    def min_contributors(self) -> int:
        """A release needs at least h + c contributions: then at least h are honest."""
        return self.honest_min + self.max_colluders

    @property
    def sensitivity_grid(self) -> float:
        """D = sC + sqrt(d): the L2 change of one member's rounded sum from one record."""
        return self.scale * self.max_grad_norm + math.sqrt(self.dim)

    @property
    def sigma_ratio(self) -> float:
        """sigma_eff / sigma = sC / sqrt(D^2 + d floor(h^2 / 4)), a little below 1."""
        h = self.honest_min
        split = self.dim * (h * h // 4)
        return self.scale * self.max_grad_norm / math.sqrt(self.sensitivity_grid ** 2 + split)

    def effective_sigma(self, sigma: float) -> float:
        """The noise multiplier the ledger records for a step whose members drew at ``sigma``."""
        return sigma * self.sigma_ratio

    def sigma_for_effective(self, sigma_eff: float) -> float:
        """The ``sigma`` members draw at so that a release has noise multiplier ``sigma_eff``."""
        return sigma_eff / self.sigma_ratio

    def share_std_grid(self, sigma: float) -> float:
        """Standard deviation of one member's G, in grid units: s sigma C / sqrt(h)."""
        return self.scale * sigma * self.max_grad_norm / math.sqrt(self.honest_min)


def member_share(clipped_sum: Any, sigma: float, params: GroupNoise, noise: Any) -> np.ndarray:
    """One member's contribution ``Y = R(s S) + R(G)`` (int64, one value per coordinate).

    ``clipped_sum`` is the sum of the member's clipped per-example gradients (norm <= C each)
    on its Poisson sample, not divided by anything (a torch tensor or an array). ``noise`` is
    a GaussianSource: ``noise.sample(d)`` gives d N(0, 1) draws as a tensor. G is drawn here,
    fresh, and not kept.
    """
    flat = clipped_sum.detach().double().cpu().numpy() if hasattr(clipped_sum, "detach") \
        else np.asarray(clipped_sum, dtype=np.float64)
    flat = flat.reshape(-1)
    if flat.size != params.dim:
        raise ValueError(f"clipped sum has {flat.size} coordinates, expected {params.dim}")
    if not np.all(np.isfinite(flat)):
        raise ValueError("clipped sum holds a non-finite value")
    quantised = round_half_up(flat * params.scale)
    gaussian = noise.sample(params.dim).double().numpy() * params.share_std_grid(sigma)
    return quantised + round_half_up(gaussian)


def to_field(values: np.ndarray) -> np.ndarray:
    """Integers as canonical field elements (uint32, mod p): a wrap is post-processing."""
    return np.mod(np.asarray(values, dtype=np.int64), PRIME).astype(np.uint32)


def decode_sum(field_sum: np.ndarray, scale: float) -> np.ndarray:
    """A rebuilt field sum, centred (values above (p - 1) / 2 are negative), divided by s."""
    centred = np.asarray(field_sum, dtype=np.int64)
    centred = np.where(centred > HALF_PRIME, centred - PRIME, centred)
    return centred.astype(np.float64) / scale
