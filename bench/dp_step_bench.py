"""Time one training step: plain SGD vs Murmur DP-SGD vs Opacus DP-SGD, same model and batch.

Methods are interleaved in every repeat (so background load on a shared machine hits them
alike); the median over repeats is reported, and the best repeat (least disturbed by other
load). Rows: method, threads, ms_per_step, ratio_vs_plain, ms_per_step_min,
ratio_vs_plain_min. murmur_dp_vmap is the straightforward torch.func engine, kept for
comparison; secure_noise_only is the cost of drawing param_count secure Gaussians.

    python bench/dp_step_bench.py [--quick] [--out FILE] [--model cnn] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peer.training.dpsgd import DPSGDStep
from peer.training.models import build_model, param_count
from peer.training.privacy.noise import SecureGaussian

SIGMA = 1.0
CLIP = 1.0
LR = 0.05


def _batch(model_name: str, batch: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    gen = torch.Generator().manual_seed(0)
    shape: tuple[int, ...] = (1, 28, 28) if model_name == "cnn" else (64,)
    x = torch.randn(batch, *shape, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return x, y, shape


def _plain(model_name: str, shape: tuple[int, ...], x: torch.Tensor, y: torch.Tensor):
    model = build_model(model_name, shape, 10)
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _murmur(model_name: str, shape, x, y, engine: str):
    model = build_model(model_name, shape, 10)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    dp = DPSGDStep.build(
        model,
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        expected_batch_size=x.shape[0],
        noise=SecureGaussian(),
        engine=engine,
    )

    def step() -> None:
        dp.step(x, y)
        opt.step()

    return step


def _opacus(model_name: str, shape, x, y):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model = GradSampleModule(build_model(model_name, shape, 10))
    opt = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR),
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        expected_batch_size=x.shape[0],
    )

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _noise_only(count: int):
    source = SecureGaussian()

    def step() -> None:
        source.sample(count)

    return step


def run(model_name: str, batch: int, threads_list: list[int], repeats: int, steps: int):
    x, y, shape = _batch(model_name, batch)
    rows = []
    count = param_count(build_model(model_name, shape, 10))
    for threads in threads_list:
        torch.set_num_threads(threads)
        methods: dict[str, Callable[[], None]] = {
            "plain_sgd": _plain(model_name, shape, x, y),
            "murmur_dp": _murmur(model_name, shape, x, y, "auto"),
            "murmur_dp_vmap": _murmur(model_name, shape, x, y, "vmap"),
            "opacus_dp": _opacus(model_name, shape, x, y),
            "secure_noise_only": _noise_only(count),
        }
        for fn in methods.values():  # warm-up (allocator, vmap tracing, thread pool)
            for _ in range(5):
                fn()
        samples: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(repeats):
            for name, fn in methods.items():
                start = time.perf_counter()
                for _ in range(steps):
                    fn()
                samples[name].append((time.perf_counter() - start) / steps * 1e3)
        plain_ms = statistics.median(samples["plain_sgd"])
        plain_min = min(samples["plain_sgd"])
        for name, values in samples.items():
            ms = statistics.median(values)
            rows.append(
                {
                    "method": name,
                    "model": model_name,
                    "params": count,
                    "batch": batch,
                    "threads": threads,
                    "ms_per_step": round(ms, 3),
                    "ratio_vs_plain": round(ms / plain_ms, 3),
                    # best repeat: least disturbed by other load on a shared machine
                    "ms_per_step_min": round(min(values), 3),
                    "ratio_vs_plain_min": round(min(values) / plain_min, 3),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (< 60 s)")
    parser.add_argument("--out", type=Path, help="write rows as JSON")
    parser.add_argument("--model", default="cnn", choices=["cnn", "mlp"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # Opacus warns about secure_mode / non-Poisson use
    repeats, steps = (5, 10) if args.quick else (15, 20)
    threads = [int(t) for t in args.threads.split(",")]
    rows = run(args.model, args.batch, threads, repeats, steps)
    print(f"{'method':<18} {'threads':>7} {'ms/step':>9} {'x plain':>8} {'best ms':>8} {'x':>6}")
    for row in rows:
        print(
            f"{row['method']:<18} {row['threads']:>7} {row['ms_per_step']:>9.3f}"
            f" {row['ratio_vs_plain']:>8.2f} {row['ms_per_step_min']:>8.3f}"
            f" {row['ratio_vs_plain_min']:>6.2f}"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
