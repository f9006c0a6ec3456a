"""The sharing strategy interface: what a peer shares after a round, and how it merges.

A strategy owns the three things that must agree across a network for gossip to mean anything:
the vector a round shares (its own change, or its model's displacement from the common start),
how top-k picks the coordinates and what happens to the rest (error feedback, or nothing), and
the merge rule that turns a rebuilt group sum back into a change to the model. It also lends
this peer's values on session coordinates outside its own top-k (the residual fill,
docs/sessions.md "Sparse supports") and settles them once a session has shared them.

Strategies are pure numpy: the trainer hands them flat float32 vectors, the node asks them for
fill values, and neither half learns how the other works. Everything a strategy sees is a DP
output or post-processing of DP outputs, so nothing here costs privacy.

Threading: the trainer calls :meth:`SharingStrategy.after_round` from its worker thread while
the event loop calls :meth:`fill`; a strategy guards its state with its own short lock, held
only for array copies, so the event loop never waits for a running round.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from peer.sharing.merge import MergeConfig
from peer.sharing.topk import TopK

SparseVector = tuple[np.ndarray, np.ndarray]  # (uint32 sorted unique indices, float32 values)


def checked_sparse(indices: np.ndarray, values: np.ndarray, size: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(indices, float32 values) of a sparse vector over ``size`` coordinates, checked.

    ValueError on arrays that are not 1-D and of equal length, non-integer or out-of-range
    indices, or non-finite values (what a merge must never add to a model).
    """
    index_array = np.asarray(indices)
    value_array = np.asarray(values, dtype=np.float32)
    if index_array.ndim != 1 or value_array.ndim != 1 or len(index_array) != len(value_array):
        raise ValueError("indices and values must be 1-D and of equal length")
    if not np.issubdtype(index_array.dtype, np.integer):
        raise ValueError(f"indices must be integers, got {index_array.dtype}")
    if len(index_array) and (int(index_array.min()) < 0 or int(index_array.max()) >= size):
        raise ValueError(f"index out of range 0..{size - 1}")
    if not np.all(np.isfinite(value_array)):
        raise ValueError("update values must be finite")
    return index_array, value_array


class SharingStrategy(ABC):
    """One way of sharing; subclasses are registered by name in :mod:`peer.sharing`."""

    #: The registry key, written in a config as ``[training] share = "<name>"``.
    name: ClassVar[str]
    #: The merge rule that pairs with what this strategy shares.
    merge: ClassVar[MergeConfig]
    #: Whether peers must start from the same weights (then the model id carries a digest of
    #: them, and the run may end with averaging-only rounds).
    needs_common_init: ClassVar[bool] = False

    def __init__(self, topk_fraction: float, param_count: int,
                 reshare_fraction: float | None = None) -> None:
        if param_count < 1:
            raise ValueError(f"param_count must be >= 1, got {param_count}")
        self.topk = TopK(topk_fraction)
        #: Top-k of the averaging-only rounds (:meth:`reshare`); the round's own by default.
        self.reshare_topk = self.topk if reshare_fraction is None else TopK(reshare_fraction)
        self.param_count = param_count
        self._state = np.zeros(param_count, dtype=np.float32)
        self._lock = threading.Lock()

    # -------------------------------------------------------------------- the trainer's side
    @abstractmethod
    def after_round(self, delta: np.ndarray, displacement: np.ndarray) -> SparseVector:
        """What a private round shares, given its own change and the model's displacement."""

    def reshare(self, displacement: np.ndarray) -> SparseVector:
        """What an averaging-only round shares (no private step); only with a common init."""
        raise ValueError(f"share mode {self.name!r} has no averaging-only rounds")

    def model_id(self, base: str, init_digest: str) -> str:
        """The id peers group by: equal only where averaging or adding vectors makes sense."""
        return base

    @property
    def state(self) -> np.ndarray:
        """A copy of what the strategy keeps between rounds (checkpointed with the model)."""
        with self._lock:
            return self._state.copy()

    def restore(self, state: np.ndarray) -> None:
        """Resume from a checkpointed :attr:`state`; ValueError if it does not fit."""
        array = np.asarray(state, dtype=np.float32)
        if array.shape != (self.param_count,):
            raise ValueError(f"sharing state has shape {array.shape}, "
                             f"expected ({self.param_count},)")
        with self._lock:
            self._state = array.copy()

    # ------------------------------------------------------------------------ the node's side
    @abstractmethod
    def fill(self, indices: np.ndarray) -> np.ndarray:
        """This peer's values on session coordinates outside its own top-k (float32)."""

    def settle(self, indices: np.ndarray, values: np.ndarray) -> None:
        """A completed session shared ``values`` on ``indices`` from :meth:`fill`."""
        self._checked(indices, values)

    # ------------------------------------------------------------------------------- checks
    def checked_indices(self, indices: np.ndarray) -> np.ndarray:
        """``indices`` as int64 after checking they are 1-D integers in range; else ValueError."""
        index_array = np.asarray(indices)
        if index_array.ndim != 1:
            raise ValueError("indices must be 1-D")
        if index_array.size and not np.issubdtype(index_array.dtype, np.integer):
            raise ValueError(f"indices must be integers, got {index_array.dtype}")
        index_array = index_array.astype(np.int64)
        if index_array.size and (
            int(index_array.min()) < 0 or int(index_array.max()) >= self.param_count
        ):
            raise ValueError(f"index out of range 0..{self.param_count - 1}")
        return index_array

    def _checked(self, indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index_array = self.checked_indices(indices)
        value_array = np.asarray(values, dtype=np.float32)
        if value_array.shape != index_array.shape:
            raise ValueError("indices and values must be 1-D and of equal length")
        if not np.all(np.isfinite(value_array)):
            raise ValueError("residual values must be finite")
        return index_array, value_array

    def _lend(self, indices: np.ndarray) -> np.ndarray:
        index_array = self.checked_indices(indices)
        with self._lock:
            return self._state[index_array].astype(np.float32, copy=True)
