"""One simulated peer as its own OS process (``murmur-sim --mode processes``).

Started by sim/runner.py as ``python -m sim.peer_process --spec FILE [--rejoin]``. The spec
(JSON, mode 0600 in RUN_DIR/secrets) names the peer's key and certificate files, its data
shard, the broker and the scenario. The process builds the same real ``peer.node.Peer`` a
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
from typing import Any

import numpy as np

log = logging.getLogger("sim.peer_process")

CARRY_FILE = "carry.json"


def _load_spec(path: Path) -> dict[str, Any]:
    spec = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(spec, dict):
        raise ValueError("spec must be a JSON object")
    return spec


def _write_json_atomic(path: Path, data: Any) -> None:
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(data, out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


async def run_peer(spec: dict[str, Any], *, rejoin: bool) -> int:
    from crypto.admission import Certificate
    from crypto.identity import Identity
    from peer.data import load_source, split_holdout
    from peer.node import Peer, PeerEvent
    from peer.trainer import LocalTrainer
    from peer.transport import BrokerSettings
    from sim import hostile
    from sim.faults import FaultStats, install_send_faults
    from sim.metrics import EVENT_JOIN, EVENT_LEAVE, EVENT_START, EVENT_STOP, MetricsWriter
    from sim.runner import (
        RECORDED_EVENTS,
        add_carry,
        event_extra,
        node_config,
        trainer_config,
        with_carry,
    )
    from sim.scenario import resolve_model, scenario_from_dict

    scenario = scenario_from_dict(tomllib.loads(spec["scenario"]), source="peer spec")
    peer_id = str(spec["peer_id"])
    index = int(spec["index"])
    hostile_kind = spec.get("hostile_kind")
    state_dir = Path(spec["state_dir"])
    identity = Identity.load(Path(spec["identity_file"]))
    certificate = Certificate.from_bytes(Path(spec["certificate_file"]).read_bytes())
    train, test = load_source(scenario.dataset)
    shard = np.load(spec["shard_file"])
    holdout_seed = scenario.seed if hostile_kind else scenario.seed + index
    local_train, holdout = split_holdout(train.subset(shard), scenario.holdout_fraction,
                                         holdout_seed)
    model_name = resolve_model(scenario.model, tuple(train.x.shape[1:]))
    trainer: Any = LocalTrainer(trainer_config(scenario, model_name), local_train, holdout,
                                state_dir)
    if hostile_kind == "huge_norm":
        trainer = hostile.HugeNormTrainer(trainer)
    b = spec["broker"]
    broker = BrokerSettings(url=b["url"], username=b.get("username"), password=b.get("password"),
                            ca_file=Path(b["ca_file"]) if b.get("ca_file") else None)
    carry_path = state_dir / CARRY_FILE
    carry = json.loads(carry_path.read_text()) if rejoin and carry_path.exists() else None
    writer = None if hostile_kind else MetricsWriter(Path(spec["run_dir"]),
                                                     start_time=float(spec["start_time"]))
    peer: Peer | None = None

    def on_event(event: PeerEvent) -> None:
        if writer is None or peer is None or event.kind not in RECORDED_EVENTS:
            return
        writer.record_status(with_carry(peer.status(), carry), event.kind, **event_extra(event))

    peer = Peer(identity=identity, certificate=certificate,
                admission_public_key=bytes.fromhex(spec["admission_public_key"]),
                network_id=scenario.network, trainer=trainer, broker=broker,
                config=node_config(scenario, float(spec["round_pause_s"])), on_event=on_event)
    faults = FaultStats()
    # A fresh fault stream per incarnation, still determined by the seed and the peer.
    incarnation = 0 if carry is None else int(carry.get("incarnation", 0)) + 1
    install_send_faults(peer.transport, delay_ms=scenario.delay_ms,
                        loss_rate=scenario.loss_rate,
                        rng=random.Random(scenario.seed * 100_003 + index * 101 + incarnation),
                        stats=faults)
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
    if writer is not None:
        writer.record_status(with_carry(peer.status(), carry),
                             EVENT_JOIN if rejoin else EVENT_START)
    log.info("%s running (incarnation %d)", peer_id, incarnation)
    await peer.run(stop)
    status = with_carry(peer.status(), carry)
    if writer is not None:
        if final["end_of_run"]:
            accuracy = await asyncio.to_thread(trainer.evaluate, test)
            writer.record_status(status, EVENT_STOP,
                                 test_accuracy=None if math.isnan(accuracy) else float(accuracy),
                                 incarnations=incarnation + 1, injected_losses=faults.lost)
        else:
            writer.record_status(status, EVENT_LEAVE)
        writer.close()
    if not final["end_of_run"]:
        new_carry = add_carry(carry, peer.status())
        new_carry["incarnation"] = incarnation
        _write_json_atomic(carry_path, new_carry)
    log.info("%s stopped (%s)", peer_id, "end of run" if final["end_of_run"] else "leave")
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
