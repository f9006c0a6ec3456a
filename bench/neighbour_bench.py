"""Which neighbours the ledger's epsilon covers: add/remove one record against replace one.

The ledger shows the add/remove-one epsilon of DP-SGD on the peer's training set, at the sample
rate q and noise multiplier sigma that ran (docs/privacy.md, "What the ledger's epsilon covers").
For the raw data a peer loads, whose record count is public, the natural neighbour is one
record *replaced* by another (same count, same splits, same q). This bench computes both with
dp-accounting's own ``PLDAccountant`` (Poisson-sampled Gaussian, value discretization 1e-3, as
the ledger), plus the generic bound 2 epsilon that replace = remove + add gives by group
privacy (at delta (1 + e^epsilon) delta), and the sigma a replace-one target would need.

Rows: the default peer (``docs/peer.example.toml``: digits, hold-out 0.2, batch 64, 100 rounds
x 20 steps, target epsilon 8; q from the peer's own loaders), the digits DP row at epsilon 8 of
``bench/accuracy_bench.py`` and the Fashion-MNIST peer of ``bench/accountant_bench.py``
(n = 2,500, epsilon 3).

    python bench/neighbour_bench.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DELTA = 1e-5
INTERVAL = 1e-3  # the ledger's discretization (peer/training/privacy/pld.py)


def default_peer_case() -> tuple[str, float, int, float]:
    """(label, q, steps, target) of a peer with docs/peer.example.toml's settings."""
    from peer.training.config import TrainerConfig
    from peer.training.data import load_train_source, split_holdout

    cfg = TrainerConfig(target_epsilon=8.0)
    train, _holdout = split_holdout(load_train_source("digits"), 0.2, cfg.seed)
    steps = (cfg.planned_rounds - cfg.averaging_rounds) * cfg.local_steps
    return (f"default peer (digits, {len(train)} training records)",
            cfg.batch_size / len(train), steps, 8.0)


def pld_epsilon(q: float, sigma: float, steps: int, replace_one: bool) -> float:
    """dp-accounting's epsilon for ``steps`` Poisson-sampled Gaussian steps."""
    import dp_accounting as dpa

    relation = (dpa.NeighboringRelation.REPLACE_ONE if replace_one
                else dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
    accountant = dpa.pld.PLDAccountant(neighboring_relation=relation,
                                       value_discretization_interval=INTERVAL)
    accountant.compose(dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps))
    return float(accountant.get_epsilon(DELTA))


def replace_one_sigma(q: float, steps: int, target: float) -> float:
    """The smallest sigma (bisection to 0.001) whose replace-one epsilon is <= target."""
    low, high = 0.3, 1.0
    while pld_epsilon(q, high, steps, True) > target:
        low, high = high, high * 2
    while high - low > 1e-3:
        middle = (low + high) / 2
        if pld_epsilon(q, middle, steps, True) > target:
            low = middle
        else:
            high = middle
    return high


def row(label: str, q: float, steps: int, target: float, sigma: float | None,
        with_sigma_search: bool) -> dict[str, object]:
    from peer.training.privacy.accountant import sigma_for

    started = time.perf_counter()
    if sigma is None:
        sigma = sigma_for(target, DELTA, q, steps, accountant="pld")
    add_remove = pld_epsilon(q, sigma, steps, False)
    replace = pld_epsilon(q, sigma, steps, True)
    result: dict[str, object] = {
        "case": label, "q": round(q, 5), "steps": steps, "sigma": round(sigma, 4),
        "delta": DELTA, "epsilon_add_remove": round(add_remove, 3),
        "epsilon_replace_one": round(replace, 3),
        "replace_over_add_remove": round(replace / add_remove, 3),
        "generic_bound_epsilon": round(2 * add_remove, 3),
        "generic_bound_delta": (1 + math.exp(add_remove)) * DELTA,
    }
    if with_sigma_search:
        result["sigma_for_replace_one_target"] = round(replace_one_sigma(q, steps, target), 3)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="no sigma search (< 30 s)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON")
    args = parser.parse_args()
    cases: list[tuple[str, float, int, float, float | None]] = [
        (*default_peer_case(), None),
        ("digits DP-SGD, accuracy_bench epsilon 8", 0.0475, 211, 8.0, 0.83),
        ("Fashion-MNIST n = 2,500, epsilon 3", 64 / 2500, 600, 3.0, 1.157),
    ]
    rows = [row(*case, with_sigma_search=not args.quick) for case in cases]
    for result in rows:
        print(" | ".join(f"{k} {v}" for k, v in result.items()))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
