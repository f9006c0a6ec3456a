"""Model factories and data loaders of a pretend user, named by import path in the tests
(``"tests.user_factories:NAME"``): good ones, and one for each way a user's code can be wrong."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from peer import Dataset


def linear(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A flat linear model: the fast engine's kind."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_classes))


def linear_relu(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """``linear`` with one more parameter-free layer: the same parameter count."""
    return nn.Sequential(nn.Flatten(), nn.ReLU(),
                         nn.Linear(int(np.prod(input_shape)), num_classes))


def conv1d(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A 1-D convolution with GroupNorm: only the general engine computes it."""
    channels, length = input_shape
    return nn.Sequential(nn.Conv1d(channels, 4, kernel_size=3, padding=1), nn.GroupNorm(2, 4),
                         nn.Tanh(), nn.Flatten(), nn.Linear(4 * length, num_classes))


class _Twice(nn.Module):
    """One Linear applied twice: its weights get two contributions per example."""

    def __init__(self, features: int, num_classes: int) -> None:
        super().__init__()
        self.square = nn.Linear(features, features)
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        return self.head(torch.tanh(self.square(torch.tanh(self.square(flat)))))


def reused_layer(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return _Twice(int(np.prod(input_shape)), num_classes)


def batchnorm(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    features = int(np.prod(input_shape))
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 8), nn.BatchNorm1d(8),
                         nn.Linear(8, num_classes))


class _CentreOnBatch(nn.Module):
    """Subtracts the batch mean: no BatchNorm, but an example's output depends on the rest."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=0, keepdim=True)


def batch_mixing(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), _CentreOnBatch(),
                         nn.Linear(int(np.prod(input_shape)), num_classes))


def raises(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    raise RuntimeError("no GPU found")


def not_a_module(input_shape: tuple[int, ...], num_classes: int) -> object:
    return {"weights": [1, 2, 3]}


def wrong_outputs(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_classes + 1))


NOT_CALLABLE = 3

_RNG_SEED = 7
_CLASSES = ("low", "high")


def _records(count: int = 120) -> tuple[np.ndarray, np.ndarray]:
    """Two classes of 2-channel, 8-sample windows: "high" has a larger second channel."""
    rng = np.random.default_rng(_RNG_SEED)
    labels = rng.integers(0, 2, size=count)
    x = rng.normal(size=(count, 2, 8)).astype(np.float32)
    x[:, 1, :] += 3.0 * labels[:, None]
    return x, np.array([_CLASSES[k] for k in labels])


def windows() -> Dataset:
    """The good loader: records with a declared class list and standardisation."""
    x, y = _records()
    return Dataset(features=x, labels=y, classes=_CLASSES, feature_mean=0.0, feature_scale=2.0)


def windows_one_extreme() -> Dataset:
    """``windows`` with record 0 changed to extreme values (a neighbouring data set)."""
    x, y = _records()
    x[0] = 1e6
    return Dataset(features=x, labels=y, classes=_CLASSES, feature_mean=0.0, feature_scale=2.0)


def bare_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Arrays only: the class list must come from the peer config's [table]."""
    x, y = _records()
    return x, (y == "high").astype(np.int64)


def ragged() -> tuple[list[list[float]], list[int]]:
    return [[0.0, 1.0], [2.0], [3.0, 4.0]], [0, 1, 0]


def non_finite() -> Dataset:
    x, y = _records()
    x[5, 0, 3] = np.nan
    return Dataset(features=x, labels=y, classes=_CLASSES)


def unknown_label() -> Dataset:
    x, y = _records()
    y = y.astype("<U8")
    y[9] = "medium"
    return Dataset(features=x, labels=y, classes=_CLASSES)


def float_labels() -> tuple[np.ndarray, np.ndarray]:
    x, _y = _records()
    return x, np.linspace(0, 1, len(x))


def text_features() -> Dataset:
    _x, y = _records()
    return Dataset(features=np.array([["a"]] * len(y)), labels=y, classes=_CLASSES)


def loader_raises() -> Dataset:
    raise FileNotFoundError("/dev/sensor0")


def returns_none() -> None:
    return None
