"""``murmur-query`` (or ``python -m peer.query``): private predictions for a client.

    murmur-query --config client.toml INPUT.npz (--owner NAME | --snapshot HEX) [--timeout S]

INPUT.npz holds ``x``: N images (N x H x W). The client computes their public ScatterNet
features, Shamir-shares and seals them to the serving peers of the newest snapshot the model
owner ``--owner`` signed and all its serving peers announce (or ``--snapshot``), and prints one
line per image: its index, the class and the logits (docs/inference.md). ``owner = "NAME"`` and
``snapshot = "HEX"`` in client.toml give the same (peer/inference/client_config.py); a flag
overrides its key. A user's error is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from crypto.errors import CryptoError
from peer.config import ConfigError
from peer.errors import PeerError
from protocol.limits import is_valid_id

PROG = "murmur-query"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the client's TOML config")
    parser.add_argument("input", help=".npz file with an array x of images")
    parser.add_argument("--owner", help="the model owner (peer id) whose signed snapshots to "
                        "trust (default: owner in the config); without either, --snapshot is "
                        "required")
    parser.add_argument("--snapshot", help="snapshot id (hex; default: snapshot in the config, "
                        "else the owner's newest)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from peer.inference.client_config import load_client_config, snapshot_id_bytes
    from peer.inference.commands import query

    try:
        config = load_client_config(Path(args.config))
        owner = args.owner if args.owner is not None else config.query.owner
        snapshot = args.snapshot if args.snapshot is not None else config.query.snapshot
        if args.snapshot is not None:
            snapshot_id_bytes(args.snapshot, "--snapshot")
        if args.owner is not None and not is_valid_id(args.owner):
            raise ValueError(f"--owner: {args.owner!r} is not a peer id")
        return query(config.peer, Path(args.input), snapshot_hex=snapshot,
                     timeout_s=args.timeout, owner=owner)
    except (ConfigError, PeerError, CryptoError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
