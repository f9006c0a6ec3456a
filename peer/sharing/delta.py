"""Share mode "delta": each round's own change, top-k with error feedback, others' mean merged.

What top-k holds back is kept as a residual and added to the next round's change, so nothing
is lost, only delayed; the residual also fills session coordinates this peer did not pick, and
what a session shared from it is removed. Peers add the mean of the others' contributions
(``others_mean``): nothing relays, and every model keeps its own full DP noise plus part of
the others'. Kept for comparison; gossip averaging (peer.sharing.displacement) learns better.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from peer.sharing.base import SharingStrategy, SparseVector
from peer.sharing.merge import MergeConfig


class DeltaSharing(SharingStrategy):
    """Additive update gossip with error feedback."""

    name: ClassVar[str] = "delta"
    merge: ClassVar[MergeConfig] = MergeConfig(rule="others_mean")

    def after_round(self, delta: np.ndarray, displacement: np.ndarray) -> SparseVector:
        with self._lock:
            indices, values, self._state = self.topk.select(delta, self._state)
        return indices, values

    def fill(self, indices: np.ndarray) -> np.ndarray:
        """The error-feedback residual (what top-k held back) on ``indices``."""
        return self._lend(indices)

    def settle(self, indices: np.ndarray, values: np.ndarray) -> None:
        """``residual[indices] -= values``; if a later round already sent and zeroed a
        coordinate, the negative remainder corrects the double send."""
        index_array, value_array = self._checked(indices, values)
        with self._lock:
            np.subtract.at(self._state, index_array, value_array)
