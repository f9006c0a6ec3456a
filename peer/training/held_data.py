"""What a trainer keeps in memory of its records, and evaluation on what it keeps.

A trainer holds each record set it trains or evaluates on as the *trainable part's inputs*:
the records themselves for a model without a frozen prefix (mlp, cnn, user models: a
zero-copy view of the loaded array), their features for a model with one ("scatter",
peer/training/features.py). In the second case the raw records are read once, to featurise
them at construction, and not kept: nothing later reads them (training, hold-out evaluation,
checkpoints and resume need only the features, the labels and the record counts), so a
Fashion-MNIST shard peer does not carry its images (3.1 KB each) beside their features.

:class:`HeldData` is the read-out of what is held, in bytes, by role; :class:`EvalSet` is the
hold-out as held, and :func:`count_correct` the evaluation loop over inputs in batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class HeldData:
    """Bytes of record data a trainer keeps referenced, by role; each buffer counted once.

    * ``raw_bytes``: records as loaded (the model's own inputs), held where the trainable
      part reads them directly: a model without a frozen prefix. 0 with a frozen prefix,
      whose raw records are released once featurised.
    * ``feature_bytes``: the frozen prefix's outputs held in their place (0 without one).
    * ``label_bytes``: the labels (int64, 8 bytes per record).

    Counted: the static training set, the hold-out and a loaded source block. Not counted:
    the process-wide feature cache (features.py, bounded by its own row limit) and any copy
    the caller keeps of the data sets it passed in.
    """

    raw_bytes: int
    feature_bytes: int
    label_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.raw_bytes + self.feature_bytes + self.label_bytes


def trainable_inputs(frozen: nn.Module | None, dtype: torch.dtype, x: np.ndarray
                     ) -> torch.Tensor:
    """The trainable part's inputs for raw records ``x``: a zero-copy view of ``x`` without a
    frozen prefix, else its features (through the process-wide cache, stored as ``dtype``),
    which hold no reference to ``x``."""
    if frozen is None:
        return torch.from_numpy(x)
    from peer.training.features import cached_features

    return cached_features(frozen, x, dtype)


def distinct_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages under ``tensors``: a storage several tensors view is
    counted once, and whole (a view keeps all of it alive)."""
    storages: dict[int, int] = {}
    for tensor in tensors:
        if tensor is not None and tensor.numel() > 0:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def count_held(inputs: Iterable[torch.Tensor | None], labels: Iterable[torch.Tensor | None],
              featurised: bool) -> HeldData:
    """The :class:`HeldData` of these inputs and labels; ``featurised``: the inputs are a
    frozen prefix's outputs (else the raw records)."""
    input_bytes = distinct_bytes(inputs)
    return HeldData(raw_bytes=0 if featurised else input_bytes,
                    feature_bytes=input_bytes if featurised else 0,
                    label_bytes=distinct_bytes(labels))


@dataclass(frozen=True)
class EvalSet:
    """A labelled record set as the trainable part's inputs ``x`` ([N, ...], features may be
    float16) and labels ``y`` (int64 [N])."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} input rows but {len(self.y)} labels")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def batches(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(float32 inputs, labels) in order, ``size`` records at a time."""
        for start in range(0, len(self), size):
            yield self.x[start:start + size].float(), self.y[start:start + size]


def record_batches(x: np.ndarray, y: np.ndarray, inputs: Callable[[np.ndarray], torch.Tensor],
                   size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(float32 inputs, labels) of raw records ``x`` and labels ``y``, ``size`` at a time,
    each batch's inputs made by ``inputs`` as it is reached (a caller's data set)."""
    for start in range(0, len(y), size):
        yield inputs(x[start:start + size]).float(), torch.from_numpy(y[start:start + size])


def count_correct(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                  ) -> int:
    """How many records ``model`` classifies correctly (arg-max of its outputs), no grad."""
    correct = 0
    with torch.no_grad():
        for x, y in batches:
            correct += int((model(x).argmax(1) == y).sum())
    return correct
