"""ScatterNet features + a linear model against Murmur's CNN, both under Murmur's DP-SGD.

Tramèr & Boneh (ICLR 2021) report 89.7 % on Fashion-MNIST at epsilon = 3 with ScatterNet
(J = 2) features + a linear model trained with DP-SGD, above every end-to-end CNN. This checks
that claim with Murmur's own engine, centralized on all 60 000 training images (test: the
10 000 test images):

* features: kymatio's 2-D scattering (J = 2, L = 8: 81 x 7 x 7 = 3969 per image), normalised
  per example (GroupNorm without affine parameters, 27 groups): data-independent, so they are
  computed once and cost no privacy;
* both models are trained with peer.training.dpsgd.DPSGDStep (exact per-example clipping,
  secure Gaussian noise, secure Poisson sampling) and peer.training.optim.SGD with momentum;
  sigma comes from Murmur's RDP accountant for the planned steps at (epsilon, delta=1e-5);
* a child process measures what a peer would pay: import kymatio, build the transform and
  compute the features of a peer-sized shard (4000 images) in chunks: peak RSS and ms/image,
  beside the same child without the transform.

Hyper-parameters follow Tramèr & Boneh (C = 0.1, momentum 0.9, large batch, large lr); the
lr is a small grid and every run is a row (picking the best on the test set is optimistic,
as in the paper's grid). Epoch counts are scaled down to fit a 2-core CPU budget.

    python bench/scatter_bench.py [--quick] [--out FILE] [--threads 2]

--quick: 6000 training / 2000 test images, few epochs (< 60 s).

    python bench/scatter_bench.py --trainer-round [--no-cache] [--shard 4000]

--trainer-round: what one peer pays with the real LocalTrainer (DP on, batch 64, 10 local
steps, C = 0.1, lr 2, momentum 0.5) on a Fashion-MNIST shard: construction (which computes the
shard's features once through peer.training.features' cache), ms per private step over two
rounds, evaluation of the hold-out and of 1000 test images (first, then cached).
--no-cache runs the same trainer without the frozen split (the scattering transform is
recomputed in every step and every evaluation: the behaviour before the feature cache).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peer.training.data import load_fashion_mnist
from peer.training.dpsgd import DPSGDStep, poisson_batch
from peer.training.models import build_model, param_count, seeded_init
from peer.training.optim import SGD
from peer.training.privacy.accountant import DEFAULT_ACCOUNTANT, sigma_for
from peer.training.privacy.accountant import epsilon as dp_epsilon

DELTA = 1e-5
CLIP = 0.1
MOMENTUM = 0.9


def _peak_rss_mb() -> float:
    """VmHWM of this process (ru_maxrss would carry the parent's peak over fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(images: int, scatter: bool, threads: int) -> dict:
    """Run in a fresh process: peak RSS of loading a shard (+ kymatio and its features)."""
    torch.set_num_threads(threads)
    test = load_fashion_mnist(train=False)
    shard = torch.from_numpy(test.x[:images].copy())
    del test
    result = {"images": images, "scatter": scatter}
    if scatter:
        start = time.perf_counter()
        from peer.training.features import ScatterFeatures, compute_features

        module = ScatterFeatures((28, 28))
        result["import_build_s"] = round(time.perf_counter() - start, 2)
        compute_features(module, shard[:64])  # warm-up
        start = time.perf_counter()
        features = compute_features(module, shard)
        result["feature_ms_per_image"] = round(
            (time.perf_counter() - start) * 1000 / images, 3)
        result["feature_dim"] = int(features.shape[1])
        result["feature_mb"] = round(features.numel() * 4 / 2**20, 1)
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return result


def _run_child(images: int, scatter: bool, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--rss-child", str(images), "--threads", str(threads)]
    if not scatter:
        cmd.append("--no-scatter")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_dp(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    target_epsilon: float,
    batch_size: int,
    epochs: int,
    lr: float,
    accountant: str,
) -> dict:
    """DP-SGD with Murmur's engine: secure Poisson batches, secure noise, SGD + momentum."""
    n = len(y)
    q = batch_size / n
    steps = max(1, round(epochs / q))
    sigma = sigma_for(target_epsilon, DELTA, q, steps, accountant)
    dp = DPSGDStep.build(model, noise_multiplier=sigma, max_grad_norm=CLIP,
                         expected_batch_size=q * n)
    opt = SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=MOMENTUM)
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        idx = poisson_batch(n, q)
        opt.zero_grad()
        dp.step(x.index_select(0, idx), y.index_select(0, idx))
        opt.step()
    return {
        "sigma": round(sigma, 4),
        "steps": steps,
        "accountant": accountant,
        "epsilon_spent": round(dp_epsilon(steps, sigma, q, DELTA, accountant), 3),
        "epsilon_rdp": round(dp_epsilon(steps, sigma, q, DELTA, "rdp"), 3),
        "train_s": round(time.perf_counter() - start, 1),
    }


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(y), 1024):
        logits = model(x[start : start + 1024])
        correct += int((logits.argmax(1) == y[start : start + 1024]).sum())
    return 100.0 * correct / len(y)


def trainer_round(shard_size: int, cache: bool, threads: int) -> dict:
    """One scatter peer with the real LocalTrainer: build, two rounds, evaluations."""
    import numpy as np

    import peer.training.trainer as trainer_module
    from peer.training.config import TrainerConfig
    from peer.training.data import split_holdout
    from peer.training.features import clear_feature_caches

    if not cache:  # the trainer as it was: the whole model in every step and evaluation
        trainer_module.split_frozen = lambda model: (None, model)
    clear_feature_caches()
    train, test = load_fashion_mnist(train=True), load_fashion_mnist(train=False)
    shard = train.subset(np.arange(shard_size))
    own, holdout = split_holdout(shard, 0.1, 0)
    config = TrainerConfig(model="scatter", lr=2.0, momentum=0.5, batch_size=64,
                           local_steps=10, dp=True, target_epsilon=3.0, planned_rounds=20,
                           max_grad_norm=CLIP)
    result: dict = {"cache": cache, "train": len(own), "holdout": len(holdout),
                    "threads": threads, "local_steps": config.local_steps,
                    "batch_size": config.batch_size}
    start = time.perf_counter()
    trainer = trainer_module.LocalTrainer(config, own, holdout)
    result["build_s"] = round(time.perf_counter() - start, 2)
    for name in ("round1_ms_per_step", "round2_ms_per_step"):
        start = time.perf_counter()
        trainer.train_round()
        result[name] = round((time.perf_counter() - start) * 1000 / config.local_steps, 1)
    start = time.perf_counter()
    trainer.evaluate()
    result["eval_holdout_s"] = round(time.perf_counter() - start, 3)
    sample = test.subset(np.arange(1000))
    for name in ("eval_test1000_first_s", "eval_test1000_again_s"):
        start = time.perf_counter()
        result["test_accuracy"] = round(trainer.evaluate(sample), 4)
        result[name] = round(time.perf_counter() - start, 3)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--linear-lrs", default="4,8")
    parser.add_argument("--linear-batch", type=int, default=8192)
    parser.add_argument("--linear-epochs", type=int, default=40)
    parser.add_argument("--cnn-lr", type=float, default=4.0)
    parser.add_argument("--cnn-batch", type=int, default=1024)
    parser.add_argument("--cnn-epochs", type=int, default=5)
    parser.add_argument("--accountant", default=DEFAULT_ACCOUNTANT)
    parser.add_argument("--shard", type=int, default=4000, help="images in the RSS child")
    parser.add_argument("--trainer-round", action="store_true",
                        help="time one scatter peer's LocalTrainer (see above)")
    parser.add_argument("--no-cache", action="store_true",
                        help="with --trainer-round: without the frozen-feature split")
    parser.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-scatter", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Optimal order")
    if args.rss_child is not None:
        print(json.dumps(rss_child(args.rss_child, not args.no_scatter, args.threads)))
        return 0
    if args.trainer_round:
        row = trainer_round(args.shard, not args.no_cache, args.threads)
        print(json.dumps(row))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(row, indent=1) + "\n")
        return 0

    from peer.training.features import ScatterFeatures, compute_features

    if args.quick:
        args.linear_lrs, args.linear_batch, args.linear_epochs = "8", 2048, 8
        args.cnn_batch, args.cnn_epochs, args.shard = 512, 2, 1000
    train, test = load_fashion_mnist(train=True), load_fashion_mnist(train=False)
    n_train, n_test = (6000, 2000) if args.quick else (len(train), len(test))
    x_train = torch.from_numpy(train.x[:n_train].copy())
    y_train = torch.from_numpy(train.y[:n_train].copy())
    x_test = torch.from_numpy(test.x[:n_test].copy())
    y_test = torch.from_numpy(test.y[:n_test].copy())
    del train, test

    rows: list[dict] = []
    base = {"dataset": "fashion-mnist", "train_examples": n_train, "test_examples": n_test,
            "epsilon": args.epsilon, "delta": DELTA, "max_grad_norm": CLIP,
            "momentum": MOMENTUM, "threads": args.threads}

    shard = _run_child(args.shard, True, args.threads)
    shard_plain = _run_child(args.shard, False, args.threads)

    scatter = ScatterFeatures((28, 28))
    start = time.perf_counter()
    f_train = compute_features(scatter, x_train, chunk=1024)
    f_test = compute_features(scatter, x_test, chunk=1024)
    feature_s = time.perf_counter() - start
    feature_ms = 1000 * feature_s / (n_train + n_test)
    dim = f_train.shape[1]

    for lr in [float(v) for v in args.linear_lrs.split(",")]:
        head = nn.Linear(dim, 10)
        seeded_init(head, 0)
        stats = train_dp(head, f_train, y_train, target_epsilon=args.epsilon,
                         batch_size=args.linear_batch, epochs=args.linear_epochs, lr=lr,
                         accountant=args.accountant)
        rows.append({**base, "model": "scatter+linear", "params": param_count(head),
                     "feature_dim": dim, "batch_size": args.linear_batch,
                     "epochs": args.linear_epochs, "lr": lr, **stats,
                     "accuracy_pct": round(accuracy(head, f_test, y_test), 2),
                     "feature_s_all": round(feature_s, 1),
                     "feature_ms_per_image": round(feature_ms, 3),
                     "shard_feature_ms_per_image": shard["feature_ms_per_image"],
                     "peak_rss_mb": shard["peak_rss_mb"],
                     "peak_rss_mb_without_scatter": shard_plain["peak_rss_mb"],
                     "shard_images": args.shard})
        _print_row(rows[-1])

    cnn = build_model("cnn", (1, 28, 28), 10)
    seeded_init(cnn, 0)
    stats = train_dp(cnn, x_train, y_train, target_epsilon=args.epsilon,
                     batch_size=args.cnn_batch, epochs=args.cnn_epochs, lr=args.cnn_lr,
                     accountant=args.accountant)
    rows.append({**base, "model": "cnn", "params": param_count(cnn), "feature_dim": 784,
                 "batch_size": args.cnn_batch, "epochs": args.cnn_epochs, "lr": args.cnn_lr,
                 **stats, "accuracy_pct": round(accuracy(cnn, x_test, y_test), 2),
                 "feature_ms_per_image": 0.0,
                 "peak_rss_mb": shard_plain["peak_rss_mb"], "shard_images": args.shard})
    _print_row(rows[-1])
    print(f"\nfeatures: dim {dim}, {feature_ms:.3f} ms/image over {n_train + n_test} images "
          f"({feature_s:.1f} s); peer shard of {args.shard}: {shard}; without scatter: "
          f"{shard_plain}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


_HEADER = False


def _print_row(row: dict) -> None:
    global _HEADER
    if not _HEADER:
        print(f"{'model':<15} {'eps':>4} {'batch':>6} {'ep':>3} {'lr':>5} {'steps':>5} "
              f"{'sigma':>7} {'acc %':>6} {'train s':>8} {'feat ms':>8} {'rss MB':>7}")
        _HEADER = True
    print(f"{row['model']:<15} {row['epsilon_spent']:>4.2f} {row['batch_size']:>6} "
          f"{row['epochs']:>3} {row['lr']:>5g} {row['steps']:>5} {row['sigma']:>7.3f} "
          f"{row['accuracy_pct']:>6.2f} {row['train_s']:>8.1f} "
          f"{row['feature_ms_per_image']:>8.3f} {row['peak_rss_mb']:>7.1f}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
