"""Model registry: shapes, parameter counts, no BatchNorm, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peer.training.models import MODEL_NAMES, ModelError, build_model, param_count


@pytest.mark.parametrize(
    ("name", "shape", "expected_params"),
    [("mlp", (64,), 4810), ("cnn", (1, 28, 28), 46490), ("cnn", (28, 28), 46490)],
)
def test_models_build_and_run(name: str, shape: tuple[int, ...], expected_params: int) -> None:
    model = build_model(name, shape, 10)
    assert param_count(model) == expected_params
    out = model(torch.zeros(3, *shape))
    assert out.shape == (3, 10)
    # Per-example clipping needs layers that never mix examples.
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_mlp_takes_tabular_and_image_shapes() -> None:
    model = build_model("mlp", (4, 3), 5)
    assert model(torch.zeros(2, 4, 3)).shape == (2, 5)


def test_registry_errors() -> None:
    assert set(MODEL_NAMES) == {"mlp", "cnn"}
    with pytest.raises(ModelError, match="unknown model"):
        build_model("resnet", (64,), 10)
    with pytest.raises(ModelError, match="28x28"):
        build_model("cnn", (1, 32, 32), 10)
    with pytest.raises(ModelError, match="image input"):
        build_model("cnn", (784,), 10)
    with pytest.raises(ModelError, match="2 classes"):
        build_model("mlp", (64,), 1)
