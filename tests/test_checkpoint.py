"""Checkpoints: atomic, restored into an equal state, intact after SIGKILL mid-run."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from peer.files import STALE_TEMP_AGE_S, atomic_write_bytes
from peer.training.checkpoint import CheckpointError, load_checkpoint
from peer.training.ledger import LedgerError, PrivacyLedger
from peer.training.trainer import LocalTrainer, TrainerConfig
from tests.test_ledger import run_and_kill

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

CONFIG = TrainerConfig(model="mlp", local_steps=5, noise_multiplier=1.0, lr=0.2, momentum=0.9,
                       share="delta")  # error feedback: the residual is checkpointed state


def _assert_same_state(a: LocalTrainer, b: LocalTrainer) -> None:
    for (name_a, ta), (name_b, tb) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert name_a == name_b
        torch.testing.assert_close(ta, tb, rtol=0, atol=0)
    opt_a, opt_b = a.optimizer_state(), b.optimizer_state()
    assert opt_a["kind"] == opt_b["kind"]
    buffers_a, buffers_b = opt_a["momentum_buffers"], opt_b["momentum_buffers"]
    assert (buffers_a is None) == (buffers_b is None)
    for buffer_a, buffer_b in zip(buffers_a or [], buffers_b or [], strict=True):
        torch.testing.assert_close(buffer_a, buffer_b, rtol=0, atol=0)
    np.testing.assert_array_equal(a.residual, b.residual)
    assert a.round == b.round
    assert a.ledger == b.ledger


def test_save_and_restore_gives_equal_state(tmp_path: Path, digits) -> None:
    train, hold, _ = digits
    first = LocalTrainer(CONFIG, train, hold, tmp_path)
    for _ in range(3):
        first.train_round()
    first.apply_update(np.array([0, 7], dtype=np.uint32), np.array([0.5, -0.25], np.float32))
    first.save_checkpoint()
    second = LocalTrainer(CONFIG, train, hold, tmp_path)
    _assert_same_state(first, second)
    assert np.count_nonzero(second.residual) > 0  # error feedback state really came back
    assert first.evaluate() == second.evaluate()


def test_checkpoint_intact_after_sigkill_and_restored_exactly(tmp_path: Path, digits) -> None:
    lines = run_and_kill(tmp_path, min_rounds=4)
    last_round = lines[-1]["round"]
    saved = load_checkpoint(tmp_path / "checkpoint.pt")  # never torn: loads cleanly
    assert saved.round in (last_round, last_round + 1)
    ledger_file = PrivacyLedger.load(tmp_path / "ledger.json")
    in_checkpoint = PrivacyLedger.from_json(saved.ledger_json)
    assert ledger_file.steps >= in_checkpoint.steps  # the ledger is written first
    train, hold, _ = digits
    restored = LocalTrainer(CONFIG, train, hold, tmp_path)
    assert restored.round == saved.round
    for name, tensor in restored.model.state_dict().items():
        torch.testing.assert_close(tensor, saved.model_state[name], rtol=0, atol=0)
    np.testing.assert_array_equal(restored.residual, saved.residual)
    assert restored.ledger.steps == ledger_file.steps
    assert restored.ledger.epsilon == ledger_file.epsilon
    # A temporary file may remain if the kill hit mid-write; it is never the live file.
    live = {p for p in os.listdir(tmp_path) if not p.endswith(".tmp")}
    assert live == {"checkpoint.pt", "ledger.json"}


def test_corrupt_or_foreign_checkpoint_is_an_error(tmp_path: Path, digits) -> None:
    train, hold, _ = digits
    trainer = LocalTrainer(CONFIG, train, hold, tmp_path)
    trainer.train_round()
    path = tmp_path / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)
    path.write_bytes(data)
    ledger_bytes = (tmp_path / "ledger.json").read_bytes()
    (tmp_path / "ledger.json").unlink()
    with pytest.raises(LedgerError, match="ledger missing"):
        LocalTrainer(CONFIG, train, hold, tmp_path)
    (tmp_path / "ledger.json").write_bytes(ledger_bytes)
    other = TrainerConfig(model="mlp", local_steps=5, noise_multiplier=1.0, delta=1e-6,
                          share="delta")
    with pytest.raises(LedgerError, match="delta"):
        LocalTrainer(other, train, hold, tmp_path)
    wrong_model_dir = tmp_path / "cnn"
    wrong_model_dir.mkdir()
    (wrong_model_dir / "checkpoint.pt").write_bytes(data)
    images = train.subset(np.arange(40))
    images.x = np.zeros((40, 1, 28, 28), dtype=np.float32)
    cnn_cfg = TrainerConfig(model="cnn", local_steps=1, noise_multiplier=1.0)
    with pytest.raises(LedgerError, match="checkpoint is for mlp"):
        LocalTrainer(cnn_cfg, images, images, wrong_model_dir)


def test_stale_temp_files_from_a_killed_writer_are_removed(tmp_path: Path) -> None:
    """A temp file left by a kill mid-write is deleted on the next write; a fresh one is not
    (it may belong to a writer in progress)."""

    target = tmp_path / "ledger.json"
    stale = tmp_path / ".ledger.json.abc123.tmp"
    fresh = tmp_path / ".ledger.json.def456.tmp"
    stale.write_bytes(b"x" * 1000)
    fresh.write_bytes(b"y")
    old = time.time() - STALE_TEMP_AGE_S - 10
    os.utime(stale, (old, old))
    atomic_write_bytes(target, b"{}")
    assert target.read_bytes() == b"{}"
    assert not stale.exists()
    assert fresh.exists()
