"""One simulated peer as its own OS process (``murmur-sim --mode processes``).

Started by sim/processes.py as ``python -m sim.peer_process --spec FILE [--rejoin]``. The spec
(JSON, mode 0600 in RUN_DIR/secrets) names the peer's key and certificate files, its data
shard, the broker and the scenario. The process builds the same real ``peer.network.node.Peer`` a
device would run and appends its metrics rows to the shared RUN_DIR/metrics.jsonl (one
O_APPEND write per row, so processes never interleave lines).

Signals: SIGTERM = end of the run (stop cleanly, evaluate on the test set, write the final
row); SIGUSR1 = churn leave (stop cleanly, checkpoint, save the cumulative counters to
STATE_DIR/carry.json for the next incarnation, which is started with ``--rejoin``).
Exit status 0 on a clean stop, 2 for an unusable spec.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import signal
import sys
import tomllib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sim.scenario import Scenario
    from sim.setup import PeerPlan

log = logging.getLogger("sim.peer_process")

CARRY_FILE = "carry.json"


def _load_spec(path: Path) -> dict[str, Any]:
    spec = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(spec, dict):
        raise ValueError("spec must be a JSON object")
    return spec


def _plan(spec: dict[str, Any], scenario: Scenario, train: Any) -> PeerPlan:
    """The sim.setup.PeerPlan the runner made for this peer, rebuilt from the spec's files."""
    from crypto.admission import Certificate
    from crypto.identity import Identity
    from sim.setup import PeerPlan, local_data

    peer_id = str(spec["peer_id"])
    index = int(spec["index"])
    hostile_kind = spec.get("hostile_kind")
    shard = np.load(spec["shard_file"])
    local_train, holdout = local_data(scenario, train, shard, index=index, peer_id=peer_id,
                                      hostile_kind=hostile_kind)
    return PeerPlan(
        index=index, peer_id=peer_id,
        identity=Identity.load(Path(spec["identity_file"])),
        certificate=Certificate.from_bytes(Path(spec["certificate_file"]).read_bytes()),
        shard=shard, train=local_train, holdout=holdout, state_dir=Path(spec["state_dir"]),
        hostile_kind=hostile_kind,
    )


def _broker(spec: dict[str, Any]) -> Any:
    from peer.network.transport import BrokerSettings

    b = spec["broker"]
    return BrokerSettings(url=b["url"], username=b.get("username"), password=b.get("password"),
                          ca_file=Path(b["ca_file"]) if b.get("ca_file") else None)


def _save_carry(path: Path, carry: dict[str, Any]) -> None:
    from peer.files import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(carry).encode("utf-8"), mode=0o644, overwrite=True)


class _Incarnation:
    """This process's life as one peer: built from the spec, run until a signal, recorded."""

    def __init__(self, spec: dict[str, Any], *, rejoin: bool) -> None:
        from peer.training.data import load_source
        from sim.faults import FaultStats
        from sim.metrics import MetricsWriter
        from sim.scenario import resolve_model
        from sim.scenario_io import scenario_from_dict
        from sim.setup import build_sim_trainer

        self.scenario = scenario_from_dict(tomllib.loads(spec["scenario"]), source="peer spec")
        train, self.test = load_source(self.scenario.dataset)
        self.plan = _plan(spec, self.scenario, train)
        model_name = resolve_model(self.scenario.model, tuple(train.x.shape[1:]))
        self.trainer = build_sim_trainer(self.scenario, model_name, self.plan,
                                         spec.get("group_sigma_eff"))
        self.carry_path = self.plan.state_dir / CARRY_FILE
        self.rejoin = rejoin
        self.carry = (json.loads(self.carry_path.read_text())
                      if rejoin and self.carry_path.exists() else None)
        # A fresh fault stream per incarnation, still determined by the seed and the peer.
        self.number = 0 if self.carry is None else int(self.carry.get("incarnation", 0)) + 1
        self.faults = FaultStats()
        self.writer = None if self.plan.hostile_kind else MetricsWriter(
            Path(spec["run_dir"]), start_time=float(spec["start_time"]))
        self.peer: Any = None  # events before the node exists are not recorded
        self.peer = self._build_peer(spec)

    def _build_peer(self, spec: dict[str, Any]) -> Any:
        from sim.carry import RECORDED_EVENTS, event_extra
        from sim.setup import build_sim_peer

        def on_event(event: Any) -> None:
            if self.writer is None or self.peer is None or event.kind not in RECORDED_EVENTS:
                return
            self.writer.record_status(self.status(), event.kind, **event_extra(event))

        s, index = self.scenario, self.plan.index
        return build_sim_peer(
            s, self.plan, self.trainer,
            admission_public_key=bytes.fromhex(spec["admission_public_key"]),
            broker=_broker(spec), round_pause_s=float(spec["round_pause_s"]),
            fault_rng=random.Random(s.seed * 100_003 + index * 101 + self.number),
            fault_stats=self.faults, on_event=on_event)

    def status(self) -> Any:
        return self.peer.status().plus(self.carry)

    async def run(self, stop: asyncio.Event) -> None:
        from sim.metrics import EVENT_JOIN, EVENT_START

        if self.writer is not None:
            self.writer.record_status(self.status(), EVENT_JOIN if self.rejoin else EVENT_START)
        log.info("%s running (incarnation %d)", self.plan.peer_id, self.number)
        await self.peer.run(stop)

    async def finish(self, end_of_run: bool) -> None:
        """The last row (with the test accuracy at the end of the run); on a leave, the
        counters to carry into the next incarnation."""
        from sim.carry import add_carry
        from sim.metrics import EVENT_LEAVE, EVENT_STOP

        status = self.status()
        if self.writer is not None:
            if end_of_run:
                accuracy = await asyncio.to_thread(self.trainer.evaluate, self.test)
                self.writer.record_status(
                    status, EVENT_STOP,
                    test_accuracy=None if math.isnan(accuracy) else float(accuracy),
                    incarnations=self.number + 1, injected_losses=self.faults.lost)
            else:
                self.writer.record_status(status, EVENT_LEAVE)
            self.writer.close()
        if not end_of_run:
            new_carry = add_carry(self.carry, self.peer.status())
            new_carry["incarnation"] = self.number
            _save_carry(self.carry_path, new_carry)


async def run_peer(spec: dict[str, Any], *, rejoin: bool) -> int:
    incarnation = _Incarnation(spec, rejoin=rejoin)
    stop = asyncio.Event()
    final = {"end_of_run": False}

    def on_signal(end_of_run: bool) -> None:
        final["end_of_run"] = end_of_run
        stop.set()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, on_signal, True)
    loop.add_signal_handler(signal.SIGUSR1, on_signal, False)
    loop.add_signal_handler(signal.SIGINT, on_signal, True)
    if _EARLY_STOP:
        on_signal(_EARLY_STOP["end_of_run"])
    await incarnation.run(stop)
    await incarnation.finish(final["end_of_run"])
    log.info("%s stopped (%s)", incarnation.plan.peer_id,
             "end of run" if final["end_of_run"] else "leave")
    return 0


#: A stop requested before the event loop runs (the process may still be importing torch when
#: the runner ends the run or churns it): "end" or "leave". Read once the loop is up.
_EARLY_STOP: dict[str, bool] = {}


def _early_signal(signum: int, _frame: Any) -> None:
    _EARLY_STOP["end_of_run"] = signum != signal.SIGUSR1


def main(argv: Sequence[str] | None = None) -> int:
    # Before anything slow: the default action of SIGTERM/SIGUSR1 would kill the process
    # without its final row or checkpoint.
    signal.signal(signal.SIGTERM, _early_signal)
    signal.signal(signal.SIGUSR1, _early_signal)
    parser = argparse.ArgumentParser(prog="python -m sim.peer_process")
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--rejoin", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    try:
        spec = _load_spec(args.spec)
    except (OSError, ValueError) as exc:
        print(f"peer_process: cannot read spec {args.spec}: {exc}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1)  # several peer processes share the cores
    return asyncio.run(run_peer(spec, rejoin=args.rejoin))


if __name__ == "__main__":
    sys.exit(main())
