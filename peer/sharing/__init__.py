"""Sharing strategies and merge rules: what leaves a peer after a round, and how it comes back.

Pure numpy, imported by both halves: the trainer (peer.training) asks its strategy what a round
shares, the node (peer.network) asks it for the residual fill and merges with the rule it pairs
with. One module per strategy; :data:`STRATEGIES` maps the config name to the class, so a new
way of sharing is one new module and one line here.
"""

from __future__ import annotations

from peer.sharing.base import SharingStrategy, SparseVector
from peer.sharing.delta import DeltaSharing
from peer.sharing.displacement import DisplacementSharing

STRATEGIES: dict[str, type[SharingStrategy]] = {
    cls.name: cls for cls in (DisplacementSharing, DeltaSharing)
}
#: What ``[training] share`` means when a config does not set it.
DEFAULT_STRATEGY = DisplacementSharing.name


def strategy_class(name: str) -> type[SharingStrategy]:
    """The strategy registered as ``name``; ValueError naming the known ones otherwise."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"share must be one of {tuple(STRATEGIES)}, got {name!r}") from None


def build_strategy(name: str, topk_fraction: float, param_count: int,
                   reshare_fraction: float | None = None) -> SharingStrategy:
    """A fresh strategy of kind ``name`` for a model of ``param_count`` parameters."""
    return strategy_class(name)(topk_fraction, param_count, reshare_fraction)


__all__ = [
    "DEFAULT_STRATEGY",
    "STRATEGIES",
    "DeltaSharing",
    "DisplacementSharing",
    "SharingStrategy",
    "SparseVector",
    "build_strategy",
    "strategy_class",
]
