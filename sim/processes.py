"""The process engine (``mode = "processes"``): one OS process per peer.

For each peer this writes its key, certificate, data shard and a JSON spec (mode 0600 in
``run_dir/secrets``), then starts ``python -m sim.peer_process --spec FILE``; that process
builds the same peer as the in-process engine (sim/setup.py) and appends its rows to the
shared metrics.jsonl, which this side follows to show progress and to decide when the run is
over. Signals drive the peers: SIGUSR1 is a churn leave (the peer is later restarted with
``--rejoin``), SIGTERM the end of the run (final evaluation and row).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peer.files import atomic_write_bytes
from peer.network.transport import BrokerSettings
from sim import hostile
from sim.faults import ChurnDriver, ChurnEvent, scenario_churn
from sim.metrics import MetricsWriter
from sim.progress import DRAIN_S, Progress, Snapshot, mean, peers_finished, watch
from sim.scenario_io import scenario_to_toml
from sim.setup import PeerPlan, Prepared

log = logging.getLogger(__name__)

#: Bound on a churn leave (stop, checkpoint, exit) and on the end of the run (plus the final
#: evaluation) before the process is killed.
LEAVE_TIMEOUT_S = 30.0
END_TIMEOUT_S = 60.0


def write_spec(prep: Prepared, plan: PeerPlan, broker: BrokerSettings, start_time: float,
               secrets_dir: Path) -> Path:
    """Key files and a JSON spec for one peer process (all mode 0600 in run_dir/secrets)."""
    key_path = secrets_dir / f"{plan.peer_id}.key"
    cert_path = secrets_dir / f"{plan.peer_id}.cert"
    shard_path = plan.state_dir / "shard.npy"
    plan.identity.save(key_path, overwrite=True)
    atomic_write_bytes(cert_path, plan.certificate.to_bytes(), mode=0o600, overwrite=True)
    shard = io.BytesIO()
    np.save(shard, plan.shard)
    atomic_write_bytes(shard_path, shard.getvalue(), mode=0o644, overwrite=True)
    spec = {
        "peer_id": plan.peer_id,
        "index": plan.index,
        "hostile_kind": plan.hostile_kind,
        "run_dir": str(prep.run_dir),
        "state_dir": str(plan.state_dir),
        "start_time": start_time,
        "identity_file": str(key_path),
        "certificate_file": str(cert_path),
        "admission_public_key": prep.admission.public_key.hex(),
        "broker": {"url": broker.url, "username": broker.username,
                   "password": broker.password,
                   "ca_file": None if broker.ca_file is None else str(broker.ca_file)},
        "shard_file": str(shard_path),
        "scenario": scenario_to_toml(prep.scenario),
        "round_pause_s": prep.round_pause_s,
        "group_sigma_eff": prep.group_sigma_eff,  # group noise: one sigma for the network
    }
    spec_path = secrets_dir / f"{plan.peer_id}.json"
    atomic_write_bytes(spec_path, json.dumps(spec, indent=1).encode(), mode=0o600,
                       overwrite=True)
    return spec_path


class MetricsTail:
    """Follows metrics.jsonl written by the peer processes (complete lines only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.latest: dict[str, dict[str, Any]] = {}

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as source:
                source.seek(self.offset)
                data = source.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return
        self.offset += end + 1
        for line in data[: end + 1].splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("peer"), str):
                self.latest[row["peer"]] = row


@dataclass
class ProcPeer:
    plan: PeerPlan
    spec: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    spawned_t: float = 0.0  # metrics time of the last spawn
    churning: bool = False

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def spawn(proc_peer: ProcPeer, *, rejoin: bool) -> None:
    """Start the peer's process (``--rejoin``: resume its counters after a churn leave)."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    args = [sys.executable, "-m", "sim.peer_process", "--spec", str(proc_peer.spec)]
    if rejoin:
        args.append("--rejoin")
    with open(proc_peer.log_path, "ab") as log_file:
        proc_peer.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
            cwd=str(root))


async def _wait_exit(process: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return process.poll()


async def end_process(proc_peer: ProcPeer, sig: int, timeout_s: float) -> None:
    """Send ``sig`` and wait for the exit; kill the process if it outlasts ``timeout_s``."""
    process = proc_peer.process
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    if await _wait_exit(process, timeout_s) is None:
        log.error("%s (pid %d) did not exit after signal %d; killing it",
                  proc_peer.plan.peer_id, process.pid, sig)
        process.kill()
        await _wait_exit(process, 5.0)


class ProcessNetwork:
    """The peer processes of a run, seen through their metrics rows."""

    def __init__(self, prep: Prepared, broker: BrokerSettings, writer: MetricsWriter) -> None:
        self.prep = prep
        self.s = prep.scenario
        self.writer = writer
        self.procs: list[ProcPeer] = []
        self.hostile_procs: list[ProcPeer] = []
        self.tail = MetricsTail(writer.path)
        self.finished = False  # set when the run ends: no more leaves or rejoins
        self.away = 0  # peers between a churn leave and their rejoin
        secrets_dir = prep.run_dir / "secrets"
        secrets_dir.mkdir(mode=0o700, exist_ok=True)
        prep.admission.save(secrets_dir / "admission.key", overwrite=True)
        for plan in (*prep.plans, *prep.hostile_plans):
            spec = write_spec(prep, plan, broker, writer.start_time, secrets_dir)
            proc_peer = ProcPeer(plan, spec, plan.state_dir / "process.log")
            (self.hostile_procs if plan.hostile_kind else self.procs).append(proc_peer)

    def start(self) -> None:
        for proc_peer in (*self.procs, *self.hostile_procs):
            spawn(proc_peer, rejoin=False)

    def _is_up(self, proc_peer: ProcPeer) -> bool:
        """Whether the current process wrote a row: one still importing torch is no peer."""
        self.tail.poll()
        row = self.tail.latest.get(proc_peer.plan.peer_id)
        return row is not None and float(row.get("t", -1.0)) >= proc_peer.spawned_t

    async def churn_one(self, event: ChurnEvent) -> bool:
        """One leave/rejoin cycle of a peer that is up; True once it rejoined."""
        proc_peer = self.procs[event.peer_index]
        if self.finished or proc_peer.churning or not proc_peer.running():
            return False
        if not self._is_up(proc_peer):
            log.info("churn: %s is still starting; leave skipped", proc_peer.plan.peer_id)
            return False
        log.info("churn: %s leaves for %.1f s", proc_peer.plan.peer_id, event.downtime_s)
        self.away += 1
        proc_peer.churning = True
        try:
            # SIGUSR1: leave (clean stop, checkpoint, no final evaluation): sim/peer_process.py
            await end_process(proc_peer, signal.SIGUSR1, LEAVE_TIMEOUT_S)
            await asyncio.sleep(event.downtime_s)
            if self.finished:
                return False
            log.info("churn: %s rejoins", proc_peer.plan.peer_id)
            proc_peer.spawned_t = self.writer.elapsed()
            spawn(proc_peer, rejoin=True)
            return True
        finally:
            self.away -= 1
            proc_peer.churning = False

    def snapshot(self) -> Snapshot:
        self.tail.poll()
        rows = [self.tail.latest.get(p.plan.peer_id) for p in self.procs]
        present = [r for r in rows if r is not None]
        alive = sum(1 for p in self.procs if p.running())
        if alive == 0 and self.away == 0:
            # Every peer process ended on its own (crashed, see its process.log): nothing
            # more will happen, so end the run and report what there is.
            log.error("all peer processes have exited; ending the run")
            return {"alive": 0, "rounds": 0, "sessions": 0, "accuracy": None,
                    "epsilon": None, "finished": True, "in_session": False}
        rounds = self.s.rounds
        return {
            "alive": alive,
            "rounds": sum(min(int(r.get("round") or 0), rounds) for r in present),
            "sessions": sum(int(r.get("sessions_done", 0)) for r in present),
            "accuracy": mean([r["accuracy"] for r in present if r.get("accuracy") is not None]),
            "epsilon": mean([r["epsilon"] for r in present if r.get("epsilon") is not None]),
            "finished": len(present) == len(self.procs) and peers_finished(self.s, [
                int(r.get("round") or 0) >= rounds
                or bool(r.get("extra", {}).get("budget_exhausted")) for r in present]),
            "in_session": False,
        }

    async def end(self) -> None:
        """SIGTERM to every process: stop, evaluate on the test set, write the final row."""
        await asyncio.gather(*(end_process(p, signal.SIGTERM, END_TIMEOUT_S)
                               for p in (*self.procs, *self.hostile_procs)))
        for proc_peer in self.procs:
            code = None if proc_peer.process is None else proc_peer.process.returncode
            if code not in (0, None):
                log.warning("%s exited with code %s (see %s)", proc_peer.plan.peer_id, code,
                            proc_peer.log_path)


def _param_count(prep: Prepared) -> int:
    from peer.training.models import build_model, param_count

    return param_count(build_model(prep.model_name, tuple(prep.train.x.shape[1:]),
                                   prep.train.num_classes))


async def run_processes(prep: Prepared, broker: BrokerSettings, writer: MetricsWriter,
                        stop_requested: asyncio.Event, progress: Progress) -> dict[str, Any]:
    """Run every peer as its own process until the run ends; the run's outcome."""
    s = prep.scenario
    net = ProcessNetwork(prep, broker, writer)
    started = time.monotonic()
    net.start()
    hostile_stop = asyncio.Event()
    hostile_tasks = hostile.start_raw_clients(s, broker, [p.peer_id for p in prep.plans],
                                              hostile_stop, param_count=_param_count(prep))
    churn = ChurnDriver(scenario_churn(s), started, net.churn_one)
    churn.start()
    stopped_by = await watch(s, started, stop_requested, progress, net.snapshot)
    if stopped_by == "rounds":
        await asyncio.sleep(DRAIN_S / 2)  # sessions in flight are invisible from here
    net.finished = True
    await churn.stop()
    hostile_stop.set()
    await net.end()
    raw_hostile = await hostile.collect_raw_clients(hostile_tasks)
    return {
        "stopped_by": stopped_by,
        "hostile": raw_hostile
        + [{"kind": p.plan.hostile_kind, "peer": p.plan.peer_id} for p in net.hostile_procs],
        "faults": {},
        "churn_events": churn.completed(),
    }
