"""Time one training step: plain SGD vs Murmur DP-SGD vs Opacus DP-SGD, same model and batch.

Methods are interleaved in every repeat (so background load on a shared machine hits them
alike); the median over repeats is reported, and the best repeat (least disturbed by other
load). Rows: method, threads, ms_per_step, ratio_vs_plain, ms_per_step_min,
ratio_vs_plain_min, minor_faults_per_step. murmur_dp_vmap is the straightforward torch.func
engine, kept for comparison; secure_noise_only is the cost of drawing param_count secure
Gaussians.

Each group of methods runs in its own fresh process, plain SGD in every group, and a ratio is
against the plain SGD of the same process: ``plain_sgd``, ``murmur_dp`` and
``secure_noise_only`` in one, ``murmur_dp_vmap`` and ``opacus_dp`` in another. Sharing one
process misled: once ``torch.func`` or Opacus had freed their large per-example buffers,
glibc's dynamic mmap and trim thresholds had grown, and every later step of every method
reused heap pages instead of faulting fresh ones in (a real peer never runs them).
``minor_faults_per_step`` shows that cost. Every child first puts itself in a peer's state:
``--profile default`` (the default) fixes glibc's thresholds where a peer's data loading
leaves them (:data:`WARM_ALLOCATOR`); ``small`` applies that device profile's process
settings (peer/device.py: allocator, convolution kernels); ``none`` is a fresh process with
glibc's and torch's own settings, which no peer is in.

User models (rows ``user_plain_sgd``, ``user_dp_ghost``, ``user_dp_vmap``, with ``model`` the
factory's import path and ``ratio_vs_ghost``, the general engine's cost per step over the fast
engine's on the same model and batch): the examples' models, built through the same door as a
peer's ``model = "package.module:factory"``. examples.fashion.model:build (Conv2d + Linear)
runs on both engines; examples.sensor.model:build (Conv1d, GroupNorm) only on the general one,
so its ratio is against plain SGD.

    python bench/dp_step_bench.py [--quick] [--out FILE] [--model cnn] [--batch 64]
                                  [--profile default|small|none]
                                  [--user-models PATH,PATH | --user-models none]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peer.device import AllocatorSettings
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


#: glibc's mmap and trim thresholds as a default-profile peer has them once loading its data
#: has freed a large buffer (glibc raises both, up to these maxima, when it frees a large
#: mapping). A fresh process without them faults its step's buffers in again on every step,
#: which a peer does not: its CPU per round is the same with these thresholds fixed and
#: without (bench/resource_bench.py, docs/privacy.md "DP step cost").
WARM_ALLOCATOR = AllocatorSettings(mmap_threshold_bytes=32 << 20,
                                   trim_threshold_bytes=64 << 20)

#: The method groups of the CNN rows: each runs in its own process, beside plain SGD.
GROUPS: tuple[tuple[str, ...], ...] = (
    ("plain_sgd", "murmur_dp", "secure_noise_only"),
    ("plain_sgd", "murmur_dp_vmap", "opacus_dp"),
)


def _methods(model_name: str, batch: int, names: tuple[str, ...]) -> dict[str, Callable[[], None]]:
    x, y, shape = _batch(model_name, batch)
    count = param_count(build_model(model_name, shape, 10))
    makers: dict[str, Callable[[], Callable[[], None]]] = {
        "plain_sgd": lambda: _plain(model_name, shape, x, y),
        "murmur_dp": lambda: _murmur(model_name, shape, x, y, "auto"),
        "murmur_dp_vmap": lambda: _murmur(model_name, shape, x, y, "vmap"),
        "opacus_dp": lambda: _opacus(model_name, shape, x, y),
        "secure_noise_only": lambda: _noise_only(count),
    }
    return {name: makers[name]() for name in names}


def _in_child(spec: dict[str, object]) -> dict[str, dict[str, float | list[float]]]:
    """Run one group in a fresh interpreter (this script with ``--child``)."""
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          check=True, capture_output=True, text=True, timeout=900)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child_main(spec: dict[str, object]) -> int:
    """A child's work: the profile's process settings, then the group, timed and interleaved."""
    from peer.device import DeviceConfig, apply_allocator, apply_process_settings

    if spec["profile"] == "default":
        apply_allocator(WARM_ALLOCATOR)  # the default profile leaves the allocator alone
    if spec["profile"] != "none":
        apply_process_settings(DeviceConfig(str(spec["profile"])))
    torch.set_num_threads(int(spec["threads"]))  # type: ignore[arg-type]
    names = tuple(spec["methods"])  # type: ignore[arg-type]
    if spec["kind"] == "cnn":
        methods = _methods(str(spec["model"]), int(spec["batch"]), names)  # type: ignore[arg-type]
    else:
        methods = _user_methods(str(spec["model"]), int(spec["batch"]), names)  # type: ignore[arg-type]
    samples, faults = _timed(methods, int(spec["repeats"]), int(spec["steps"]))  # type: ignore[arg-type]
    print(json.dumps({name: {"ms": values, "faults": faults[name]}
                      for name, values in samples.items()}))
    return 0


def run(model_name: str, batch: int, threads_list: list[int], repeats: int, steps: int,
        profile: str = "default") -> list[dict[str, object]]:
    _x, _y, shape = _batch(model_name, batch)
    rows: list[dict[str, object]] = []
    count = param_count(build_model(model_name, shape, 10))
    for threads in threads_list:
        for group in GROUPS:
            result = _in_child({"kind": "cnn", "model": model_name, "batch": batch,
                                "threads": threads, "methods": list(group), "repeats": repeats,
                                "steps": steps, "profile": profile})
            plain_ms = statistics.median(result["plain_sgd"]["ms"])  # type: ignore[arg-type]
            plain_min = min(result["plain_sgd"]["ms"])  # type: ignore[type-var]
            for name in group:
                if name == "plain_sgd" and group is not GROUPS[0]:
                    continue  # one plain_sgd row per thread count: the first group's
                values: list[float] = result[name]["ms"]  # type: ignore[assignment]
                ms = statistics.median(values)
                rows.append({
                    "method": name, "model": model_name, "profile": profile, "params": count,
                    "batch": batch, "threads": threads,
                    "ms_per_step": round(ms, 3),
                    "ratio_vs_plain": round(ms / plain_ms, 3),
                    # best repeat: least disturbed by other load on a shared machine
                    "ms_per_step_min": round(min(values), 3),
                    "ratio_vs_plain_min": round(min(values) / plain_min, 3),
                    "minor_faults_per_step": round(float(result[name]["faults"]), 1),
                })
    return rows


#: The examples' factories and the input shape and class count each is built for.
USER_MODELS: dict[str, tuple[tuple[int, ...], int]] = {
    "examples.fashion.model:build": ((1, 28, 28), 10),
    "examples.sensor.model:build": ((3, 64), 5),
}


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(methods: dict[str, Callable[[], None]], repeats: int, steps: int
           ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """ms per step of every method in every repeat, the methods interleaved; and each
    method's minor page faults per step (pages the kernel had to map and zero)."""
    for fn in methods.values():  # warm-up (allocator, vmap tracing, thread pool)
        for _ in range(5):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in methods}
    faults = dict.fromkeys(methods, 0)
    for _ in range(repeats):
        for name, fn in methods.items():
            before = _minor_faults()
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            samples[name].append((time.perf_counter() - start) / steps * 1e3)
            faults[name] += _minor_faults() - before
    return samples, {name: count / (repeats * steps) for name, count in faults.items()}


def _user_methods(path: str, batch: int, names: tuple[str, ...]
                  ) -> dict[str, Callable[[], None]]:
    shape, classes = USER_MODELS[path]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    methods: dict[str, Callable[[], None]] = {}
    for name in names:
        engine = name.removeprefix("user_dp_")
        methods[name] = (_plain(path, shape, x, y) if name == "user_plain_sgd"
                         else _murmur(path, shape, x, y, engine))
    return methods


def run_user(path: str, batch: int, threads_list: list[int], repeats: int, steps: int,
             profile: str = "default") -> list[dict[str, object]]:
    """Rows of one user model: plain SGD and DP-SGD on each engine that handles it, each
    engine in its own process beside plain SGD (``ratio_vs_ghost`` compares two processes)."""
    from peer.training.user_model import engine_for

    shape, classes = USER_MODELS[path]
    model = build_model(path, shape, classes)
    engines = ["ghost", "vmap"] if engine_for(model, shape) == "ghost" else ["vmap"]
    rows: list[dict[str, object]] = []
    for threads in threads_list:
        timed: dict[str, list[float]] = {}
        plain_of: dict[str, float] = {}
        for engine in engines:
            result = _in_child({"kind": "user", "model": path, "batch": batch,
                                "threads": threads, "repeats": repeats, "steps": steps,
                                "methods": ["user_plain_sgd", f"user_dp_{engine}"],
                                "profile": profile})
            plain_ms = statistics.median(result["user_plain_sgd"]["ms"])  # type: ignore[arg-type]
            timed.setdefault("user_plain_sgd", result["user_plain_sgd"]["ms"])  # type: ignore[arg-type]
            plain_of["user_plain_sgd"] = plain_of.get("user_plain_sgd", plain_ms)
            timed[f"user_dp_{engine}"] = result[f"user_dp_{engine}"]["ms"]  # type: ignore[assignment]
            plain_of[f"user_dp_{engine}"] = plain_ms
        ghost = statistics.median(timed.get("user_dp_ghost", [1.0]))
        for name, values in timed.items():
            ms = statistics.median(values)
            row: dict[str, object] = {
                "method": name, "model": path, "profile": profile,
                "params": param_count(model), "batch": batch, "threads": threads,
                "ms_per_step": round(ms, 3), "ratio_vs_plain": round(ms / plain_of[name], 3)}
            if "ghost" in engines:  # a model the fast engine cannot run has no such ratio
                row["ratio_vs_ghost"] = round(ms / ghost, 3)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (< 60 s)")
    parser.add_argument("--out", type=Path, help="write rows as JSON")
    parser.add_argument("--model", default="cnn", choices=["cnn", "mlp"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--user-models", default=",".join(USER_MODELS),
                        help=f"comma-separated, of {', '.join(USER_MODELS)}; or none")
    parser.add_argument("--profile", default="default", choices=["default", "small", "none"],
                        help="the device profile whose process settings every child applies "
                             "(none: glibc's and torch's own)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one group's process
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # Opacus warns about secure_mode / non-Poisson use
    if args.child:
        return _child_main(json.loads(args.child))
    repeats, steps = (5, 10) if args.quick else (15, 20)
    threads = [int(t) for t in args.threads.split(",")]
    rows = run(args.model, args.batch, threads, repeats, steps, args.profile)
    print(f"{'method':<18} {'threads':>7} {'ms/step':>9} {'x plain':>8} {'best ms':>8} {'x':>6}"
          f" {'faults':>7}")
    for row in rows:
        print(
            f"{row['method']:<18} {row['threads']:>7} {row['ms_per_step']:>9.3f}"
            f" {row['ratio_vs_plain']:>8.2f} {row['ms_per_step_min']:>8.3f}"
            f" {row['ratio_vs_plain_min']:>6.2f} {row['minor_faults_per_step']:>7.0f}"
        )
    paths = [] if args.user_models == "none" else args.user_models.split(",")
    user_rows = [row for path in paths
                 for row in run_user(path, args.batch, threads, repeats, steps, args.profile)]
    if user_rows:
        print(f"\n{'user model':<30} {'method':<15} {'threads':>7} {'ms/step':>9} "
              f"{'x plain':>8} {'x ghost':>8}")
    for row in user_rows:
        vs_ghost = f"{row['ratio_vs_ghost']:.2f}" if "ratio_vs_ghost" in row else "-"
        print(f"{row['model']:<30} {row['method']:<15} {row['threads']:>7} "
              f"{row['ms_per_step']:>9.3f} {row['ratio_vs_plain']:>8.2f} {vs_ghost:>8}")
    rows += user_rows
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
