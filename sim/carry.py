"""Counters across a churned peer's incarnations, and which peer events become metrics rows.

A peer that leaves and rejoins is a new ``peer.network.node.Peer`` whose counters start at zero.
The metrics rows must stay cumulative over the whole run (the report reads each peer's last
row as its total), so the counters of the ended incarnations are carried and added to the new
one's. Both engines use this module: the in-process one keeps the carry in memory, the
process one saves it to the peer's state directory between processes (sim/peer_process.py).
"""

from __future__ import annotations

from typing import Any

from peer.network.counters import PeerStatus
from peer.network.node import PeerEvent

#: Peer events that become metrics rows.
RECORDED_EVENTS = ("round", "session_done", "session_aborted", "merge_rejected",
                   "budget_exhausted")


def add_carry(carry: dict[str, Any] | None, status: PeerStatus) -> dict[str, Any]:
    """Carry after one more incarnation ended with ``status`` (its own counters only): every
    counter of :class:`peer.network.counters.PeerStatus`, as plain JSON-ready values."""
    return status.plus(carry).counters()


def event_extra(event: PeerEvent) -> dict[str, Any]:
    """Plain details of a peer event worth a metrics row (never model data)."""
    extra: dict[str, Any] = {}
    if event.kind in ("session_aborted", "merge_rejected"):
        extra["reason"] = str(event.data.get("reason"))
    if event.kind == "session_aborted":
        # False: an invitation that never became a group (the metrics log names it apart).
        extra["formed"] = bool(event.data.get("formed", True))
    if event.kind == "session_done":
        extra["clipped"] = bool(event.data.get("clipped"))
        extra["contributors"] = len(event.data.get("contributors") or ())
    return extra
