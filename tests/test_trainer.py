"""LocalTrainer: update shape, ledger-before-return, budget refusal, merges, threading."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from peer.training.dpsgd import VmapEngine
from peer.training.ledger import BudgetExhaustedError, PrivacyLedger
from peer.training.models import build_model, seeded_init
from peer.training.trainer import LocalTrainer, LocalUpdate, TrainerConfig, configure_torch_threads

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _flat(trainer: LocalTrainer) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])


def test_train_round_returns_valid_sparse_update(digits, tmp_path: Path) -> None:
    train, holdout, _ = digits
    cfg = TrainerConfig(model="mlp", local_steps=4, noise_multiplier=1.0, topk_fraction=0.02,
                        share="delta")
    trainer = LocalTrainer(cfg, train, holdout, tmp_path)
    assert trainer.model_id == "mlp-4810" and trainer.param_count == 4810
    update = trainer.train_round()
    assert isinstance(update, LocalUpdate)
    assert update.indices.dtype == np.uint32 and update.values.dtype == np.float32
    assert len(update.indices) == math.ceil(0.02 * 4810) == len(update.values)
    assert np.all(np.diff(update.indices.astype(np.int64)) > 0)
    assert np.all(np.isfinite(update.values)) and update.round == 1 and update.steps == 4
    # The ledger on disk already accounts for the update that was just returned.
    on_disk = PrivacyLedger.load(tmp_path / "ledger.json")
    assert on_disk.steps == 4 and on_disk.epsilon == update.epsilon > 0


def test_budget_refusal_before_training(digits) -> None:
    train, holdout, _ = digits
    cfg = TrainerConfig(model="mlp", local_steps=10, noise_multiplier=1.0, budget_epsilon=5.0)
    trainer = LocalTrainer(cfg, train, holdout)
    rounds = 0
    with pytest.raises(BudgetExhaustedError) as info:
        while True:
            trainer.train_round()
            rounds += 1
    assert rounds >= 1 and trainer.ledger.epsilon <= 5.0 < info.value.would_be
    before = _flat(trainer)
    with pytest.raises(BudgetExhaustedError):
        trainer.train_round()
    assert torch.equal(before, _flat(trainer))  # refused without a single private step
    assert trainer.ledger.steps == rounds * 10


def test_target_epsilon_sets_noise_and_budget(digits) -> None:
    train, holdout, _ = digits
    cfg = TrainerConfig(model="mlp", local_steps=5, target_epsilon=3.0, planned_rounds=4)
    trainer = LocalTrainer(cfg, train, holdout)
    assert trainer.ledger.budget_epsilon == 3.0 and trainer.sigma > 0
    for _ in range(4):
        trainer.train_round()
    assert 2.8 < trainer.ledger.epsilon <= 3.0
    with pytest.raises(BudgetExhaustedError):
        trainer.train_round()


def test_apply_update_adds_values_and_validates(digits) -> None:
    train, holdout, _ = digits
    trainer = LocalTrainer(TrainerConfig(model="mlp", dp=False), train, holdout)
    before = _flat(trainer)
    trainer.apply_update(np.array([1, 5, 4809], np.uint32), np.array([1.0, -2.0, 0.5], np.float32))
    delta = _flat(trainer) - before
    assert delta[1] == 1.0 and delta[5] == -2.0 and delta[4809] == 0.5
    assert int(torch.count_nonzero(delta)) == 3
    with pytest.raises(ValueError, match="out of range"):
        trainer.apply_update(np.array([4810]), np.array([1.0]))
    with pytest.raises(ValueError, match="finite"):
        trainer.apply_update(np.array([0]), np.array([np.inf]))
    with pytest.raises(ValueError, match="equal length"):
        trainer.apply_update(np.array([0, 1]), np.array([1.0]))


def test_merge_during_a_round_is_queued_and_not_reshared(digits) -> None:
    train, holdout, _ = digits
    cfg = TrainerConfig(model="mlp", dp=False, local_steps=3, topk_fraction=1.0, share="delta")
    trainer = LocalTrainer(cfg, train, holdout)
    with trainer.model_lock:  # as if a round were running in the worker thread
        before = _flat(trainer)
        trainer.apply_update(np.array([0]), np.array([100.0], np.float32))  # must not block
        assert torch.equal(before, _flat(trainer))
        assert trainer.pending_merges == 1
        trainer.apply_pending_merges()  # the round applies them between steps
        assert trainer.pending_merges == 0
    assert float(_flat(trainer)[0] - before[0]) == 100.0
    # A merge that lands inside a round is excluded from that round's own update.
    result: dict[str, LocalUpdate] = {}
    with trainer.model_lock:
        worker = threading.Thread(target=lambda: result.setdefault("u", trainer.train_round()))
        worker.start()
        trainer.apply_update(np.array([2]), np.array([50.0], np.float32))
    worker.join(timeout=60)
    update = result["u"]
    own = dict(zip(update.indices.tolist(), update.values.tolist(), strict=True))
    assert abs(own.get(2, 0.0)) < 10.0  # its own small step, not the 50.0 merge


def test_non_private_training_learns_digits(digits) -> None:
    train, holdout, test = digits
    cfg = TrainerConfig(model="mlp", dp=False, lr=0.5, local_steps=50)
    trainer = LocalTrainer(cfg, train, holdout)
    for _ in range(4):
        update = trainer.train_round()
    assert update.epsilon == math.inf
    assert trainer.evaluate() > 0.85 and trainer.evaluate(test) > 0.85
    assert math.isnan(trainer.evaluate(test.subset([])))


def test_private_training_learns_digits(digits) -> None:
    train, holdout, test = digits
    cfg = TrainerConfig(model="mlp", lr=1.0, local_steps=50, noise_multiplier=1.0,
                        max_grad_norm=1.0)
    trainer = LocalTrainer(cfg, train, holdout)
    for _ in range(4):
        trainer.train_round()
    assert trainer.evaluate(test) > 0.7


def test_train_round_from_worker_thread_and_config_errors(digits) -> None:
    train, holdout, _ = digits
    configure_torch_threads(torch.get_num_threads())
    trainer = LocalTrainer(TrainerConfig(model="mlp", noise_multiplier=1.2), train, holdout)
    out: list[LocalUpdate] = []
    worker = threading.Thread(target=lambda: out.append(trainer.train_round()))
    worker.start()
    worker.join(timeout=60)
    assert out and out[0].round == 1
    with pytest.raises(ValueError, match="noise_multiplier or target_epsilon"):
        TrainerConfig(dp=True).validate()
    with pytest.raises(ValueError, match="fraction"):
        TrainerConfig(dp=False, topk_fraction=0).validate()
    with pytest.raises(ValueError):
        configure_torch_threads(0)


def test_averaging_tail_goes_on_after_the_plan_without_spending(digits) -> None:
    train, holdout, _ = digits
    cfg = TrainerConfig(model="mlp", local_steps=2, noise_multiplier=1.0, planned_rounds=3,
                        averaging_rounds=1, budget_epsilon=50.0)
    trainer = LocalTrainer(cfg, train, holdout)
    private = [trainer.train_round() for _ in range(2)]
    assert [u.steps for u in private] == [2, 2]
    spent = trainer.ledger.epsilon
    tail = [trainer.train_round() for _ in range(3)]  # the tail's round, then past the plan
    assert [u.steps for u in tail] == [0, 0, 0]
    assert [u.round for u in tail] == [3, 4, 5]
    assert trainer.ledger.epsilon == spent == tail[-1].epsilon
    assert tail[-1].indices.size == trainer.param_count  # the tail shares the whole model


class ZeroNoise:
    """A noise source that adds nothing: the noise-free twin of the test below."""

    secure = False

    def sample(self, n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.float32)


def test_noise_applied_by_a_trainer_matches_its_ledger_sigma(digits) -> None:
    """Two real trainers, same data and seed; one has a zero noise source (``noise=``).

    A full batch (q = 1) makes Poisson sampling take every record in both, so after one SGD
    step their parameters differ by exactly -lr * (noise sum) / (q N), whose coordinates are
    N(0, (sigma C lr / (q N))^2) with the sigma, C and q the ledger charges for. 4 810
    coordinates estimate the std to about 1 %: the 10 % tolerance rejects half the noise (or
    none, e.g. a noise multiplier of 0 while the ledger still charges epsilon) by far.
    """
    train, holdout, _ = digits
    cfg = TrainerConfig(model="mlp", local_steps=1, noise_multiplier=0.7, max_grad_norm=0.5,
                        batch_size=len(train), lr=0.3, share="delta")
    noisy = LocalTrainer(cfg, train, holdout)
    twin = LocalTrainer(cfg, train, holdout, noise=ZeroNoise())
    assert torch.equal(_flat(noisy), _flat(twin))  # the same seeded start
    start = _flat(noisy)
    noisy.train_round()
    twin.train_round()
    ledger = noisy.ledger
    assert ledger.steps == 1 and ledger.sample_rate == 1.0 and ledger.epsilon > 0
    assert ledger.sigma == 0.7 and ledger.max_grad_norm == 0.5
    predicted = ledger.sigma * ledger.max_grad_norm * cfg.lr / (ledger.sample_rate * len(train))
    difference = (_flat(noisy) - _flat(twin)).double()
    assert abs(float(difference.std()) / predicted - 1) < 0.1
    assert abs(float(difference.mean())) < 0.1 * predicted
    assert stats.kstest((difference / predicted).numpy(), "norm").pvalue > 1e-6
    # The twin took exactly the clipped, noise-free step, computed here by the vmap reference.
    model = build_model("mlp", train.input_shape, train.num_classes)
    seeded_init(model, cfg.seed)
    clipped = VmapEngine(model).clipped_sum(torch.from_numpy(train.x),
                                            torch.from_numpy(train.y), cfg.max_grad_norm)
    expected = -cfg.lr * clipped.flat_sum / len(train)
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(_flat(twin) - start, expected, rtol=1e-3, atol=1e-7)
