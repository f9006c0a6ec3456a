"""A peer process that SIGKILLs itself at one point of a session (tests of dropouts).

``python -m tests.dying_peer URL NETWORK KEY CERT ADMISSION_HEX MODEL_ID PARAM_COUNT
--die-before KIND | --die-after KIND [options]`` runs a real node with a fixed update
(:func:`victim_update`) and kills itself (printing ``KILLED``) right before or right after it
publishes its first message of that wire kind, e.g. before its PARTIAL (Shamir: its shares are
out) or after its MASKED (masked: its vector is out, nothing after it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def victim_update(param_count: int, seed: int, coords: int, scale: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The update the dying peer offers (also what a test compares the group sum against)."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(param_count, size=coords, replace=False)).astype(np.uint32)
    return idx, rng.normal(0, scale, idx.size).astype(np.float32)


def spawn_dying_peer(url: str, network: str, key: Path, cert: Path, admission_hex: str,
                     model_id: str, param_count: int, *options: str) -> subprocess.Popen[bytes]:
    """Start it (stdout and stderr piped, so a test can read ``KILLED`` and the errors)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.dying_peer", url, network, str(key), str(cert),
         admission_hex, model_id, str(param_count), *options],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


async def _run(args: argparse.Namespace) -> None:
    from crypto.admission import Certificate
    from crypto.identity import Identity
    from peer.network.node import NodeConfig, Peer
    from peer.network.session.shamir import SessionTimeouts
    from peer.network.transport import BrokerSettings
    from protocol import messages as m
    from protocol.codec import decode_message
    from sim.idle_peer import IdleTrainer

    die_on = m.Kind[args.die_before or args.die_after]
    config = NodeConfig(group_size=args.group, threshold=args.threshold,
                        session_kind=args.session_kind,
                        timeouts=SessionTimeouts(1.0, 2.0, 2.0, 2.0), announce_interval_s=2.0,
                        train=False, auto_start=args.auto_start, start_jitter_s=0.2,
                        tick_s=0.02)
    peer = Peer(identity=Identity.load(args.key),
                certificate=Certificate.from_bytes(Path(args.cert).read_bytes()),
                admission_public_key=bytes.fromhex(args.admission_hex),
                network_id=args.network, trainer=IdleTrainer(args.model_id, args.param_count),
                broker=BrokerSettings(url=args.url), config=config)
    publish = peer.transport.publish

    def die_if(payload: bytes) -> None:
        if payload and decode_message(payload).header.kind is die_on:
            print("KILLED", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    async def publish_then_die(topic: str, payload: bytes, retain: bool = False) -> Any:
        if args.die_before:
            die_if(payload)
        await publish(topic, payload, retain=retain)
        if args.die_after:
            die_if(payload)

    peer.transport.publish = publish_then_die  # type: ignore[method-assign]
    peer.offer_update(*victim_update(args.param_count, args.seed, args.coords, args.scale))
    await peer.run(asyncio.Event())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("url", "network", "key", "cert", "admission_hex", "model_id"):
        parser.add_argument(name)
    parser.add_argument("param_count", type=int)
    when = parser.add_mutually_exclusive_group(required=True)
    when.add_argument("--die-before", metavar="KIND")
    when.add_argument("--die-after", metavar="KIND")
    parser.add_argument("--session-kind", default="shamir")
    parser.add_argument("--group", type=int, default=3)
    parser.add_argument("--threshold", type=int, default=2)
    parser.add_argument("--auto-start", action="store_true")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--coords", type=int, default=40)
    parser.add_argument("--scale", type=float, default=0.05)
    asyncio.run(_run(parser.parse_args()))


if __name__ == "__main__":
    main()
