"""The one-line live status of a running peer: a snapshot dataclass and pure formatting.

Example::

    alice up 12m04s | peers 4 | rounds 37 | sessions 21 ok 2 aborted | acc 91.3% | eps 1.84/8.00
    | sent 3.1 MiB recv 2.8 MiB | drops 3 (bad_signature 2, replay 1)

(one line on the terminal; wrapped here). ASCII labels, so it survives any locale. Nothing
here reads the peer: the caller builds a :class:`StatusSnapshot`, so formatting is testable
without a network, and the status line never shows anything secret (no keys, no model values,
only counts and aggregates).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StatusSnapshot:
    """What the status line shows, sampled at one moment."""

    peer_id: str
    connected: bool
    uptime_s: float
    peers_live: int = 0
    rounds: int = 0
    sessions_done: int = 0
    sessions_aborted: int = 0
    accuracy: float | None = None  # on the local hold-out, in [0, 1]
    epsilon: float | None = None  # privacy budget spent
    budget_epsilon: float | None = None  # configured budget
    bytes_sent: int = 0
    bytes_received: int = 0
    drops: Mapping[str, int] = field(default_factory=dict)
    phase: str | None = None  # state of the session in flight, if any
    note: str | None = None  # e.g. "budget spent: sharing stopped"

    @classmethod
    def from_peer_status(cls, status: Any, *, uptime_s: float,
                         budget_epsilon: float | None = None) -> StatusSnapshot:
        """Adapt a ``peer.node.PeerStatus`` (duck-typed: this module imports nothing heavy)."""
        note = "budget spent: sharing stopped" if getattr(status, "budget_exhausted", False) \
            else None
        return cls(
            peer_id=status.peer_id,
            connected=bool(status.connected),
            uptime_s=uptime_s,
            peers_live=int(status.peers_live),
            rounds=int(status.round),
            sessions_done=int(status.sessions_done),
            sessions_aborted=int(status.sessions_aborted),
            accuracy=status.accuracy,
            epsilon=status.epsilon,
            budget_epsilon=budget_epsilon,
            bytes_sent=int(status.bytes_sent),
            bytes_received=int(status.bytes_received),
            drops=dict(status.drops),
            phase="in session" if getattr(status, "in_session", False) else None,
            note=note,
        )


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'; binary units, one decimal above bytes."""
    value = float(max(0, count))
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """3723 -> '1h02m03s'; 64 -> '1m04s'; 5.2 -> '5s'."""
    total = int(max(0.0, seconds)) if math.isfinite(seconds) else 0
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _drops(drops: Mapping[str, int], top: int) -> str:
    total = sum(drops.values())
    if total == 0:
        return "drops 0"
    ranked = sorted(((n, reason) for reason, n in drops.items() if n > 0),
                    key=lambda item: (-item[0], item[1]))
    shown = ", ".join(f"{reason} {n}" for n, reason in ranked[:top])
    more = f", +{len(ranked) - top} more" if len(ranked) > top else ""
    return f"drops {total} ({shown}{more})"


def format_status(snapshot: StatusSnapshot, *, max_width: int | None = None,
                  top_drops: int = 3) -> str:
    """Render the snapshot as one line (no newline), cut to ``max_width`` characters if given."""
    s = snapshot
    parts = [
        f"{s.peer_id} {'up' if s.connected else 'OFFLINE'} {human_duration(s.uptime_s)}",
        f"peers {s.peers_live}",
        f"rounds {s.rounds}",
        f"sessions {s.sessions_done} ok {s.sessions_aborted} aborted"
        + (f" ({s.phase})" if s.phase else ""),
        "acc " + ("-" if s.accuracy is None else f"{100.0 * s.accuracy:.1f}%"),
    ]
    if s.epsilon is not None:
        budget = "" if s.budget_epsilon is None else f"/{s.budget_epsilon:.2f}"
        parts.append(f"eps {s.epsilon:.2f}{budget}")
    else:
        parts.append("eps off")
    parts.append(f"sent {human_bytes(s.bytes_sent)} recv {human_bytes(s.bytes_received)}")
    parts.append(_drops(s.drops, top_drops))
    if s.note:
        parts.append(s.note)
    line = " | ".join(parts)
    # A hostile peer never reaches this line (reasons are our own labels), but keep it one
    # terminal line whatever a caller passes.
    line = line.replace("\n", " ").replace("\r", " ")
    if max_width is not None and len(line) > max_width > 3:
        line = line[: max_width - 3] + "..."
    return line
