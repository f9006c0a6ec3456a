"""Scatter features stored as float16 (``feature_dtype``, the small profile) against float32.

One scatter peer (the real LocalTrainer: frozen ScatterNet features + a linear layer, DP-SGD
at target epsilon 3, delta 1e-5) on a Fashion-MNIST shard, tested on Fashion-MNIST test
images. The features are computed once (float32, the process-wide cache); a float16 run
stores the same features rounded to float16, so a pair of runs with the same seed differs
only by that rounding. ``insecure_fast_noise``: seeded noise and sampling so the pair is
comparable (an experiment, not a private run).

    python bench/feature_dtype_bench.py [--train 6000] [--test 2000] [--seeds 0,1] [--out F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peer.training.config import TrainerConfig
from peer.training.data import load_fashion_mnist, split_holdout
from peer.training.trainer import LocalTrainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=6000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train = load_fashion_mnist(train=True).subset(np.arange(args.train))
    test = load_fashion_mnist(train=False).subset(np.arange(args.test))
    own, holdout = split_holdout(train, 0.1, 0)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for dtype in ("float32", "float16"):
            config = TrainerConfig(model="scatter", lr=4.0, momentum=0.9, batch_size=256,
                                   local_steps=10, dp=True, target_epsilon=3.0,
                                   planned_rounds=args.rounds, max_grad_norm=0.1, seed=seed,
                                   insecure_fast_noise=True, feature_dtype=dtype)
            start = time.perf_counter()
            trainer = LocalTrainer(config, own, holdout)
            for _ in range(args.rounds):
                trainer.train_round()
            row = {"seed": seed, "feature_dtype": dtype, "train": len(own),
                   "test": args.test, "steps": args.rounds * config.local_steps,
                   "epsilon": round(float(trainer.epsilon or 0.0), 3),
                   "sigma": round(trainer.sigma, 4),
                   "test_accuracy": round(trainer.evaluate(test), 4),
                   "holdout_accuracy": round(trainer.evaluate(), 4),
                   "wall_s": round(time.perf_counter() - start, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
