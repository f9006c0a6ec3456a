"""Top-k sparsification, with or without error feedback.

The strategies in peer.sharing call :meth:`TopK.select`: "delta" passes its residual (error
feedback), "model" passes zeros (the unsent part stays in the model). With error feedback, each
round the peer adds the residual it kept back last time to its fresh update, sends the
k largest-magnitude entries and keeps the rest as the new residual, so nothing is lost, only
delayed. The selection runs on the accumulated *noised* update (DP outputs plus earlier DP
outputs), so which indices are sent is post-processing and costs no extra privacy.

Exactness: sent values are copied from the accumulated vector and the residual is that vector
with the sent positions zeroed, so ``sent + residual == update + old_residual`` bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TopK:
    """Keep ``k = ceil(fraction * n)`` entries (0.001-0.1 for deltas with error feedback;
    up to 0.25 for model displacements under gossip averaging, see docs/results.md)."""

    fraction: float

    def __post_init__(self) -> None:
        if not (0 < self.fraction <= 1) or not math.isfinite(self.fraction):
            raise ValueError(f"top-k fraction must be in (0, 1], got {self.fraction}")

    def k_for(self, n: int) -> int:
        if n <= 0:
            raise ValueError(f"vector length must be positive, got {n}")
        return min(n, max(1, math.ceil(self.fraction * n)))

    def select(
        self, update: np.ndarray, residual: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indices uint32 sorted unique, values float32, new_residual float32)."""
        update = np.asarray(update, dtype=np.float32).ravel()
        residual = np.asarray(residual, dtype=np.float32).ravel()
        if update.shape != residual.shape:
            raise ValueError(f"update has {update.size} entries, residual {residual.size}")
        if update.size >= 2**32:
            raise ValueError("vector too long for uint32 indices")
        accumulated = update + residual
        if not np.all(np.isfinite(accumulated)):
            raise ValueError("update + residual contains NaN or infinity")
        k = self.k_for(accumulated.size)
        if k == accumulated.size:
            chosen = np.arange(accumulated.size)
        else:
            chosen = np.argpartition(np.abs(accumulated), accumulated.size - k)[-k:]
        indices = np.sort(chosen).astype(np.uint32)
        values = accumulated[indices]
        new_residual = accumulated  # owned copy: update + residual allocated a new array
        new_residual[indices] = 0.0
        return indices, values, new_residual
