"""Model registry for the local trainer, and the door to a user's own model.

A name with a colon, ``"package.module:factory"``, is a user's model factory
(:func:`is_user_model`; built and checked by peer/training/user_model.py). Every built-in
model here is built only from layers whose per-example gradients Murmur's DP-SGD engine
computes exactly (``nn.Linear``, ``nn.Conv2d``) plus parameter-free layers (activations,
pooling, flatten). There is deliberately no BatchNorm: it mixes examples within a batch, which
breaks per-example gradients and therefore per-example clipping (the basis of record-level DP).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from peer.errors import PeerError
from peer.training.config import MODEL_NAMES
from peer.training.import_path import is_user_model
from peer.training.user_model import build_user_model, choose_engine, user_model_base_id

__all__ = ["ModelError", "build_model", "is_user_model", "model_base_id", "param_count",
           "seeded_init", "split_frozen", "training_engine"]

log = logging.getLogger(__name__)


class ModelError(PeerError, ValueError):
    """Unknown model name or a model that does not fit the input shape."""


def _build_mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 64) -> nn.Module:
    """Two-layer MLP for flat or small inputs (8x8 digits, tabular sensor windows)."""
    in_features = math.prod(input_shape)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.Tanh(),
        nn.Linear(hidden, num_classes),
    )


def _build_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Small end-to-end CNN for 28x28 single-channel images (46 K parameters).

    Two strided convolutions with tanh and no normalisation or pooling. Strided 8x8 and 4x4
    convolutions with tanh follow what Tramèr & Boneh (ICLR 2021) found to work well under
    DP-SGD (few parameters, bounded activations). Pooling is left out because on CPU torch's
    stride-1 max/avg pooling cost more than both convolutions together (measured: a 26 K
    pooled variant took 10 ms per batch-64 step, this one 4.3 ms).
    """
    if len(input_shape) == 2:
        channels, height, width = 1, *input_shape
    elif len(input_shape) == 3:
        channels, height, width = input_shape
    else:
        raise ModelError(f"cnn needs image input (H, W) or (C, H, W), got shape {input_shape}")
    if (height, width) != (28, 28):
        raise ModelError(f"cnn is sized for 28x28 images, got {height}x{width}")
    return nn.Sequential(
        # (H, W) inputs get a channel axis; (C, H, W) inputs pass through.
        nn.Unflatten(1, (1, height)) if len(input_shape) == 2 else nn.Identity(),
        nn.Conv2d(channels, 16, kernel_size=8, stride=2, padding=3),  # -> 16 x 14 x 14
        nn.Tanh(),
        nn.Conv2d(16, 32, kernel_size=4, stride=2),  # -> 32 x 6 x 6
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(32 * 6 * 6, 32),
        nn.Tanh(),
        nn.Linear(32, num_classes),
    )


def _build_scatter(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """ScatterNet features (frozen) + one linear layer, as Tramèr & Boneh (ICLR 2021).

    The scattering transform (kymatio, J = 2: 81 channels of 7x7 for a 28x28 image) and its
    per-example GroupNorm have no trainable parameters and act on each example alone, so the
    DP engine sees a single ``nn.Linear`` (39 700 parameters for 10 classes) and its
    per-example gradients stay exact. kymatio is imported only when this model is built.
    """
    if len(input_shape) == 2:
        channels, height, width = 1, *input_shape
    elif len(input_shape) == 3:
        channels, height, width = input_shape
    else:
        raise ModelError(f"scatter needs image input (H, W) or (C, H, W), got {input_shape}")
    if height < 8 or width < 8:
        raise ModelError(f"scatter needs images of at least 8x8, got {height}x{width}")
    from peer.training.features import ScatterFeatures

    features = ScatterFeatures((height, width), in_channels=channels)
    return nn.Sequential(
        nn.Unflatten(1, (1, height)) if len(input_shape) == 2 else nn.Identity(),
        features,
        nn.Flatten(),
        nn.Linear(features.out_features, num_classes),
    )


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build a registered model, or a user's (``"package.module:factory"``; checked, and
    ModelFactoryError when DP-SGD cannot train it), for inputs of ``input_shape`` (without
    the batch dimension)."""
    if num_classes < 2:
        raise ModelError(f"need at least 2 classes, got {num_classes}")
    if is_user_model(name):
        model = build_user_model(name, tuple(input_shape), num_classes)
    elif name == "mlp":
        model = _build_mlp(tuple(input_shape), num_classes)
    elif name == "cnn":
        model = _build_cnn(tuple(input_shape), num_classes)
    elif name == "scatter":
        model = _build_scatter(tuple(input_shape), num_classes)
    else:
        raise ModelError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    log.info("built model %s: %d parameters", name, param_count(model))
    return model


def model_base_id(name: str, model: nn.Module) -> str:
    """The model id's base before the sharing mode decorates it: the name and parameter count
    of a built-in model, the factory's name, architecture digest and count of a user's."""
    if is_user_model(name):
        return user_model_base_id(name, model, param_count(model))
    return f"{name}-{param_count(model)}"


def training_engine(name: str, model: nn.Module, input_shape: tuple[int, ...],
                    requested: str) -> str:
    """The DP engine setting to build (dpsgd.make_engine): ``requested`` for a built-in model;
    for a user's, the engine that computes its per-example gradients exactly."""
    if is_user_model(name):
        return choose_engine(model, tuple(input_shape), requested, name)
    return requested


def split_frozen(model: nn.Module) -> tuple[nn.Module | None, nn.Module]:
    """(frozen prefix, trainable rest) of ``model``; (None, model) if it has no frozen prefix.

    The prefix is the longest leading run of parameter-free layers of a ``nn.Sequential``
    that contains a fixed feature extractor (a module with ``frozen_features = True``, e.g.
    :class:`peer.training.features.ScatterFeatures`): for "scatter" that is unflatten +
    scattering + flatten, and the rest is the linear head. Both share the model's modules, so
    ``model(x) == rest(prefix(x))`` and the rest's parameters are the model's trainable
    parameters, in the same order. Every layer of the prefix acts on each example alone, so
    the per-example gradients of the rest on precomputed features are the model's.
    """
    if not isinstance(model, nn.Sequential):
        return None, model
    end = 0
    has_extractor = False
    for index, module in enumerate(model):
        if any(True for _ in module.parameters()):
            break
        if getattr(module, "frozen_features", False):
            has_extractor = True
            end = index + 1
        elif has_extractor:
            end = index + 1  # parameter-free layers after the extractor (flatten) join it
    if not has_extractor:
        return None, model
    prefix, rest = model[:end], model[end:]
    assert not any(True for _ in prefix.parameters()), "a frozen prefix has no parameters"
    assert len(rest) > 0 and any(p.requires_grad for p in rest.parameters()), (
        "the rest of a split model must hold its trainable parameters")
    return prefix, rest


def param_count(model: nn.Module) -> int:
    """Number of trainable scalar parameters (the length of the flat update vector)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def seeded_init(model: nn.Module, seed: int) -> None:
    """Deterministic PyTorch-default-style init from a local generator (no global RNG): every
    peer of a network starts from the same weights for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            # ConvNd: a user's model may hold Conv1d / Conv3d (built-in ones hold Conv2d).
            if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                module.weight.uniform_(-bound, bound, generator=generator)
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=generator)


def configure_torch_threads(threads: int) -> None:
    """Set torch's intra-op thread count (process-wide: call once, from the main thread).

    Several peers in one process should use 1 each, or the cores thrash.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
