"""Murmur's peer: ``from peer import build_peer, run_peer, Dataset`` to embed one.

The names are loaded on first use (PEP 562), so ``import peer.config`` and the ``murmur-peer``
commands that only touch key files load neither the network stack nor torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peer.api import build_peer, run_peer
    from peer.config import PeerConfig, load_config
    from peer.training.user_data import Dataset

__all__ = ["Dataset", "PeerConfig", "build_peer", "load_config", "run_peer"]


def __getattr__(name: str) -> Any:
    if name == "build_peer":
        from peer.api import build_peer

        return build_peer
    if name == "run_peer":
        from peer.api import run_peer

        return run_peer
    if name == "PeerConfig":
        from peer.config import PeerConfig

        return PeerConfig
    if name == "load_config":
        from peer.config import load_config

        return load_config
    if name == "Dataset":
        from peer.training.user_data import Dataset

        return Dataset
    raise AttributeError(f"module 'peer' has no attribute {name!r}")
