"""One-run privacy audit (Steinke, Nasr & Jagielski, NeurIPS 2023) of the reference engine.

Each row is one run of a digits network on the reference engine (``murmur-sim --mode
reference``: the real trainers, local or group noise) with m canaries in one target peer
(sim/audit.py), scored from one adversary view, and the one-run lower bound on epsilon
(sim/audit_bound.py) beside the target's ledger epsilon. Rows with ``weakened`` true scale
every peer's noise by ``noise_scale`` (0: no noise at all) through the audit-only hook: they
show the audit can fail; their ``epsilon_claimed`` is what the ledger claims for the real noise.

    python bench/audit.py --quick --out bench/results/audit_quick.json   # < 2 min
    python bench/audit.py --out bench/results/audit.json                 # ~5 min

Figures: ``epsilon_lower_bound`` at ``confidence`` and the run's ``delta``; ``ratio`` =
bound / claimed; ``guesses`` and ``correct`` of the best (k_in, k_out) of the grid (beta split
over the grid, so the maximum is still valid); ``seconds`` for the whole run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: The audited network: digits on 4 peers in one group of 4 (h + c = 4 for group noise), the
#: default rounds (30 rounds of 5 steps, the last 5 averaging only).
BASE: dict[str, Any] = dict(peers=4, group_size=4, dataset="digits", mode="reference", seed=0)
#: Group noise takes the learning rate its first run used (docs/results.md).
GROUP: dict[str, Any] = dict(noise="group", lr=0.5)
#: Input canaries are mislabelled test records, so at most this many on digits.
INPUT_CANARIES_MAX = 400


def plan(quick: bool) -> list[dict[str, Any]]:
    """The runs: (mode, canary, epsilon, noise_scale) for each."""
    if quick:
        return [dict(mode="local", canary="gradient", epsilon=1.0, noise_scale=1.0),
                dict(mode="local", canary="gradient", epsilon=8.0, noise_scale=1.0),
                dict(mode="group", canary="gradient", epsilon=8.0, noise_scale=1.0),
                dict(mode="local", canary="input", epsilon=8.0, noise_scale=1.0),
                dict(mode="local", canary="gradient", epsilon=1.0, noise_scale=0.1)]
    runs = [dict(mode=mode, canary="gradient", epsilon=eps, noise_scale=1.0)
            for mode in ("local", "group") for eps in (1.0, 3.0, 8.0)]
    runs += [dict(mode=mode, canary="input", epsilon=8.0, noise_scale=1.0)
             for mode in ("local", "group")]
    runs += [dict(mode=mode, canary="gradient", epsilon=1.0, noise_scale=scale)
             for mode in ("local", "group") for scale in (0.1, 0.0)]
    return runs


def run_one(run: dict[str, Any], m: int, confidence: float) -> list[dict[str, Any]]:
    """One audited run; one row per adversary view."""
    from sim.audit import AuditSpec, run_audit
    from sim.scenario_io import scenario_from_dict

    options = {**BASE, **(GROUP if run["mode"] == "group" else {}),
               "target_epsilon": run["epsilon"]}
    if run["canary"] == "input":  # records of the test split: digits has 449
        m = min(m, INPUT_CANARIES_MAX)
    spec = AuditSpec(canary=run["canary"], m=m, noise_scale=run["noise_scale"],
                     confidence=confidence)
    outcome = run_audit(scenario_from_dict(options), spec)
    rows = []
    for view, result in outcome.results.items():
        claimed = outcome.epsilon_claimed
        rows.append({
            "mode": run["mode"], "canary": run["canary"], "view": view,
            "weakened": run["noise_scale"] != 1.0, "noise_scale": run["noise_scale"],
            "target_epsilon": run["epsilon"], "epsilon_claimed": round(claimed, 3),
            "epsilon_lower_bound": round(result.epsilon_lower_bound, 3),
            "ratio": round(result.epsilon_lower_bound / claimed, 3),
            "m": outcome.m, "included": outcome.included, "guesses": result.guesses,
            "correct": result.correct, "k_in": result.k_in, "k_out": result.k_out,
            "confidence": confidence, "delta": outcome.delta,
            "seconds": round(outcome.seconds, 1),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="m = 300, five runs (< 2 min)")
    parser.add_argument("--m", type=int, help="canaries per run (default 1000, quick 300)")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--out", type=Path, help="write the rows as JSON")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    import torch

    torch.set_num_threads(1)
    m = args.m or (300 if args.quick else 1000)
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    for run in plan(args.quick):
        rows.extend(run_one(run, m, args.confidence))
    columns = ["mode", "canary", "view", "noise_scale", "epsilon_claimed",
               "epsilon_lower_bound", "ratio", "guesses", "correct", "seconds"]
    print("  ".join(f"{c:>19}" if c.startswith("epsilon") else f"{c:>11}" for c in columns))
    for row in rows:
        print("  ".join(f"{row[c]!s:>19}" if c.startswith("epsilon") else f"{row[c]!s:>11}"
                        for c in columns))
    print(f"{len(rows)} rows, m = {m}, confidence {args.confidence}, "
          f"in {time.monotonic() - started:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
