"""Test accuracy baselines the gossip network is judged against, using the peer's own trainer.

For each data set: centralized non-private training on the whole training set, one peer's
standalone IID shard (1/8 of digits, 1/16 of Fashion-MNIST) without privacy, and DP-SGD on the
whole training set at epsilon = 1, 3, 8 (delta = 1e-5; noise chosen by the RDP accountant for
the planned number of steps). Digits rows average 5 independent runs (2 with --quick);
Fashion-MNIST rows are single runs. Every run goes through
peer.training.trainer.LocalTrainer with secure
noise and Poisson sampling, i.e. exactly what a peer runs. Wall time is per run.

    python bench/accuracy_bench.py [--quick] [--out FILE] [--datasets digits,fashion-mnist]

--quick: digits only with fewer epochs (< 60 s).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peer.training.data import Dataset, load_source
from peer.training.trainer import LocalTrainer, TrainerConfig

DELTA = 1e-5
EPSILONS = (1.0, 3.0, 8.0)


@dataclass(frozen=True)
class Plan:
    """Hyper-parameters for one data set (fixed, not tuned per epsilon)."""

    source: str
    model: str
    shard_fraction: float
    plain: TrainerConfig
    plain_epochs: int
    private: TrainerConfig
    private_epochs: int
    repeats: int  # independent runs per row (cheap data sets: average out the noise)


PLANS = {
    "digits": Plan(
        source="digits",
        model="mlp",
        shard_fraction=1 / 8,
        plain=TrainerConfig(model="mlp", dp=False, optimizer="adam", lr=0.01, batch_size=64),
        plain_epochs=40,
        private=TrainerConfig(
            model="mlp", optimizer="sgd", lr=1.0, momentum=0.5, batch_size=64,
            max_grad_norm=1.0, delta=DELTA, target_epsilon=1.0,
        ),
        private_epochs=10,
        repeats=5,
    ),
    "fashion-mnist": Plan(
        source="fashion-mnist",
        model="cnn",
        shard_fraction=1 / 16,
        plain=TrainerConfig(model="cnn", dp=False, optimizer="adam", lr=1e-3, batch_size=64),
        plain_epochs=3,
        private=TrainerConfig(
            model="cnn", optimizer="sgd", lr=4.0, momentum=0.9, batch_size=1024,
            max_grad_norm=0.1, delta=DELTA, target_epsilon=1.0,
        ),
        private_epochs=12,
        repeats=1,
    ),
}


def _iid_shard(train: Dataset, fraction: float, seed: int = 0) -> Dataset:
    order = np.random.default_rng(seed).permutation(len(train))
    return train.subset(np.sort(order[: round(len(train) * fraction)]))


def _run(
    label: dict,
    config: TrainerConfig,
    train: Dataset,
    test: Dataset,
    epochs: int,
    repeats: int = 1,
) -> dict:
    """Train ``repeats`` independent models (fresh secure noise each); mean and spread."""
    steps_per_epoch = max(1, math.ceil(len(train) / config.batch_size))
    accuracies, walls = [], []
    for repeat in range(repeats):
        run_config = replace(
            config,
            local_steps=steps_per_epoch,
            planned_rounds=epochs,
            checkpoint_every_round=False,
            seed=config.seed + repeat,
        )
        start = time.perf_counter()
        trainer = LocalTrainer(run_config, train, test.subset(np.arange(min(len(test), 500))))
        for _ in range(epochs):
            trainer.train_round()
        walls.append(time.perf_counter() - start)
        accuracies.append(100 * trainer.evaluate(test))
    row = {
        **label,
        "train_examples": len(train),
        "epochs": epochs,
        "repeats": repeats,
        "sigma": round(trainer.sigma, 4),
        "epsilon_spent": round(trainer.ledger.epsilon, 3) if config.dp else None,
        "test_accuracy_pct": round(float(np.mean(accuracies)), 2),
        "test_accuracy_std_pct": round(float(np.std(accuracies)), 2),
        "wall_s": round(float(np.mean(walls)), 1),
    }
    print(
        f"{row['dataset']:<14} {row['setting']:<12} {row['train_examples']:>6} "
        f"{row['epochs']:>3} {repeats:>3} {row['sigma']:>7} {row['epsilon_spent']!s:>7} "
        f"{row['test_accuracy_pct']:>7.2f} {row['test_accuracy_std_pct']:>5.2f} "
        f"{row['wall_s']:>7.1f}",
        flush=True,
    )
    return row


def run(dataset: str, quick: bool) -> list[dict]:
    plan = PLANS[dataset]
    train, test = load_source(plan.source)
    scale = 0.5 if quick else 1.0
    plain_epochs = max(1, round(plan.plain_epochs * scale))
    private_epochs = plan.private_epochs  # few epochs already; fewer would change sigma
    repeats = min(plan.repeats, 2) if quick else plan.repeats
    rows = [
        _run({"dataset": dataset, "setting": "centralized"}, plan.plain, train, test,
             plain_epochs, repeats),
        _run(
            {"dataset": dataset, "setting": f"shard_1/{round(1 / plan.shard_fraction)}"},
            plan.plain,
            _iid_shard(train, plan.shard_fraction),
            test,
            # same number of optimizer steps as centralized, spread over more epochs
            max(1, round(plain_epochs / plan.shard_fraction)),
            repeats,
        ),
    ]
    for eps in EPSILONS:
        config = replace(plan.private, target_epsilon=eps)
        rows.append(_run({"dataset": dataset, "setting": f"dp_eps_{eps:g}"}, config, train,
                         test, private_epochs, repeats))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits only, fewer epochs")
    parser.add_argument("--out", type=Path, help="write rows as JSON")
    parser.add_argument("--datasets", default="digits,fashion-mnist")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Optimal order")
    torch.set_num_threads(args.threads)
    datasets = ["digits"] if args.quick else args.datasets.split(",")
    print(f"{'dataset':<14} {'setting':<12} {'train':>6} {'ep':>3} {'rep':>3} {'sigma':>7} "
          f"{'eps':>7} {'acc %':>7} {'std':>5} {'wall s':>7}")
    rows: list[dict] = []
    for dataset in datasets:
        rows.extend(run(dataset, args.quick))
        if args.out:  # write as we go: the full run is long
            args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
