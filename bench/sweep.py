"""Recipe sweep on the reference engine (``murmur-sim --mode reference``): a grid in minutes.

Every row is one network-free run of the scenario with some options changed: the same
trainers, DP-SGD, accountant, sharing strategy and merge rule as the real peers (see
sim/reference.py), sessions on a seeded schedule. Figures: mean, min and max test accuracy
over the peers, the largest epsilon spent, wall time.

    python bench/sweep.py --quick                                  # < 60 s
    python bench/sweep.py --base digits --vary lr=0.1,0.2,0.5 --vary momentum=0,0.9 \\
        --seeds 0,1,2 --jobs 2 --out bench/results/sweep_digits_lr.json
    python bench/sweep.py --base fmnist-reduced --vary target_epsilon=3,8 --dp-off-too

``--base`` names a starting scenario (below); ``--set KEY=VALUE`` changes it for every row;
each ``--vary KEY=V1,V2,..`` adds a grid axis (the rows are the cartesian product). Values are
parsed as TOML values (numbers, true/false, "strings").
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import tempfile
import time
import tomllib
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Starting scenarios. "digits" is murmur-sim's default; "fmnist-reduced" is the Fashion-MNIST
#: grid of bench/network_bench.py with fewer rounds, for sweeps that must stay short.
BASES: dict[str, dict[str, Any]] = {
    "digits": {},
    "fmnist": dict(peers=16, dataset="fashion-mnist", partition="dirichlet", alpha=0.5,
                   rounds=60, local_steps=10, batch_size=64, lr=0.2, duration_s=3600.0,
                   seed=1),
    "fmnist-reduced": dict(peers=16, dataset="fashion-mnist", partition="dirichlet", alpha=0.5,
                           rounds=20, local_steps=10, batch_size=64, lr=0.2,
                           duration_s=3600.0, seed=1),
}


def _value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _assignments(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"sweep: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = _value(value.strip())
    return out


def _axes(items: list[str]) -> list[tuple[str, list[Any]]]:
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep:
            raise SystemExit(f"sweep: expected KEY=V1,V2,..., got {item!r}")
        axes.append((key.strip(), [_value(v.strip()) for v in values.split(",")]))
    return axes


def run_one(options: dict[str, Any]) -> dict[str, Any]:
    """One reference run (in a worker process); the row of figures."""
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    import torch

    torch.set_num_threads(1)
    from sim.runner import run_simulation
    from sim.scenario_io import scenario_from_dict

    with tempfile.TemporaryDirectory() as tmp:
        scenario = scenario_from_dict({**options, "mode": "reference", "out_dir": tmp})
        started = time.monotonic()
        result = asyncio.run(run_simulation(scenario, progress=False, baselines=False))
        summary = result.summary

    def pct(value: float | None) -> float | None:
        return None if value is None else round(100 * value, 1)

    return {
        "accuracy_pct": pct(summary.mean_accuracy),
        "min_accuracy_pct": pct(summary.min_accuracy),
        "max_accuracy_pct": pct(summary.max_accuracy),
        "max_epsilon": None if summary.max_epsilon is None else round(summary.max_epsilon, 2),
        # Shares and partial sums only (4 bytes a coordinate), no framing: compare rows, not
        # with the network engine's bytes.
        "payload_kb_per_session": None if not summary.sessions_done
        else round(summary.mean_bytes_sent * summary.peers / summary.sessions_done / 1000, 1),
        "wall_s": round(time.monotonic() - started, 1),
    }


def build_rows(base: str, fixed: dict[str, Any], axes: list[tuple[str, list[Any]]],
               seeds: list[int]) -> list[dict[str, Any]]:
    """The options of every run: base <- --set <- one point of the grid <- seed."""
    rows = []
    keys = [key for key, _values in axes]
    for point in itertools.product(*(values for _key, values in axes)):
        for seed in seeds:
            rows.append({**BASES[base], **fixed, **dict(zip(keys, point, strict=True)),
                         "seed": seed})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", choices=sorted(BASES), default="digits")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2")
    parser.add_argument("--seeds", default="0", help="comma-separated scenario seeds")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    parser.add_argument("--quick", action="store_true",
                        help="digits, 4 peers, 8 rounds, two learning rates (< 60 s)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.base, args.set = "digits", ["peers=4", "rounds=8", *args.set]
        args.vary = args.vary or ["lr=0.1,0.3"]
    fixed = _assignments(args.set)
    axes = _axes(args.vary)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = build_rows(args.base, fixed, axes, seeds)
    varied = [key for key, _values in axes]
    started = time.monotonic()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        figures = list(pool.map(run_one, runs))
    rows = []
    for options, result in zip(runs, figures, strict=True):
        label = {key: options[key] for key in varied}
        rows.append({"base": args.base, **{k: v for k, v in fixed.items()}, **label,
                     "seed": options["seed"], **result})
    columns = [*varied, "seed", "accuracy_pct", "min_accuracy_pct", "max_accuracy_pct",
               "max_epsilon", "payload_kb_per_session", "wall_s"]
    print("  ".join(f"{c:>12}" for c in columns))
    for row in rows:
        print("  ".join(f"{row.get(c)!s:>12}" for c in columns))
    print(f"{len(rows)} runs in {time.monotonic() - started:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
