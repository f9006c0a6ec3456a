"""The Fashion-MNIST example's model: a user-defined CNN for 28x28 images.

Two convolutions with tanh and average pooling, then a linear head: every trainable layer is
a ``Conv2d`` or a ``Linear`` that runs once per forward pass, so it trains on the fast
per-example engine (the status line says ``engine ghost``). Data: Murmur's built-in
``fashion-mnist`` source (Debian's dataset-fashion-mnist package).
"""

from __future__ import annotations

from torch import nn


def build(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model for images of shape (1, 28, 28) and ``num_classes`` classes."""
    channels, height, width = input_shape
    if (height, width) != (28, 28):
        raise ValueError(f"this model is sized for 28x28 images, got {height}x{width}")
    return nn.Sequential(
        nn.Conv2d(channels, 8, kernel_size=5, stride=2, padding=2),  # -> 8 x 14 x 14
        nn.Tanh(),
        nn.AvgPool2d(2),  # -> 8 x 7 x 7
        nn.Conv2d(8, 16, kernel_size=3, padding=1),  # -> 16 x 7 x 7
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 32),
        nn.Tanh(),
        nn.Linear(32, num_classes),
    )
