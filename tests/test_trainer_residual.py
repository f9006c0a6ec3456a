"""The residual fill of a trainer's sharing strategy (fill / settle) in both share modes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from peer.training.trainer import LocalTrainer, TrainerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _flat(trainer: LocalTrainer) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()]).numpy()


def test_delta_mode_lends_and_settles_the_residual(digits) -> None:
    train, holdout, _ = digits
    cfg = TrainerConfig(model="mlp", dp=False, local_steps=3, topk_fraction=0.05, share="delta")
    trainer = LocalTrainer(cfg, train, holdout)
    update = trainer.train_round()
    residual = trainer.residual
    outside = np.setdiff1d(np.arange(trainer.param_count), update.indices)[:50]
    lent = trainer.sharing.fill(outside.astype(np.uint32))
    assert lent.dtype == np.float32 and lent.shape == outside.shape
    np.testing.assert_array_equal(lent, residual[outside])
    assert np.any(lent != 0.0)
    # Sent coordinates were zeroed by top-k: nothing to lend there.
    np.testing.assert_array_equal(trainer.sharing.fill(update.indices), 0.0)
    trainer.sharing.settle(outside, lent)
    np.testing.assert_array_equal(trainer.residual[outside], 0.0)
    untouched = np.setdiff1d(np.arange(trainer.param_count), outside)
    np.testing.assert_array_equal(trainer.residual[untouched], residual[untouched])


def test_model_mode_shares_displacement_from_common_init(digits) -> None:
    train, holdout, _ = digits
    cfg = TrainerConfig(model="mlp", dp=False, local_steps=3, topk_fraction=0.1, share="model")
    trainer = LocalTrainer(cfg, train, holdout)
    init = _flat(trainer).copy()
    twin = LocalTrainer(cfg, train, holdout)
    np.testing.assert_array_equal(_flat(twin), init)  # same seed, same starting point
    update = trainer.train_round()
    displacement = _flat(trainer) - init
    np.testing.assert_allclose(update.values, displacement[update.indices], atol=1e-6)
    # Top-k by magnitude of the displacement.
    smallest_sent = np.min(np.abs(update.values))
    outside = np.setdiff1d(np.arange(trainer.param_count), update.indices)
    assert np.max(np.abs(displacement[outside])) <= smallest_sent + 1e-7
    lent = trainer.sharing.fill(outside)
    np.testing.assert_allclose(lent, displacement[outside], atol=1e-6)
    trainer.sharing.settle(outside, lent)  # nothing is removed: it is still the model
    np.testing.assert_allclose(trainer.sharing.fill(outside), lent)
    # The snapshot is that of the last round, not live: a merge does not change it.
    trainer.apply_update(np.array([int(outside[0])]), np.array([0.5], dtype=np.float32))
    assert trainer.sharing.fill(outside[:1])[0] == pytest.approx(lent[0])


def test_residual_values_does_not_wait_for_a_running_round(digits) -> None:
    train, holdout, _ = digits
    trainer = LocalTrainer(TrainerConfig(model="mlp", dp=False), train, holdout)
    indices = np.arange(10, dtype=np.uint32)
    with trainer.model_lock:  # a round in progress holds the training lock
        result: list[np.ndarray] = []
        reader = threading.Thread(target=lambda: result.append(trainer.sharing.fill(indices)))
        reader.start()
        reader.join(timeout=5.0)
        assert not reader.is_alive()
    assert result and result[0].shape == (10,)


def test_bad_input_is_refused(digits) -> None:
    train, holdout, _ = digits
    trainer = LocalTrainer(TrainerConfig(model="mlp", dp=False), train, holdout)
    n = trainer.param_count
    with pytest.raises(ValueError):
        trainer.sharing.fill(np.array([n]))
    with pytest.raises(ValueError):
        trainer.sharing.fill(np.array([-1]))
    with pytest.raises(ValueError):
        trainer.sharing.fill(np.array([[0, 1]]))
    with pytest.raises(ValueError):
        trainer.sharing.fill(np.array([0.5]))
    with pytest.raises(ValueError):
        trainer.sharing.settle(np.array([0, 1]), np.array([1.0], dtype=np.float32))
    with pytest.raises(ValueError):
        trainer.sharing.settle(np.array([0]), np.array([np.nan], dtype=np.float32))
    with pytest.raises(ValueError):
        TrainerConfig(dp=False, share="gradients").validate()
    assert trainer.sharing.fill(np.array([], dtype=np.uint32)).shape == (0,)
