"""What the README's by-hand demo shows: three peers on non-IID digits shards, gossip vs alone.

The three peers are provisioned exactly as ``murmur-peer provision --demo`` does (each its own
Dirichlet(0.5) shard of the digits training split, measured on the shared digits test split,
DP-SGD at the demo's target epsilon 8). Two figures per peer, both on the digits test split:

* ``alone_dp``: the peer's own trainer (same config, same shard) runs every private round its
  budget allows, with nobody to average with;
* ``gossip_dp``: the three daemons, built by the daemon's own ``peer_from_config`` and run in
  one process against a real Mosquitto on loopback, for the demo's budget lifetime (``[pace]
  budget_hours``; shortened with ``--minutes``) plus an averaging tail, then evaluated.

    python bench/demo_bench.py [--quick] [--minutes M] [--tail-s S] [--out FILE]

The full run uses the demo's own 15 minutes; ``--quick`` spreads the same budget over 30 s
(a faster pace than the demo's, same epsilon).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peer.assembly import load_local_data, peer_from_config
from peer.config import PeerConfig, load_config
from peer.demo import DEMO_BUDGET_HOURS
from peer.errors import BudgetExhaustedError
from peer.provision import provision
from peer.training.trainer import LocalTrainer, configure_torch_threads
from sim.broker import MosquittoBroker

PEERS = ("alice", "bob", "carol")


def anonymous(config_path: Path) -> PeerConfig:
    """The provisioned config, without broker credentials (the bench broker is anonymous)."""
    text = config_path.read_text()
    text = text.replace('username =', '# username =').replace('password_file =',
                                                               '# password_file =')
    config_path.write_text(text)
    return load_config(config_path)


def alone(cfg: PeerConfig) -> tuple[float, float, int]:
    """(accuracy, epsilon, private rounds) of the peer's trainer alone until its budget ends."""
    train, holdout = load_local_data(cfg)
    trainer = LocalTrainer(cfg.training, train, holdout, None)
    rounds = 0
    while True:
        try:
            update = trainer.train_round()
        except BudgetExhaustedError:
            break
        rounds += int(update.steps > 0)
    return trainer.evaluate(), float(trainer.epsilon or 0.0), rounds


async def gossip(configs: list[PeerConfig], seconds: float) -> list[tuple[float, float, int]]:
    """Run the daemons for ``seconds``; (accuracy, epsilon, sessions) of each at the end."""
    peers = [peer_from_config(cfg) for cfg in configs]
    stops = [asyncio.Event() for _ in peers]
    tasks = [asyncio.create_task(p.run(s)) for p, s in zip(peers, stops, strict=True)]
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        await asyncio.sleep(5.0)
        line = "  ".join(f"{p.peer_id} {p.status().state} eps {p.gauges.epsilon or 0:.2f}"
                         for p in peers)
        print(f"  {time.monotonic() - started:5.0f} s  {line}", flush=True)
    for stop in stops:
        stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    return [(await asyncio.to_thread(p.trainer.evaluate), float(p.gauges.epsilon or 0.0),
             p.counters.sessions_done) for p in peers]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a 30 s budget lifetime and 5 s of averaging")
    parser.add_argument("--minutes", type=float, default=None,
                        help=f"budget lifetime (default: the demo's {DEMO_BUDGET_HOURS * 60:g})")
    parser.add_argument("--tail-s", type=float, default=None,
                        help="averaging after the budget is spent (default 60, quick 5)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    minutes = args.minutes or (0.5 if args.quick else DEMO_BUDGET_HOURS * 60)
    tail_s = args.tail_s if args.tail_s is not None else (5.0 if args.quick else 60.0)
    configure_torch_threads(1)
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        async with MosquittoBroker() as broker:
            result = provision("demo", list(PEERS), Path(tmp) / "net", broker_url=broker.url,
                               demo=True)
            configs = []
            for files in result.peers:
                cfg = anonymous(files.config)
                configs.append(dataclasses.replace(
                    cfg, pace=dataclasses.replace(cfg.pace, budget_hours=minutes / 60.0),
                    status_interval_s=3600.0))
            for cfg in configs:
                accuracy, epsilon, rounds = alone(cfg)
                rows.append({"peer": cfg.peer_id, "mode": "alone_dp",
                             "accuracy_pct": round(100 * accuracy, 1),
                             "epsilon": round(epsilon, 2), "private_rounds": rounds})
            print(f"gossip: {minutes:g} min of budget + {tail_s:g} s of averaging")
            outcomes = await gossip(configs, minutes * 60.0 + tail_s)
            for cfg, (accuracy, epsilon, sessions) in zip(configs, outcomes, strict=True):
                rows.append({"peer": cfg.peer_id, "mode": "gossip_dp",
                             "accuracy_pct": round(100 * accuracy, 1),
                             "epsilon": round(epsilon, 2), "sessions": sessions,
                             "budget_minutes": minutes})
    print(f"{'peer':<8}{'mode':<11}{'accuracy %':>11}{'epsilon':>9}")
    for row in rows:
        print(f"{row['peer']:<8}{row['mode']:<11}{row['accuracy_pct']:>11}{row['epsilon']:>9}")
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
