"""One-run privacy audit (Steinke, Nasr & Jagielski, NeurIPS 2023), beside the method's ceiling.

Each row is one run of a digits network of 4 peers (one group of 4) with m canaries in one
target peer, scored from one adversary view, and the one-run lower bound on epsilon
(sim/audit_bound.py) beside the target's ledger epsilon:

* ``engine = "reference"``: the reference engine (``murmur-sim --mode reference``: the real
  trainers, local or group noise; sim/audit.py), views ``released``, ``own``, ``other``;
* ``engine = "network"``: real peers of an in-process run over the embedded broker, real
  Shamir sessions (sim/audit_network.py), views ``own`` and ``other``, gradient canaries at
  epsilon 8 and the weakened control at epsilon 1 (a run takes about a minute);
* ``engine = "ideal"``: no training at all: the one-run bound on the idealised mechanism of the
  ledger (sim/audit_ceiling.py) at other m, to show how the ceiling grows with m.

Rows with ``weakened`` true scale every peer's noise by ``noise_scale`` (0: no noise) through
the audit-only hook: they show the audit can fail; their ``epsilon_claimed`` is the ledger's
figure for the real noise.

    python bench/audit.py --quick --out bench/results/audit_quick.json      # < 2 min
    python bench/audit.py --mode local --engine both --out bench/results/audit_local.json
    python bench/audit.py --mode group --engine both --out bench/results/audit_group.json
    python bench/audit.py --mode group --epsilon 1 --repeat 6 \
        --out bench/results/audit_group_eps1_repeat.json                    # the spread

Figures: ``epsilon_lower_bound`` at ``confidence`` and the run's ``delta``; ``ratio`` =
bound / claimed; ``epsilon_ceiling`` = the mean bound of the same procedure (same m, guess
grid, confidence) on five simulated runs of the idealised mechanism with the ledger's (sigma,
q, steps), scored by the sum over steps as the ``released`` view is (``_stepwise``: scored by
the per-step likelihood ratio instead); ``ratio_to_ceiling`` = bound / ceiling; ``guesses``
and ``correct`` of the best (k_in, k_out) of the grid (beta split over the grid, so the
maximum is still valid); ``seconds`` for the whole run.
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
#: The m of the ideal rows (the digits MLP has 4 810 coordinates; the ideal has no limit).
IDEAL_M = (500, 1000, 2000, 5000, 10000)
#: Simulated runs per ceiling.
CEILING_DRAWS = 5
MODES = ("local", "group")


def plan(quick: bool, modes: tuple[str, ...], engines: tuple[str, ...]
         ) -> list[dict[str, Any]]:
    """The runs: (engine, mode, canary, epsilon, noise_scale) for each."""
    if quick:
        runs = [dict(mode="local", canary="gradient", epsilon=1.0, noise_scale=1.0),
                dict(mode="local", canary="gradient", epsilon=8.0, noise_scale=1.0),
                dict(mode="group", canary="gradient", epsilon=8.0, noise_scale=1.0),
                dict(mode="local", canary="input", epsilon=8.0, noise_scale=1.0),
                dict(mode="local", canary="gradient", epsilon=1.0, noise_scale=0.1)]
    else:
        runs = [dict(mode=mode, canary="gradient", epsilon=eps, noise_scale=1.0)
                for mode in MODES for eps in (1.0, 3.0, 8.0)]
        runs += [dict(mode=mode, canary="input", epsilon=8.0, noise_scale=1.0)
                 for mode in MODES]
        runs += [dict(mode=mode, canary="gradient", epsilon=1.0, noise_scale=scale)
                 for mode in MODES for scale in (0.1, 0.0)]
    runs = [dict(run, engine="reference") for run in runs if run["mode"] in modes]
    if "reference" not in engines:
        runs = []
    if "network" in engines:  # the real noise at epsilon 8, and the weakened control
        runs += [dict(engine="network", mode=mode, canary="gradient", epsilon=eps,
                      noise_scale=scale) for mode in modes
                 for eps, scale in ((8.0, 1.0), (1.0, 0.1))]
    return runs


def ceilings(segments: Any, m: int, delta: float, confidence: float) -> dict[str, float]:
    """The mean one-run bound on the idealised mechanism, for each score."""
    from sim.audit_ceiling import CEILING_SCORES, ceiling

    return {score: ceiling(segments, m, delta, confidence, score, CEILING_DRAWS).mean
            for score in CEILING_SCORES}


def run_one(run: dict[str, Any], m: int, confidence: float) -> list[dict[str, Any]]:
    """One audited run; one row per adversary view."""
    from sim.audit import AuditSpec, run_audit
    from sim.audit_network import run_network_audit
    from sim.scenario_io import scenario_from_dict

    options = {**BASE, **(GROUP if run["mode"] == "group" else {}),
               "target_epsilon": run["epsilon"]}
    if run["canary"] == "input":  # records of the test split: digits has 449
        m = min(m, INPUT_CANARIES_MAX)
    spec = AuditSpec(canary=run["canary"], m=m, noise_scale=run["noise_scale"],
                     confidence=confidence)
    audit = run_network_audit if run["engine"] == "network" else run_audit
    outcome = audit(scenario_from_dict(options), spec)
    ceiling = ceilings(outcome.segments, outcome.m, outcome.delta, confidence)
    rows = []
    for view, result in outcome.results.items():
        rows.append(_row(run, view, outcome.epsilon_claimed, result.epsilon_lower_bound,
                         ceiling, confidence, outcome.delta, m=outcome.m,
                         included=outcome.included, guesses=result.guesses,
                         correct=result.correct, k_in=result.k_in, k_out=result.k_out,
                         seconds=round(outcome.seconds, 1)))
    if run["engine"] == "reference" and run["canary"] == "gradient" \
            and run["noise_scale"] == 1.0 and m >= 1000:
        for ideal_m in IDEAL_M:
            ideal = ceilings(outcome.segments, ideal_m, outcome.delta, confidence)
            rows.append(_row(dict(run, engine="ideal"), "ideal", outcome.epsilon_claimed,
                             ideal["sum"], ideal, confidence, outcome.delta, m=ideal_m))
    return rows


def _row(run: dict[str, Any], view: str, claimed: float, bound: float,
         ceiling: dict[str, float], confidence: float, delta: float, **extra: Any
         ) -> dict[str, Any]:
    return {
        "engine": run["engine"], "mode": run["mode"], "canary": run["canary"], "view": view,
        "weakened": run["noise_scale"] != 1.0, "noise_scale": run["noise_scale"],
        "target_epsilon": run["epsilon"], "epsilon_claimed": round(claimed, 3),
        "epsilon_lower_bound": round(bound, 3), "ratio": round(bound / claimed, 3),
        "epsilon_ceiling": round(ceiling["sum"], 3),
        "epsilon_ceiling_stepwise": round(ceiling["stepwise"], 3),
        "ratio_to_ceiling": round(bound / ceiling["sum"], 3) if ceiling["sum"] > 0 else None,
        "confidence": confidence, "delta": delta, **extra,
    }


COLUMNS = ["engine", "mode", "canary", "view", "noise_scale", "m", "epsilon_claimed",
           "epsilon_lower_bound", "epsilon_ceiling", "ratio", "ratio_to_ceiling", "seconds"]


def print_table(rows: list[dict[str, Any]]) -> None:
    width = {c: max(len(c), 9) for c in COLUMNS}
    print("  ".join(f"{c:>{width[c]}}" for c in COLUMNS))
    for row in rows:
        print("  ".join(f"{row.get(c, '')!s:>{width[c]}}" for c in COLUMNS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="m = 300, five reference runs (< 2 min)")
    parser.add_argument("--mode", choices=(*MODES, "all"), default="all")
    parser.add_argument("--engine", choices=("reference", "network", "both"),
                        default="reference")
    parser.add_argument("--m", type=int, help="canaries per run (default 1000, quick 300)")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--epsilon", type=float, help="only the runs at this target epsilon")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each planned run this many times (rows carry `repeat`)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    import torch

    torch.set_num_threads(1)
    m = args.m or (300 if args.quick else 1000)
    modes = MODES if args.mode == "all" else (args.mode,)
    engines = ("reference", "network") if args.engine == "both" else (args.engine,)
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    runs = [run for run in plan(args.quick, modes, engines)
            if args.epsilon is None or run["epsilon"] == args.epsilon]
    for repeat in range(args.repeat):
        for run in runs:
            new = run_one(run, m, args.confidence)
            rows.extend(dict(row, repeat=repeat) if args.repeat > 1 else row for row in new)
    print_table(rows)
    print(f"{len(rows)} rows, m = {m}, confidence {args.confidence}, "
          f"in {time.monotonic() - started:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
