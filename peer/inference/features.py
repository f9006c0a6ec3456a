"""The public half of the scatter model, as a client computes it, and a plain reference head.

The ScatterNet transform and its per-example normalisation have no parameters and depend on
nothing but the image (peer/training/features.py), so a client computes its features itself
and only they, Shamir-shared, leave it. :func:`train_reference_head` fits a linear layer on
such features without DP, for correctness checks and benchmarks of the private path only: the
network's models are trained with DP-SGD, and the inference arithmetic is the same for any
weights within the field's range.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from peer.training.features import cached_features, warm_cache
from peer.training.models import build_model, split_frozen
from peer.training.optim import build_optimizer


def client_features(images: np.ndarray, *, cache_dir: Path | None = None) -> np.ndarray:
    """Scatter features (N x D, float64) of images (N x H x W, or N x C x H x W); with
    ``cache_dir``, kept on (and read from) disk like a trainer's (``warm_cache``)."""
    x = np.ascontiguousarray(images, dtype=np.float32)
    prefix, _ = split_frozen(build_model("scatter", tuple(x.shape[1:]), num_classes=2))
    assert prefix is not None
    if cache_dir is not None:
        return warm_cache(prefix, x, cache_dir=cache_dir).numpy().astype(np.float64)
    return cached_features(prefix, x).numpy().astype(np.float64)


def train_reference_head(features: np.ndarray, labels: np.ndarray, classes: int, *,
                         epochs: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of a softmax regression on ``features`` (full-batch Adam, no DP)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(features, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.int64)
    layer = torch.nn.Linear(x.shape[1], classes)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.01, generator=generator)
        layer.bias.zero_()
    optimizer = build_optimizer("adam", list(layer.parameters()), lr=0.01, momentum=0.0)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(x), y)
        loss.backward()
        optimizer.step()
    return (layer.weight.detach().numpy().astype(np.float64),
            layer.bias.detach().numpy().astype(np.float64))
