"""Network benchmark: gossip learning against its baselines on one fixed split.

Full grid: 16 peers on Fashion-MNIST, Dirichlet alpha = 0.5, each row on the same
split (same seed):

  (a) gossip without DP        (b) gossip with DP at epsilon = 3 and at epsilon = 8
  (c) centralized (all peers' training data pooled, no DP, the network's total compute)
  (d) standalone (each peer alone on its shard, no DP, its own compute)
  (e) for each DP epsilon of (b): centralized with DP (Murmur's own DP-SGD trainer on the pooled
      data, the network's total private steps, sigma calibrated for the pooled sample rate and
      the same epsilon) and standalone with DP (each peer's own trainer config, no merges)

Figures per row: final mean test accuracy, wall time, bytes a peer sends per session it took
part in (all its traffic - announcements, invitations, shares, partial sums, aborted sessions -
divided by its completed sessions), and that against sending one copy of the dense float32
model in the clear ("vs dense"; a plain exchange with the g - 1 other members would cost g - 1
copies).
Every gossip row is a real `murmur-sim` run (real peers, crypto and broker).

    python bench/network_bench.py --quick            # digits, 4 peers, < 60 s
    python bench/network_bench.py --out results.json # the full grid (~10 min on 2 cores, plus
                                                     # ~12 min for the DP baseline rows, an
                                                     # estimate; --no-dp-baselines skips them)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sim.broker import MosquittoBroker  # noqa: E402
from sim.metrics import last_row_per_peer, read_metrics  # noqa: E402
from sim.runner import RunResult, baseline_inputs, run_simulation  # noqa: E402
from sim.scenario import Scenario  # noqa: E402
from sim.scenario_io import scenario_from_dict  # noqa: E402
from sim.setup import prepare  # noqa: E402

#: The full grid's model and its recipe; "cnn" is the first version's grid (60 rounds).
#: "scatter" (frozen ScatterNet features + linear, docs/results.md) learns under DP with a
#: small clipping norm and a large step, and without DP with a small step.
MODEL_RECIPES: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    # (options of every row, of the no-DP row, of the epsilon = 8 row): less noise takes a
    # larger step (bench/results/sweep_fmnist_scatter_*.json)
    "scatter": (dict(model="scatter", rounds=30, lr=4.0, max_grad_norm=0.1, topk_fraction=0.1),
                dict(lr=0.02), dict(lr=8.0, batch_size=128)),
    "cnn": (dict(model="cnn", rounds=60, lr=0.2, max_grad_norm=1.0, topk_fraction=0.25), {}, {}),
}


def grid(quick: bool, model: str = "scatter"
         ) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]], float]:
    """(shared scenario options, [(label, per-row options)], round pause)."""
    if quick:
        shared: dict[str, Any] = dict(
            peers=4, dataset="digits", partition="dirichlet", alpha=0.5, rounds=6,
            local_steps=8, topk_fraction=0.2, lr=0.2, duration_s=25.0, seed=1,
            broker="embedded",
        )
        rows = [("gossip, no DP", {"dp": False}),
                ("gossip, DP eps=3", {"dp": True, "target_epsilon": 3.0}),
                ("gossip, DP eps=8", {"dp": True, "target_epsilon": 8.0})]
        return shared, rows, 0.3
    recipe, no_dp, eps8 = MODEL_RECIPES[model]
    shared = dict(
        peers=16, dataset="fashion-mnist", partition="dirichlet", alpha=0.5,
        local_steps=10, batch_size=64, duration_s=1800.0, seed=1,
        broker="mosquitto" if MosquittoBroker.available() else "embedded", **recipe,
    )
    rows = [("gossip, no DP", {"dp": False, **no_dp}),
            ("gossip, DP eps=3", {"dp": True, "target_epsilon": 3.0}),
            ("gossip, DP eps=8", {"dp": True, "target_epsilon": 8.0, **eps8})]
    return shared, rows, 2.0


def _bytes_per_session(result: RunResult) -> float | None:
    finals = last_row_per_peer(read_metrics(result.metrics_path))
    sessions = sum(r.sessions_done for r in finals.values())
    sent = sum(r.bytes_sent for r in finals.values())
    return sent / sessions if sessions else None


def _dense_model_bytes(scenario: Scenario, model_name: str, train: Any) -> int:
    from peer.training.models import build_model, param_count

    model = build_model(model_name, tuple(train.x.shape[1:]), train.num_classes)
    return 4 * param_count(model)


async def run_grid(quick: bool, out_dir: Path, dp_baselines: bool = True,
                   model: str = "scatter", session_kind: str = "shamir",
                   baselines: bool = True) -> list[dict[str, Any]]:
    shared, gossip_rows, pause = grid(quick, model)
    shared["session_kind"] = session_kind
    rows: list[dict[str, Any]] = []
    dense: int | None = None
    for label, options in gossip_rows:
        scenario = scenario_from_dict({**shared, **options, "out_dir": out_dir})
        started = time.monotonic()
        result = await run_simulation(scenario, progress=False, baselines=False,
                                      round_pause_s=pause)
        wall = time.monotonic() - started
        per_session = _bytes_per_session(result)
        if dense is None:
            from peer.training.data import load_source
            from sim.scenario import resolve_model

            train, _test = load_source(scenario.dataset)
            dense = _dense_model_bytes(scenario, resolve_model(scenario.model,
                                                               tuple(train.x.shape[1:])), train)
        rows.append({
            "method": label,
            "session_kind": session_kind,
            "dataset": scenario.dataset,
            "model": scenario.model,
            "peers": scenario.peers,
            "accuracy_pct": None if result.summary.mean_accuracy is None
            else round(100 * result.summary.mean_accuracy, 1),
            "wall_s": round(wall, 1),
            "sessions_done": result.summary.sessions_done,
            "max_epsilon": None if result.summary.max_epsilon is None
            else round(result.summary.max_epsilon, 2),
            "bytes_per_peer_per_session": None if per_session is None else round(per_session),
            "dense_model_bytes": dense,
            "bytes_vs_dense": None if per_session is None else round(per_session / dense, 3),
            "stopped_by": result.stopped_by,
        })
    if not baselines:
        return rows
    # Baselines on the same split, with the same per-peer compute.
    from sim.baselines import compute_baselines, compute_dp_baselines

    scenario = scenario_from_dict({**shared, "dp": False, "out_dir": out_dir})
    with tempfile.TemporaryDirectory() as tmp:
        prep = prepare(scenario, Path(tmp))
        pooled, parts = baseline_inputs(prep)
        base = compute_baselines(scenario, pooled, prep.test, parts)
    for name in ("centralized", "standalone"):
        rows.append(_baseline_row(name, base[name], scenario, dense, epsilon=None))
    # With DP at each epsilon of the grid: Murmur's DP-SGD trainer, real (secure) noise.
    for _label, options in gossip_rows:
        if not (dp_baselines and options.get("dp")):
            continue
        scenario = scenario_from_dict({**shared, **options, "out_dir": out_dir})
        with tempfile.TemporaryDirectory() as tmp:
            prep = prepare(scenario, Path(tmp))
            pooled, parts = baseline_inputs(prep)
            base = compute_dp_baselines(scenario, pooled, prep.test, parts)
        eps = f"{scenario.target_epsilon:g}"
        for name, label in (("centralized_dp", f"centralized, DP eps={eps}"),
                            ("standalone_dp", f"standalone, DP eps={eps}")):
            rows.append(_baseline_row(label, base[name], scenario, dense,
                                      epsilon=base[name]["epsilon"]))
    return rows


def _baseline_row(method: str, result: dict[str, Any], scenario: Scenario, dense: int | None,
                  *, epsilon: float | None) -> dict[str, Any]:
    return {
        "method": method, "dataset": scenario.dataset, "model": scenario.model,
        "peers": scenario.peers,
        "accuracy_pct": round(100 * result["accuracy"], 1),
        "wall_s": round(result["seconds"], 1), "sessions_done": None,
        "max_epsilon": None if epsilon is None else round(epsilon, 2),
        "bytes_per_peer_per_session": None,
        "dense_model_bytes": dense, "bytes_vs_dense": None, "stopped_by": None,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'method':<24} {'acc %':>6} {'wall s':>7} {'sessions':>8} {'max eps':>7} " \
           f"{'B/peer/session':>14} {'vs dense':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        def show(value: Any) -> str:
            return "-" if value is None else str(value)

        print(f"{r['method']:<24} {show(r['accuracy_pct']):>6} {show(r['wall_s']):>7} "
              f"{show(r['sessions_done']):>8} {show(r['max_epsilon']):>7} "
              f"{show(r['bytes_per_peer_per_session']):>14} {show(r['bytes_vs_dense']):>8}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, 4 peers (< 60 s)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="keep the run directories here (default: a temporary directory)")
    parser.add_argument("--model", choices=sorted(MODEL_RECIPES), default="scatter",
                        help="the full grid's model and recipe (default scatter)")
    parser.add_argument("--no-dp-baselines", action="store_true",
                        help="skip the DP baseline rows (on the full grid they add about "
                             "32,000 CNN DP-SGD steps, ~12 min on 2 cores)")
    parser.add_argument("--session-kind", choices=("shamir", "masked"), default="shamir",
                        help="the aggregation session the gossip rows run (default shamir)")
    parser.add_argument("--gossip-only", action="store_true",
                        help="only the gossip rows (the baselines do not depend on the "
                             "session kind)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    import logging

    # Peers' expected warnings (budget spent at the planned end) stay out of the table; the
    # runner writes everything to each run's sim.log.
    quiet = logging.StreamHandler(sys.stderr)
    quiet.setLevel(logging.ERROR)
    logging.getLogger().addHandler(quiet)
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = args.runs_dir or Path(tmp)
        rows = asyncio.run(run_grid(args.quick, runs_dir, not args.no_dp_baselines,
                                    args.model, args.session_kind, not args.gossip_only))
    print_table(rows)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
