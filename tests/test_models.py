"""Model registry: shapes, parameter counts, no BatchNorm, clear errors.

kymatio (the scatter model) is a hard dependency (pyproject.toml): it is imported plainly and its
tests never skip, so a broken install fails here instead of hiding.
"""

from __future__ import annotations

import pytest
import torch
from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
from torch import nn

from peer.training.models import MODEL_NAMES, ModelError, build_model, param_count, split_frozen


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


@pytest.mark.parametrize(("name", "shape"), [("mlp", (64,)), ("cnn", (28, 28))])
def test_models_without_frozen_prefix_are_not_split(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(name, shape, 10)
    prefix, rest = split_frozen(model)
    assert prefix is None and rest is model


def test_scatter_prefix_runs_kymatios_scattering_transform() -> None:
    prefix, _ = split_frozen(build_model("scatter", (28, 28), 10))
    assert prefix is not None
    assert any(isinstance(module, ScatteringTorch2D) for module in prefix.modules())


def test_scatter_splits_into_frozen_features_and_linear_head() -> None:
    model = build_model("scatter", (28, 28), 10)
    prefix, rest = split_frozen(model)
    assert prefix is not None and len(prefix) == 3 and len(rest) == 1
    assert isinstance(rest[0], nn.Linear) and rest[0] is model[-1]
    assert not any(True for _ in prefix.parameters())
    assert param_count(rest) == param_count(model)
    x = torch.rand(2, 28, 28)
    with torch.no_grad():
        assert prefix(x).shape == (2, 81 * 7 * 7)
        torch.testing.assert_close(rest(prefix(x)), model(x), rtol=0, atol=0)


def test_mlp_takes_tabular_and_image_shapes() -> None:
    model = build_model("mlp", (4, 3), 5)
    assert model(torch.zeros(2, 4, 3)).shape == (2, 5)


def test_registry_errors() -> None:
    assert set(MODEL_NAMES) == {"mlp", "cnn", "scatter"}
    with pytest.raises(ModelError, match="unknown model"):
        build_model("resnet", (64,), 10)
    with pytest.raises(ModelError, match="28x28"):
        build_model("cnn", (1, 32, 32), 10)
    with pytest.raises(ModelError, match="image input"):
        build_model("cnn", (784,), 10)
    with pytest.raises(ModelError, match="2 classes"):
        build_model("mlp", (64,), 1)


def test_scatter_model_has_only_linear_parameters() -> None:
    for shape in ((1, 28, 28), (28, 28)):
        model = build_model("scatter", shape, 10)
        assert param_count(model) == 81 * 7 * 7 * 10 + 10  # 3969 frozen features -> 10
        owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
        assert len(owners) == 1 and isinstance(owners[0], nn.Linear)
        assert all(not b.requires_grad for b in model.buffers())
        assert model(torch.rand(3, *shape)).shape == (3, 10)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_scatter_features_are_per_example() -> None:
    model = build_model("scatter", (1, 28, 28), 10)
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_scatter_dp_gradients_match_references() -> None:
    """Murmur's fast engine on the whole scatter model == vmap on its linear head.

    vmap cannot run through kymatio itself (its torch rfft writes in place into a
    non-batched tensor), but the frozen features make the head's per-example gradients the
    model's, so the head on precomputed features is the vmap reference; a plain loop of
    single-example backward passes through the whole model checks the same sum independently.
    """
    from peer.training.dpsgd import GhostClipEngine, VmapEngine, clip_factors

    torch.manual_seed(0)
    model = build_model("scatter", (1, 28, 28), 10)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(10, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (10,), generator=gen)
    fast = GhostClipEngine(model).clipped_sum(x, y, 0.7)

    head = model[-1]
    with torch.no_grad():
        features = model[:-1](x)
    reference = VmapEngine(head).clipped_sum(features, y, 0.7)
    torch.testing.assert_close(fast.per_example_norms, reference.per_example_norms,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.flat_sum, reference.flat_sum, rtol=1e-4, atol=1e-6)

    rows = []
    for i in range(len(y)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    per_example = torch.stack(rows)
    loop_sum = per_example.t().mv(clip_factors(per_example.norm(dim=1), 0.7))
    torch.testing.assert_close(fast.flat_sum, loop_sum, rtol=1e-4, atol=1e-6)
