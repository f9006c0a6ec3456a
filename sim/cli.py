"""`murmur-sim`: run a simulated Murmur network on this machine and write a report.

With no options it runs the default scenario (8 peers on digits, non-IID, DP-SGD at ε = 3,
top-k, secure aggregation, embedded broker). Options override a scenario file, which overrides
the defaults; every value is checked before anything starts, and a bad one ends the command
with one line naming the option and the problem (exit status 2).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sim.scenario import HOSTILE_KINDS, MODEL_CHOICES, MODES, Scenario, ScenarioError
from sim.scenario_io import apply_overrides, load_scenario, parse_assignment, scenario_summary

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="murmur-sim",
        description="Run a private gossip-learning network of real Murmur peers on this "
        "machine and write an HTML report. With no options: 8 peers on digits, DP at "
        "epsilon 3, top-k, secure aggregation, embedded MQTT broker.",
    )
    parser.add_argument("--scenario", type=Path, metavar="FILE",
                        help="TOML scenario file (options below override it)")
    parser.add_argument("--peers", type=int, help="number of honest peers")
    parser.add_argument("--dataset", help="digits | fashion-mnist[:DIR] | csv:PATH | npz:PATH "
                        "| python:MODULE:LOADER (a loader of your own)")
    parser.add_argument("--model", help=f"{' | '.join(MODEL_CHOICES)} | MODULE:FACTORY (a "
                        "model factory of your own)")
    parser.add_argument("--partition", help="iid | dirichlet | shards")
    parser.add_argument("--alpha", type=float, help="Dirichlet concentration (smaller: skewed)")
    dp = parser.add_mutually_exclusive_group()
    dp.add_argument("--dp", dest="dp", action="store_true", default=None,
                    help="DP-SGD on (default)")
    dp.add_argument("--no-dp", dest="dp", action="store_false", help="DP-SGD off")
    privacy = parser.add_mutually_exclusive_group()
    privacy.add_argument("--epsilon", type=float, dest="target_epsilon",
                         help="target epsilon per peer over the planned rounds")
    privacy.add_argument("--noise-multiplier", type=float, dest="noise_multiplier",
                         help="fixed noise multiplier sigma instead of a target epsilon")
    parser.add_argument("--noise", choices=("local", "group"),
                        help="local (default): each peer adds all its noise; group: each group "
                             "release carries one Gaussian shared by its honest members "
                             "(a session per private step; trust: at most max_colluders "
                             "colluders per group, an honest-but-curious broker)")
    parser.add_argument("--honest-min", type=int, dest="honest_min",
                        help="group noise: honest contributors assumed per release (default 3)")
    parser.add_argument("--topk", type=float, dest="topk_fraction",
                        help="fraction of update entries shared (0.001-1)")
    parser.add_argument("--group-size", type=int, dest="group_size")
    parser.add_argument("--threshold", type=int)
    parser.add_argument("--max-colluders", type=int, dest="max_colluders",
                        help="colluding members each peer's privacy must survive: every "
                             "revealed sum holds >= max(3, c + 2) contributions (default 1)")
    parser.add_argument("--session-kind", dest="session_kind",
                        help="shamir (default) | masked: one masked vector per member")
    parser.add_argument("--view-size", type=int, dest="view_size",
                        help="bound each peer's membership view to about this many peers "
                             "(0, the default: every peer)")
    parser.add_argument("--rounds", type=int, help="local rounds per peer")
    parser.add_argument("--duration", type=float, dest="duration_s",
                        help="wall-clock cap in seconds")
    parser.add_argument("--churn", type=float, dest="churn_rate",
                        help="leave events per peer per minute")
    parser.add_argument("--delay-ms", type=float, dest="delay_ms",
                        help="delay added to every message sent (ms)")
    parser.add_argument("--loss", type=float, dest="loss_rate",
                        help="probability a sent message is lost")
    parser.add_argument("--hostile", action="append", dest="hostile_peers",
                        metavar="KIND", help=f"add a hostile peer: {', '.join(HOSTILE_KINDS)} "
                        "(repeatable)")
    parser.add_argument("--broker", help="embedded | mosquitto | mqtt://HOST:PORT | "
                        "mqtts://HOST:PORT")
    parser.add_argument("--mode", help=f"{' | '.join(MODES)}")
    parser.add_argument("--seed", type=int, help="seed for data split and faults "
                        "(never for keys or DP noise)")
    parser.add_argument("--out", type=Path, dest="out_dir", help="directory for run folders")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set any scenario option, e.g. --set local_steps=5 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--serve-check", action="store_true",
                        help="after the run, serve the first peer's final model privately "
                             "and answer the test set through it (scatter model only)")
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip the centralized / standalone baselines")
    parser.add_argument("--audit", action="store_true",
                        help="after the run, audit the scenario's noise: a one-run lower "
                             "bound on epsilon from canaries (two reference-engine runs), "
                             "added to the report")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log INFO to stderr too (always in RUN_DIR/sim.log)")
    return parser


_OPTION_KEYS = ("peers", "dataset", "model", "partition", "alpha", "dp", "target_epsilon",
                "noise_multiplier", "noise", "honest_min", "topk_fraction", "group_size",
                "threshold",
                "max_colluders", "session_kind", "view_size", "rounds",
                "duration_s", "churn_rate", "delay_ms", "loss_rate", "hostile_peers", "broker",
                "mode", "seed", "out_dir")


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    """Defaults <- scenario file <- --set assignments <- named options (ScenarioError)."""
    overrides: dict[str, Any] = {}
    for text in args.set:
        key, value = parse_assignment(text)
        overrides[key] = value
    for key in _OPTION_KEYS:
        value = getattr(args, key)
        if value is not None:
            overrides[key] = list(value) if isinstance(value, list) else value
    if args.scenario is not None:
        return load_scenario(args.scenario, overrides)
    return apply_overrides(Scenario(), overrides)


class _TerminalFilter(logging.Filter):
    """On the terminal: the simulation's own warnings, and errors from anything.

    Peers' warnings (e.g. "privacy budget spent", which every peer reaches at the planned end
    of a DP run) are expected events of a simulation: they go to RUN_DIR/sim.log only, so the
    progress bar stays readable.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.name.startswith("sim")


def _configure_logging(verbose: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        stderr.addFilter(_TerminalFilter())
    # The RDP accountant warns when its best order is the largest one it tries (tiny sample
    # rates); the epsilon it returns is still a valid upper bound.
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    stderr.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        scenario = scenario_from_args(args)
    except ScenarioError as exc:
        print(f"murmur-sim: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _configure_logging(args.verbose)
    from sim.runner import SimulationError, format_result, run_simulation

    for label, value in scenario_summary(scenario):
        print(f"{label:<12} {value}")
    try:
        result = asyncio.run(run_simulation(scenario, progress=not args.no_progress,
                                            baselines=not args.no_baselines,
                                            audit=args.audit))
    except (SimulationError, OSError) as exc:
        print(f"murmur-sim: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("murmur-sim: aborted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(format_result(result))
    if args.serve_check and not result.interrupted:
        return _serve_check(scenario, result.run_dir)
    return EXIT_INTERRUPTED if result.interrupted else EXIT_OK


def _serve_check(scenario: Scenario, run_dir: Path) -> int:
    from peer.errors import PeerError
    from sim.serve_check import serve_check

    try:
        check = asyncio.run(serve_check(scenario, run_dir))
    except (PeerError, OSError, ValueError) as exc:
        print(f"murmur-sim: serve check: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"serve check  {check.rows} test rows answered privately: classes agree with the "
          f"plaintext model on {check.agreement_pct:.2f} %, logits exact on "
          f"{check.exact_pct:.2f} %")
    return EXIT_OK if check.exact_pct == 100.0 else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
