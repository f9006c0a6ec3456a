"""``murmur-query`` (or ``python -m peer.query``): private predictions for a client.

    murmur-query --config client.toml INPUT.npz (--owner NAME | --snapshot HEX) [--timeout S]

INPUT.npz holds ``x``: N images (N x H x W). The client computes their public ScatterNet
features, Shamir-shares and seals them to the serving peers of the newest snapshot the model
owner ``--owner`` signed and all its serving peers announce (or ``--snapshot``), and prints one
line per image: its index, the class and the logits (docs/inference.md). A user's error is one
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from crypto.errors import CryptoError
from peer.config import ConfigError, load_config
from peer.errors import PeerError

PROG = "murmur-query"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the client's TOML config")
    parser.add_argument("input", help=".npz file with an array x of images")
    parser.add_argument("--owner", help="the model owner (peer id) whose signed snapshots to "
                        "trust; without it, --snapshot is required")
    parser.add_argument("--snapshot", help="snapshot id (hex); default: the owner's newest")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from peer.inference.commands import query

    try:
        return query(load_config(Path(args.config)), Path(args.input),
                     snapshot_hex=args.snapshot, timeout_s=args.timeout, owner=args.owner)
    except (ConfigError, PeerError, CryptoError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
