"""An idle Murmur peer in its own process: it announces and answers, but trains nothing.

Tests and scripts start one to have a real peer process they can SIGKILL, so that the broker
publishes the last will the peer signed for its connection (docs/protocol.md, section 2)::

    python -m sim.idle_peer URL NETWORK KEY_FILE CERT_FILE ADMISSION_HEX
        [--model-id ID] [--param-count N] [--announce-interval S] [--silence-expiry S]

It never offers an update, so it declines every invitation (``no_update``) and starts no
session; :func:`spawn_idle_peer` runs it and :func:`write_identity` makes its key and
certificate.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from crypto.admission import AdmissionKey, Certificate
from crypto.identity import Identity
from peer.network.node import NodeConfig, Peer
from peer.network.transport import BrokerSettings

_ROOT = Path(__file__).resolve().parent.parent


class IdleTrainer:
    """A trainer stand-in that is never asked to train (``NodeConfig(train=False)``)."""

    def __init__(self, model_id: str, param_count: int) -> None:
        self.model_id, self.param_count = model_id, param_count

    def train_round(self) -> Any:
        raise RuntimeError("an idle peer does not train")

    def apply_update(self, indices: Any, values: Any) -> None:
        pass  # nothing to merge into: it never contributes to a session

    def evaluate(self) -> float:
        return 0.0

    def save_checkpoint(self) -> None:
        pass  # no state


def write_identity(admission: AdmissionKey, name: str, directory: Path) -> tuple[Path, Path]:
    """A fresh identity for ``name`` and its certificate (valid one hour), as files."""
    identity = Identity.generate(name)
    key, cert = directory / f"{name}.key", directory / f"{name}.cert"
    identity.save(key)
    cert.write_bytes(admission.issue(identity.public, valid_for_s=3600,
                                     now=time.time()).to_bytes())
    return key, cert


def spawn_idle_peer(url: str, network: str, key: Path, cert: Path, admission_hex: str, *,
                    model_id: str = "idle", param_count: int = 1,
                    announce_interval_s: float = 30.0, silence_expiry_s: float = 120.0,
                    stderr: int | IO[bytes] | None = subprocess.PIPE,
                    new_session: bool = False) -> subprocess.Popen[bytes]:
    """Start ``python -m sim.idle_peer`` with these settings (stdout discarded)."""
    return subprocess.Popen(
        [sys.executable, "-m", "sim.idle_peer", url, network, str(key), str(cert),
         admission_hex, "--model-id", model_id, "--param-count", str(param_count),
         "--announce-interval", str(announce_interval_s),
         "--silence-expiry", str(silence_expiry_s)],
        env=dict(os.environ, PYTHONPATH=str(_ROOT)), stdout=subprocess.DEVNULL,
        stderr=stderr, start_new_session=new_session,
    )


async def _run(args: argparse.Namespace) -> None:
    peer = Peer(identity=Identity.load(args.key),
                certificate=Certificate.from_bytes(Path(args.cert).read_bytes()),
                admission_public_key=bytes.fromhex(args.admission_hex), network_id=args.network,
                trainer=IdleTrainer(args.model_id, args.param_count),
                broker=BrokerSettings(args.url),
                config=NodeConfig(announce_interval_s=args.announce_interval,
                                  silence_expiry_s=args.silence_expiry, train=False,
                                  auto_start=False))
    await peer.run(asyncio.Event())  # until killed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("url", "network", "key", "cert", "admission_hex"):
        parser.add_argument(name)
    parser.add_argument("--model-id", default="idle")
    parser.add_argument("--param-count", type=int, default=1)
    parser.add_argument("--announce-interval", type=float, default=30.0)
    parser.add_argument("--silence-expiry", type=float, default=120.0)
    asyncio.run(_run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
