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
    if name in ("build_peer", "run_peer"):
        from peer import api

        return getattr(api, name)
    if name in ("PeerConfig", "load_config"):
        from peer import config

        return getattr(config, name)
    if name == "Dataset":
        from peer.training import user_data

        return user_data.Dataset
    raise AttributeError(f"module 'peer' has no attribute {name!r}")
