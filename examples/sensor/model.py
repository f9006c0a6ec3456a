"""The sensor example's model: a small 1-D convolutional network over a window.

Two strided ``Conv1d`` layers with tanh, ``GroupNorm`` (it normalises each example on its own,
unlike BatchNorm, which DP-SGD cannot train), global average pooling over time and a linear
head. ``Conv1d`` is not a layer the fast per-example engine knows, so this model trains on
the general engine (torch.func); the status line says ``engine vmap``.
"""

from __future__ import annotations

from torch import nn


def build(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model for windows of shape (channels, samples) and ``num_classes`` states."""
    channels, _samples = input_shape
    return nn.Sequential(
        nn.Conv1d(channels, 16, kernel_size=7, stride=2, padding=3),
        nn.GroupNorm(4, 16),
        nn.Tanh(),
        nn.Conv1d(16, 32, kernel_size=5, stride=2, padding=2),
        nn.Tanh(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )
