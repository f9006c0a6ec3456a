"""What a trainer keeps of its records (LocalTrainer.data_held, peer/training/held_data.py).

With a frozen prefix ("scatter") the raw records are featurised at construction and not kept:
the read-out reports features and labels only, the caller's raw arrays are freed once the
caller drops them, and training, hold-out evaluation, checkpoints and resume still work. A
model without a prefix reads the records directly, so it keeps them (as views, not copies).
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from peer.training.data import Dataset, load_source, split_holdout_consuming
from peer.training.features import scatter_channels
from peer.training.held_data import EvalSet, HeldData, count_held
from peer.training.trainer import LocalTrainer, TrainerConfig

if TYPE_CHECKING:
    from tests.conftest import Digits

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

FEATURES = scatter_channels() * 7 * 7  # ScatterNet J=2 on 28x28: 81 channels of 7x7


def _images_28(n: int) -> Dataset:
    """Digits (8x8) upsampled x3 and padded to 28x28, as one loaded source (fresh arrays)."""
    digits, _test = load_source("digits")
    images = digits.x[:n].reshape(n, 8, 8)
    big = np.pad(np.kron(images, np.ones((3, 3), dtype=np.float32)), ((0, 0), (2, 2), (2, 2)))
    return Dataset(x=big.astype(np.float32), y=digits.y[:n].copy(), num_classes=10,
                   name="digits-28")


def _scatter(dtype: str = "float32") -> TrainerConfig:
    return TrainerConfig(model="scatter", local_steps=2, batch_size=32, noise_multiplier=1.0,
                         max_grad_norm=0.1, lr=2.0, momentum=0.5, dp=True, feature_dtype=dtype)


@pytest.mark.parametrize(("dtype", "itemsize"), [("float32", 4), ("float16", 2)])
def test_a_scatter_trainer_holds_features_and_labels_never_the_raw_images(
        tmp_path: Path, dtype: str, itemsize: int) -> None:
    # The peer's path (peer/assembly.py): one loaded source, split in place into two views.
    source = _images_28(150)
    train, holdout = split_holdout_consuming(source, 0.2, seed=0)
    images = weakref.ref(source.x)  # the one buffer both parts are views of
    raw_bytes = source.x.nbytes
    trainer = LocalTrainer(_scatter(dtype), train, holdout, tmp_path)
    held = trainer.data_held
    assert held == HeldData(raw_bytes=0, feature_bytes=150 * FEATURES * itemsize,
                            label_bytes=150 * 8)
    assert held.total_bytes == held.feature_bytes + 150 * 8
    del source, train, holdout
    gc.collect()
    still_referenced = images() is not None
    assert not still_referenced, f"{raw_bytes} bytes of raw images still referenced"

    # Training, hold-out evaluation and checkpoints run on what is held.
    assert trainer.train_round().round == 1
    accuracy = trainer.evaluate()
    assert 0.0 <= accuracy <= 1.0
    trainer.save_checkpoint()
    assert trainer.data_held == held


def test_the_held_holdout_scores_as_the_raw_holdout_and_resume_continues(
        tmp_path: Path) -> None:
    source = _images_28(150)
    train, holdout = split_holdout_consuming(source, 0.2, seed=0)
    trainer = LocalTrainer(_scatter(), train, holdout, tmp_path)
    for _ in range(3):
        trainer.train_round()
    # The default hold-out (features made at construction) and the same records passed in
    # (featurised batch by batch) give the same accuracy.
    assert trainer.evaluate() == trainer.evaluate(holdout)
    trainer.save_checkpoint()

    again = _images_28(150)
    resumed = LocalTrainer(_scatter(), *split_holdout_consuming(again, 0.2, seed=0), tmp_path)
    assert resumed.round == 3 and resumed.epsilon == trainer.epsilon
    np.testing.assert_array_equal(resumed.parameter_vector(), trainer.parameter_vector())
    assert resumed.evaluate() == trainer.evaluate()
    assert resumed.data_held.raw_bytes == 0
    assert resumed.train_round().round == 4


def test_a_model_without_a_frozen_prefix_holds_its_records_as_views(
        digits: Digits) -> None:
    train, holdout = digits.train, digits.holdout
    trainer = LocalTrainer(TrainerConfig(model="mlp", local_steps=1, dp=False), train, holdout)
    assert trainer.data_held == HeldData(raw_bytes=train.x.nbytes + holdout.x.nbytes,
                                         feature_bytes=0,
                                         label_bytes=train.y.nbytes + holdout.y.nbytes)
    assert trainer.evaluate() == trainer.evaluate(holdout)


def test_count_held_counts_each_buffer_once_and_whole() -> None:
    x = torch.zeros(10, 4)  # 160 bytes
    y = torch.zeros(10, dtype=torch.int64)  # 80 bytes
    part = torch.zeros(3, 4)[1:2]  # a view keeps its whole 48-byte buffer alive
    held = count_held([x, x, x[:5], part, None], [y, y], featurised=True)
    assert held == HeldData(raw_bytes=0, feature_bytes=160 + 48, label_bytes=80)
    assert count_held([x], [y], featurised=False).raw_bytes == 160
    with pytest.raises(ValueError, match="10 input rows but 9 labels"):
        EvalSet(x, y[:9])
