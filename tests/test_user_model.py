"""A model of the user's own (``model = "package.module:factory"``): the checks before a peer
joins, the engine it trains on, and the model id that keeps different models apart."""

from __future__ import annotations

import numpy as np
import pytest

from peer.training.config import TrainerConfig
from peer.training.data import Dataset
from peer.training.import_path import ImportPathError, is_user_model
from peer.training.models import build_model
from peer.training.trainer import LocalTrainer
from peer.training.user_model import ModelFactoryError

F = "tests.user_factories"


def _data(shape: tuple[int, ...], count: int = 64, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(x=rng.normal(size=(count, *shape)).astype(np.float32),
                   y=rng.integers(0, 3, size=count), num_classes=3, name="synthetic")


def _trainer(model: str, shape: tuple[int, ...], **changes: object) -> LocalTrainer:
    config = TrainerConfig(model=model, noise_multiplier=1.0, batch_size=16, local_steps=2,
                           planned_rounds=3, **changes)  # type: ignore[arg-type]
    return LocalTrainer(config, _data(shape), _data(shape, 16, seed=1))


def test_is_user_model_tells_import_paths_from_built_in_names() -> None:
    assert [is_user_model(n) for n in ("mlp", "cnn", "scatter", "pkg.mod:build", "m:f")] == [
        False, False, False, True, True]


@pytest.mark.parametrize(("name", "words"), [
    ("raises", ["raised RuntimeError", "no GPU found"]),
    ("not_a_module", ["returned a dict", "not a torch.nn.Module"]),
    ("batchnorm", ["BatchNorm1d", "per-example gradients are not defined", "GroupNorm"]),
    ("batch_mixing", ["depends on the others"]),
    ("wrong_outputs", ["expected logits of shape (2, 3)"]),
    ("NOT_CALLABLE", ["not callable"]),
    ("missing", ["has no 'missing'"]),
])
def test_a_factory_that_cannot_be_trained_gets_a_typed_error_naming_the_reason(
        name: str, words: list[str]) -> None:
    with pytest.raises(ModelFactoryError) as caught:
        build_model(f"{F}:{name}", (2, 8), 3)
    assert all(word in str(caught.value) for word in words), str(caught.value)


def test_a_factory_whose_module_does_not_import_names_the_module() -> None:
    with pytest.raises(ModelFactoryError, match=r"cannot import module 'no_such_package\.models'"):
        build_model("no_such_package.models:build", (2, 8), 3)


def test_a_malformed_import_path_is_refused_by_the_config_check_before_torch() -> None:
    with pytest.raises(ImportPathError, match="not an import path"):
        TrainerConfig(model="pkg.mod:", noise_multiplier=1.0).validate()
    TrainerConfig(model="pkg.mod:build", noise_multiplier=1.0).validate()  # well formed


def test_a_trainer_refuses_batchnorm_before_it_builds_anything_else() -> None:
    with pytest.raises(ModelFactoryError, match="GroupNorm"):
        _trainer(f"{F}:batchnorm", (2, 8))


@pytest.mark.parametrize(("name", "engine"), [
    ("linear", "ghost"), ("conv1d", "vmap"), ("reused_layer", "vmap")])
def test_the_trainer_reports_the_engine_its_model_needs(name: str, engine: str) -> None:
    trainer = _trainer(f"{F}:{name}", (2, 8))
    assert trainer.engine == engine
    update = trainer.train_round()
    assert update.steps == 2 and np.isfinite(update.values).all()


def test_the_fast_engine_is_refused_for_a_layer_that_runs_twice() -> None:
    with pytest.raises(ModelFactoryError, match="needs the general engine"):
        _trainer(f"{F}:reused_layer", (2, 8), engine="ghost")


def test_the_model_id_carries_the_architecture_and_the_initial_weights() -> None:
    shape = (2, 8)
    first, again = _trainer(f"{F}:linear", shape), _trainer(f"{F}:linear", shape)
    same_count = _trainer(f"{F}:linear_relu", shape)
    other_seed = _trainer(f"{F}:linear", shape, seed=5)
    assert first.param_count == same_count.param_count
    assert first.model_id == again.model_id
    assert len({first.model_id, same_count.model_id, other_seed.model_id}) == 3
    assert first.model_id.startswith("linear-") and len(first.model_id) <= 128
