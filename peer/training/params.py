"""A trainer's parameters as one flat vector, the model lock, and the merges queued behind it.

The node merges group sums from the event loop while a round runs in a worker thread. A
merge never waits for the round: :meth:`FlatParams.merge` queues it, and whoever holds
:attr:`FlatParams.lock` next applies it (a round between its steps, evaluation and
checkpointing before they read the model; when nobody holds the lock, the merge applies it
at once). :meth:`FlatParams.apply_pending` returns the dense sum it applied, so a round can
keep merges out of its own update.

The flat order is that of the trainable parameters (``requires_grad``), the same order the
wire's indices and the sharing strategies use; ``initial`` is x0, the common starting point
every peer derives from the same seed (displacements are x - x0).
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import torch

from peer.sharing.base import checked_sparse


class FlatParams:
    """The trainable parameters, addressed as one flat float32 vector of ``count`` entries."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.count = sum(p.numel() for p in params)
        #: Held by a round while it steps the model, and by whatever reads the model whole.
        self.lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.initial = self.flat().clone()

    def flat(self) -> torch.Tensor:
        """The current parameters, concatenated (a detached copy)."""
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def displacement(self) -> np.ndarray:
        """x - x0 as float32 (caller holds the lock or owns the trainer)."""
        return (self.flat() - self.initial).numpy().astype(np.float32)

    def initial_digest(self) -> str:
        """8 hex digits of BLAKE2b over x0 (float32 little-endian bytes): part of the model id."""
        raw = self.initial.numpy().astype("<f4").tobytes()
        return hashlib.blake2b(raw, digest_size=4).hexdigest()

    def add(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Add a sparse vector to the parameters; returns it densified (for bookkeeping)."""
        dense = torch.zeros(self.count, dtype=torch.float32)
        dense.index_add_(0, indices, values)
        offset = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                p.add_(dense[offset : offset + n].view_as(p))
                offset += n
        return dense

    @property
    def pending(self) -> int:
        """Merges queued and not yet applied (a round holds the lock)."""
        with self._pending_lock:
            return len(self._pending)

    def apply_pending(self) -> torch.Tensor | None:
        """Apply the queued merges (caller holds :attr:`lock`); their dense sum, or None."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
        total: torch.Tensor | None = None
        for indices, values in pending:
            dense = self.add(indices, values)
            total = dense if total is None else total.add_(dense)
        return total

    def merge(self, indices: np.ndarray, values: np.ndarray) -> None:
        """Queue a sparse merge and apply it now unless the lock is held; never blocks.

        Raises ValueError on out-of-range indices, mismatched lengths or non-finite values.
        """
        index_array, value_array = checked_sparse(indices, values, self.count)
        entry = (
            torch.from_numpy(index_array.astype(np.int64)),
            torch.from_numpy(value_array.copy()),
        )
        with self._pending_lock:
            self._pending.append(entry)
        # Apply now if no round is running; otherwise the round applies it between steps.
        if self.lock.acquire(blocking=False):
            try:
                self.apply_pending()
            finally:
                self.lock.release()
