"""Share mode "model": gossip averaging of the models' displacement from the common start.

Every peer of a network starts from the same weights x0 and shares top-k of ``x - x0`` by
magnitude, with no error feedback: what is not sent now is still in the model and is sent
whenever it is large. The group rebuilds the sum of its members' displacements and each member
moves its shared snapshot onto the group mean (merge rule ``group_average``,
peer.sharing.merge.GOSSIP_AVERAGING), so information relays from group to group and the
members' independent DP noise averages out. The residual fill lends the snapshot the round's
top-k was taken from; a session removes nothing (the displacement stays in the model).
Measured against "delta" in docs/results.md.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from peer.sharing.base import SharingStrategy, SparseVector
from peer.sharing.merge import GOSSIP_AVERAGING, MergeConfig
from peer.sharing.topk import TopK


class DisplacementSharing(SharingStrategy):
    """Gossip averaging: share top-k of x - x0, move to the group's mean model."""

    name: ClassVar[str] = "model"
    merge: ClassVar[MergeConfig] = GOSSIP_AVERAGING
    needs_common_init: ClassVar[bool] = True

    def after_round(self, delta: np.ndarray, displacement: np.ndarray) -> SparseVector:
        return self._share(displacement, self.topk)

    def reshare(self, displacement: np.ndarray) -> SparseVector:
        """An averaging-only round: its own top-k (often larger: it is where the peers'
        models reach a consensus, and it comes only at the end)."""
        return self._share(displacement, self.reshare_topk)

    def _share(self, displacement: np.ndarray, topk: TopK) -> SparseVector:
        snapshot = np.asarray(displacement, dtype=np.float32)
        indices, values, _unsent = topk.select(snapshot, np.zeros_like(snapshot))
        with self._lock:
            self._state = snapshot.copy()
        return indices, values

    def model_id(self, base: str, init_digest: str) -> str:
        # Averaging models is meaningful only from the same initial weights, so a peer
        # initialised differently must never group: the id carries a digest of x0.
        return f"{base}-avg-{init_digest}"

    def fill(self, indices: np.ndarray) -> np.ndarray:
        """The displacement as of the last completed round on ``indices``."""
        return self._lend(indices)
