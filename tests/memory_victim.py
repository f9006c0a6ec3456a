"""A real peer in its own process, whose memory tests/test_held_memory_mosquitto.py measures.

``python -m tests.memory_victim URL NETWORK KEY CERT ADMISSION_HEX MODEL_ID PARAM_COUNT
[--session-kind KIND] [--start-timeout S]`` runs a node that trains nothing, starts no
session and offers one small update, so it accepts the first invitation it gets (and the next
one once that session ended). Every ``--every`` seconds it prints one JSON line of its public
read-outs (``Peer.status()``): connected, in_session, messages_received, view_peers, drops.
Its RSS is read by the test from /proc/<pid>/status, so nothing else shares the process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

import numpy as np

from crypto.admission import Certificate
from crypto.identity import Identity
from peer.network.node import NodeConfig, Peer
from peer.network.session.shamir import SessionTimeouts
from peer.network.transport import BrokerSettings
from sim.idle_peer import IdleTrainer

ROOT = Path(__file__).resolve().parent.parent


def victim_args(url: str, network: str, key: Path, cert: Path, admission_hex: str,
                model_id: str, param_count: int, *options: str) -> list[str]:
    """The command line that runs it (for asyncio.create_subprocess_exec, cwd ROOT)."""
    return [sys.executable, "-m", "tests.memory_victim", url, network, str(key), str(cert),
            admission_hex, model_id, str(param_count), *options]


def child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


async def _report(peer: Peer, every: float) -> None:
    while True:
        st = peer.status()
        line = {"connected": st.connected, "in_session": st.in_session,
                "received": st.messages_received, "view_peers": st.view_peers,
                "drops": st.drops}
        print(json.dumps(line), flush=True)
        await asyncio.sleep(every)


async def _run(args: argparse.Namespace) -> None:
    config = NodeConfig(group_size=3, threshold=2, session_kind=args.session_kind,
                        timeouts=SessionTimeouts(1.0, args.start_timeout, 2.0, 2.0),
                        announce_interval_s=30.0, train=False, auto_start=False, tick_s=0.02)
    peer = Peer(identity=Identity.load(args.key),
                certificate=Certificate.from_bytes(Path(args.cert).read_bytes()),
                admission_public_key=bytes.fromhex(args.admission_hex),
                network_id=args.network, trainer=IdleTrainer(args.model_id, args.param_count),
                broker=BrokerSettings(url=args.url), config=config)
    indices = np.arange(0, args.param_count, max(1, args.param_count // 8), dtype=np.uint32)
    peer.offer_update(indices, np.full(indices.size, 0.01, dtype=np.float32))
    reporter = asyncio.create_task(_report(peer, args.every))
    try:
        await peer.run(asyncio.Event())  # until the test kills the process
    finally:
        reporter.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("url", "network", "key", "cert", "admission_hex", "model_id"):
        parser.add_argument(name)
    parser.add_argument("param_count", type=int)
    parser.add_argument("--session-kind", default="shamir")
    parser.add_argument("--start-timeout", type=float, default=2.0)
    parser.add_argument("--every", type=float, default=0.02)
    asyncio.run(_run(parser.parse_args()))


if __name__ == "__main__":
    main()
