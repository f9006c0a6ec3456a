"""Which accountant: epsilon, noise, run time and memory of RDP, PLD and PRV on Murmur's runs.

For each case (sample rate q, steps, target epsilon; delta = 1e-5) and accountant:
- ``epsilon`` at a fixed sigma: the sigma the RDP accountant picks for the target;
- ``sigma`` from ``sigma_for(target)`` and the noise saving against RDP's sigma;
- ``ms_per_epsilon`` (one epsilon computation, no cache) and ``s_per_sigma_for``;
and per accountant, in fresh processes, the resident memory its import adds to a bare
interpreter (``import_rss_mb``) and to a peer that has already imported torch and Murmur's
trainer (``peer_import_rss_mb``), and after the first epsilon (``peer_first_epsilon_rss_mb``).

Accountants: ``rdp`` (Murmur's Opacus RDP analysis, orders to 1024), ``pld`` (Murmur's
default: dp-accounting PLDAccountant, discretization 1e-3), ``pld_1e-4`` (the same at the
library's default discretization 1e-4), ``prv`` (Opacus 1.6 PRVAccountant, eps_error 0.01,
sigma from ``get_noise_multiplier(accountant="prv")``).

    python bench/accountant_bench.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DELTA = 1e-5
# (case, q, steps, target epsilon). Digits: 8 peers with 81-189 examples, batch 32, 25 rounds
# x 5 steps. Fashion-MNIST: 16 peers with ~2,500-5,000 examples, batch 64, 60 rounds x 10.
CASES = [
    ("digits_n81", 32 / 81, 125, 3.0),
    ("digits_n189", 32 / 189, 125, 3.0),
    ("fmnist_n2500_eps3", 64 / 2500, 600, 3.0),
    ("fmnist_n5000_eps3", 64 / 5000, 600, 3.0),
    ("fmnist_n2500_eps8", 64 / 2500, 600, 8.0),
    ("fmnist_n5000_eps8", 64 / 5000, 600, 8.0),
    ("full_batch", 1.0, 125, 3.0),
]
QUICK_CASES = ("digits_n81", "fmnist_n5000_eps8", "full_batch")

IMPORTS = {
    "rdp": "import peer.training.privacy.rdp as m",
    "pld": "import peer.training.privacy.pld as m; m._dp_accounting()",
    "prv": "from opacus.accountants import PRVAccountant",
}
FIRST_EPSILON = {
    "rdp": "m.epsilon_of_segments([(1.2, 0.0256, 600)], 1e-5)",
    "pld": "m.epsilon_of_segments([(1.2, 0.0256, 600)], 1e-5)",
    "prv": "a = PRVAccountant(); a.history = [(1.2, 0.0256, 600)]; a.get_epsilon(1e-5)",
}
MEMORY_SCRIPT = """
import psutil, sys
sys.path.insert(0, {repo!r})
p = psutil.Process()
if {peer}:
    import torch, peer.training.trainer, peer.training.ledger  # noqa
    import peer.training.privacy.base  # noqa
before = p.memory_info().rss
{stmt}
after = p.memory_info().rss
{first}
print((after - before) / 2**20, (p.memory_info().rss - before) / 2**20)
"""


def _memory(name: str, peer: bool) -> tuple[float, float]:
    script = MEMORY_SCRIPT.format(repo=str(REPO), peer=peer, stmt=IMPORTS[name],
                                  first=FIRST_EPSILON[name])
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""}).stdout.split()
    return float(out[0]), float(out[1])


def _functions(name: str):
    """(epsilon(sigma, q, steps), sigma_for(target, q, steps)) of one accountant, uncached."""
    from peer.training.privacy import pld, rdp

    if name == "rdp":
        def rdp_eps(s, q, n):
            rdp.rdp_per_step.cache_clear()
            return rdp.epsilon_of_segments([(s, q, n)], DELTA)

        return rdp_eps, lambda t, q, n: rdp.sigma_for(t, DELTA, q, n)
    if name in ("pld", "pld_1e-4"):
        interval = pld.VALUE_DISCRETIZATION_INTERVAL if name == "pld" else 1e-4

        def eps(s, q, n):
            pld._epsilon.cache_clear()
            return pld.epsilon_of_segments([(s, q, n)], DELTA, interval)

        def sig(t, q, n):
            pld._epsilon.cache_clear()
            return pld.sigma_for(t, DELTA, q, n, interval)

        return eps, sig
    if name == "prv":
        from opacus.accountants import PRVAccountant
        from opacus.accountants.utils import get_noise_multiplier

        def prv_eps(s, q, n):
            accountant = PRVAccountant()
            accountant.history = [(s, q, n)]
            return accountant.get_epsilon(DELTA, eps_error=0.01)

        return (prv_eps,
                lambda t, q, n: get_noise_multiplier(target_epsilon=t, target_delta=DELTA,
                                                     sample_rate=q, steps=n,
                                                     accountant="prv", epsilon_tolerance=0.01))
    raise ValueError(name)


def _timed(fn, *args, repeats: int) -> tuple[float, float]:
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn(*args)
        times.append(time.perf_counter() - start)
    return float(value), statistics.median(times)


def _measure(eps_fn, sigma_fn, fixed_sigma, q, steps, target, quick):
    try:
        eps, eps_s = _timed(eps_fn, fixed_sigma, q, steps, repeats=1 if quick else 3)
        sigma, sigma_s = _timed(sigma_fn, target, q, steps, repeats=1)
        return eps, eps_s, sigma, sigma_s, eps_fn(sigma, q, steps), None
    except Exception as exc:  # a failing accountant is a result, not a crash
        nan = float("nan")
        return nan, nan, nan, nan, nan, f"{type(exc).__name__}: {exc}"


def run(quick: bool) -> list[dict]:
    names = ["rdp", "pld", "prv"] if quick else ["rdp", "pld", "pld_1e-4", "prv"]
    cases = [c for c in CASES if not quick or c[0] in QUICK_CASES]
    funcs = {name: _functions(name) for name in names}
    rows: list[dict] = []
    for case, q, steps, target in cases:
        rdp_sigma_for = funcs["rdp"][1]
        fixed_sigma, _ = _timed(rdp_sigma_for, target, q, steps, repeats=1)
        for name in names:
            eps_fn, sigma_fn = funcs[name]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                eps, eps_s, sigma, sigma_s, reached, error = _measure(
                    eps_fn, sigma_fn, fixed_sigma, q, steps, target, quick)
            order_warnings = sum("Optimal order" in str(w.message) for w in caught)
            rows.append({
                "accountant": name, "case": case, "sample_rate": q, "steps": steps,
                "delta": DELTA, "target_epsilon": target, "fixed_sigma": fixed_sigma,
                "epsilon": eps, "epsilon_vs_rdp_pct": None, "ms_per_epsilon": eps_s * 1e3,
                "sigma": sigma, "epsilon_at_sigma": reached, "noise_saving_pct": None,
                "s_per_sigma_for": sigma_s, "optimal_order_warnings": order_warnings,
                "error": error,
            })
        base = next(r for r in rows if r["case"] == case and r["accountant"] == "rdp")
        for row in rows:
            if row["case"] == case:
                row["epsilon_vs_rdp_pct"] = 100 * (row["epsilon"] / base["epsilon"] - 1)
                row["noise_saving_pct"] = 100 * (1 - row["sigma"] / base["sigma"])
        print(f"  {case} done", file=sys.stderr, flush=True)
    memory = {}
    for name in ("rdp", "pld", "prv"):
        fresh, _ = _memory(name, peer=False)
        over_peer, first = _memory(name, peer=True)
        memory[name] = {"import_rss_mb": fresh, "peer_import_rss_mb": over_peer,
                        "peer_first_epsilon_rss_mb": first}
    for row in rows:
        row.update(memory.get(row["accountant"].split("_")[0], {}))
        row["machine"] = f"{platform.machine()} python {platform.python_version()}"
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'case':<19}{'acct':<9}{'eps@σ_rdp':>10}{'vs rdp':>8}{'ms/eps':>8}"
            f"{'σ(target)':>10}{'saving':>8}{'s/σ_for':>8}{'import MB':>10}{'peer MB':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['case']:<19}{r['accountant']:<9}{r['epsilon']:>10.3f}"
            f"{r['epsilon_vs_rdp_pct']:>7.1f}%{r['ms_per_epsilon']:>8.0f}{r['sigma']:>10.3f}"
            f"{r['noise_saving_pct']:>7.1f}%{r['s_per_sigma_for']:>8.2f}"
            f"{r.get('import_rss_mb', float('nan')):>10.1f}"
            f"{r.get('peer_import_rss_mb', float('nan')):>8.1f}"
            + (f"  [{r['optimal_order_warnings']} order warnings]"
               if r["optimal_order_warnings"] else "")
            + (f"  ERROR {r['error']}" if r["error"] else ""))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 cases, 3 accountants (<60 s)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON")
    args = parser.parse_args()
    rows = run(args.quick)
    print(table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
