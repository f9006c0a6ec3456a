"""Run a simulated Murmur network: N real peers, a real MQTT broker, a report at the end.

``run_simulation(scenario)`` does, in order:

1. creates the run directory ``out_dir/<UTC time>-<network>`` (scenario.toml, metrics.jsonl,
   sim.log, per-peer state directories, report.html);
2. loads the data set, splits the *training* set across the peers (sim.partition, seeded) and
   keeps a local hold-out per peer; the test set is used only for the final accuracies and the
   baselines;
3. creates the network's admission key and one identity + certificate per peer with the real
   crypto (keys come from the OS CSPRNG, never from the scenario seed) - steps 2 and 3 are
   sim/setup.py;
4. starts the broker (embedded amqtt, a managed Mosquitto, or an external URL:
   sim/broker_lifecycle.py);
5. runs every peer as a real ``peer.network.node.Peer`` -
   as tasks of this event loop ("inprocess", sim/inprocess.py) or
   one OS process each ("processes", sim/processes.py and sim/peer_process.py) - with the
   scenario's faults (sim/faults.py) and hostile peers (sim/hostile.py), watched by
   sim/progress.py;
6. stops when every peer has trained ``rounds`` local rounds (or spent its privacy budget), or
   at ``duration_s``, or on Ctrl-C; evaluates every peer on the test set;
7. computes the centralized / standalone baselines on the same split and writes the report.

Every simulated peer has its own keys, certificate, privacy ledger and checkpoint directory and
talks to the others only through the broker: the simulation has no shortcut path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sim.broker import BrokerStartError
from sim.broker_lifecycle import open_broker
from sim.inprocess import run_inprocess
from sim.metrics import METRICS_FILE, MetricsWriter, read_metrics_file
from sim.processes import run_processes
from sim.progress import Progress
from sim.report import write_report
from sim.report_summary import RunSummary, audit_line, summarize, terminal_summary
from sim.scenario import Scenario
from sim.scenario_io import scenario_to_toml
from sim.setup import (
    ROUND_PAUSE_S,
    Prepared,
    SimulationError,
    make_run_dir,
    prepare,
    write_text,
)

__all__ = ["RunResult", "SimulationError", "baseline_inputs", "format_result", "result_dict",
           "run_simulation"]

log = logging.getLogger(__name__)

LOG_FILE = "sim.log"
SCENARIO_FILE = "scenario.toml"
RESULT_FILE = "result.json"


@dataclass
class RunResult:
    """What a run produced: where, how it went, and the figures shown at the end."""

    run_dir: Path
    report_path: Path | None
    metrics_path: Path
    summary: RunSummary
    baselines: dict[str, dict[str, Any]]
    wall_time_s: float
    interrupted: bool
    stopped_by: str  # "rounds" | "duration" | "interrupt"
    hostile: list[dict[str, Any]] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)
    churn_events: int = 0
    audit: dict[str, Any] | None = None  #: ``--audit``: sim.audit_card.ScenarioAudit.to_dict


# ----------------------------------------------------------------------------- the run
def _attach_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / LOG_FILE, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    return handler


def _install_interrupt(stop_requested: asyncio.Event) -> Callable[[], None]:
    """First Ctrl-C (or SIGTERM) stops the peers cleanly and still writes the report."""
    loop = asyncio.get_running_loop()
    installed: list[int] = []

    def on_signal(signum: int) -> None:
        if not stop_requested.is_set():
            print("\nstopping peers and writing the report (Ctrl-C again to abort)...",
                  file=sys.stderr)
            stop_requested.set()
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):
            # Not the main thread (e.g. a test runner thread): no signal handling there.
            continue

    def remove() -> None:
        for signum in installed:
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(signum)

    return remove


def baseline_inputs(prep: Prepared) -> tuple[Any, list[np.ndarray]]:
    """The peers' local training sets pooled, with each peer's rows as its partition: the
    baselines train on exactly what the peers trained on (hold-outs excluded)."""
    from peer.training.data import Dataset

    xs = [p.train.x for p in prep.plans]
    ys = [p.train.y for p in prep.plans]
    pooled = Dataset(x=np.concatenate(xs), y=np.concatenate(ys),
                     num_classes=prep.train.num_classes, name="pooled")
    bounds = np.cumsum([0, *[len(y) for y in ys]])
    parts = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(ys))]
    return pooled, parts


async def run_simulation(scenario: Scenario, *, progress: bool = True,
                         baselines: bool = True,
                         round_pause_s: float = ROUND_PAUSE_S,
                         audit: bool = False) -> RunResult:
    """Run the scenario end to end and write its report (see the module docstring).

    ``baselines=False`` skips the centralized/standalone references; ``round_pause_s`` paces
    the peers' training (see ROUND_PAUSE_S; tests shorten it); ``audit=True`` adds a small
    privacy audit of the scenario's noise after the run (sim/audit_card.py).
    """
    wall_start = time.monotonic()
    run_dir = make_run_dir(Path(scenario.out_dir), scenario.network)
    handler = _attach_log_file(run_dir)
    try:
        return await _run(scenario, run_dir, wall_start, progress=progress,
                          baselines=baselines, round_pause_s=round_pause_s, audit=audit)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


async def _run(scenario: Scenario, run_dir: Path, wall_start: float, *, progress: bool,
               baselines: bool, round_pause_s: float, audit: bool) -> RunResult:
    write_text(run_dir / SCENARIO_FILE, scenario_to_toml(scenario))
    log.info("run directory %s", run_dir)
    stop_requested = asyncio.Event()
    remove_handlers = _install_interrupt(stop_requested)
    bar = Progress(scenario.peers * scenario.rounds, progress)
    writer = MetricsWriter(run_dir)
    try:
        prep = await asyncio.to_thread(prepare, scenario, run_dir)
        prep.round_pause_s = round_pause_s
        log.info("data %s: %d train / %d test, model %s, shards %s", scenario.dataset,
                 len(prep.train.y), len(prep.test.y), prep.model_name,
                 [len(p.shard) for p in prep.plans])
        outcome = await _run_peers(prep, writer, stop_requested, bar)
    finally:
        bar.close()
        writer.close()
        remove_handlers()
    base: dict[str, dict[str, Any]] = {}
    if baselines and not stop_requested.is_set():
        from sim.baselines import compute_baselines

        pooled, parts = baseline_inputs(prep)
        base = await asyncio.to_thread(compute_baselines, scenario, pooled, prep.test, parts)
    card: dict[str, Any] | None = None
    if audit and not stop_requested.is_set():
        from sim.audit_card import audit_scenario

        card = (await asyncio.to_thread(audit_scenario, scenario)).to_dict()
    report_path = await asyncio.to_thread(write_report, run_dir, scenario, base, card)
    result = dataclasses.replace(
        _result(run_dir, report_path, base, outcome, wall_start=wall_start,
                interrupted=stop_requested.is_set()), audit=card)
    write_text(run_dir / RESULT_FILE, json.dumps(result_dict(result), indent=1))
    log.info("done in %.1f s (%s); report %s", result.wall_time_s, result.stopped_by,
             report_path)
    return result


async def _run_peers(prep: Prepared, writer: MetricsWriter, stop_requested: asyncio.Event,
                     bar: Progress) -> dict[str, Any]:
    """The scenario's broker and engine, from the first peer's start to the last one's stop."""
    scenario = prep.scenario
    if scenario.mode == "reference":
        from sim.reference import run_reference

        return await run_reference(prep, writer, stop_requested, bar)
    engine = run_processes if scenario.mode == "processes" else run_inprocess
    try:
        async with open_broker(scenario) as broker:
            log.info("broker %s", broker.url)
            return await engine(prep, broker, writer, stop_requested, bar)
    except BrokerStartError as exc:
        raise SimulationError(f"broker: {exc}") from exc


def _result(run_dir: Path, report_path: Path | None, base: dict[str, dict[str, Any]],
            outcome: dict[str, Any], *, wall_start: float, interrupted: bool) -> RunResult:
    metrics = read_metrics_file(run_dir / METRICS_FILE)
    return RunResult(
        run_dir=run_dir,
        report_path=report_path,
        metrics_path=run_dir / METRICS_FILE,
        summary=summarize(metrics.rows, metrics.skipped_lines),
        baselines=base,
        wall_time_s=time.monotonic() - wall_start,
        interrupted=interrupted,
        stopped_by=outcome["stopped_by"],
        hostile=outcome["hostile"],
        faults=outcome["faults"],
        churn_events=outcome["churn_events"],
    )


def result_dict(result: RunResult) -> dict[str, Any]:
    """JSON-ready summary of a run (written to run_dir/result.json)."""
    summary = dataclasses.asdict(result.summary)
    return {
        "run_dir": str(result.run_dir),
        "report": None if result.report_path is None else str(result.report_path),
        "wall_time_s": round(result.wall_time_s, 2),
        "stopped_by": result.stopped_by,
        "interrupted": result.interrupted,
        "summary": summary,
        "baselines": {k: {kk: vv for kk, vv in v.items() if kk != "per_peer"}
                      for k, v in result.baselines.items()},
        "hostile": result.hostile,
        "faults": result.faults,
        "churn_events": result.churn_events,
        **({"audit": result.audit} if result.audit is not None else {}),
    }


def _describe_hostile(h: dict[str, Any]) -> str:
    if "published" in h:
        return f"{h.get('kind')} client sent {h['published']} messages"
    if "sessions_done" in h:
        return f"{h.get('kind')} insider completed {h['sessions_done']} sessions"
    return f"{h.get('kind')} insider ran"


def format_result(result: RunResult) -> str:
    """The lines printed at the end of a run: the table, then where the report is."""
    lines = [terminal_summary(result.summary, result.baselines)]
    how = {"rounds": "all rounds done", "duration": "time cap reached",
           "interrupt": "interrupted"}.get(result.stopped_by, result.stopped_by)
    lines.append(f"run: {result.wall_time_s:.0f} s ({how}); accuracy on the "
                 f"{result.summary.accuracy_source}")
    if result.hostile:
        lines.append("hostile: " + "; ".join(_describe_hostile(h) for h in result.hostile))
    if result.churn_events:
        lines.append(f"churn: {result.churn_events} leave/rejoin cycles")
    if result.audit is not None:
        lines.append(audit_line(result.audit))
    lines.append(f"report: {result.report_path}")
    return "\n".join(lines)
