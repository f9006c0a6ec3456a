"""The one-line live status of a running peer: a snapshot dataclass and pure formatting.

Example::

    alice up 12m04s | peers 4 | rounds 37 | sessions 21 ok 2 aborted | acc 91.3% | eps 1.84/8.00
    | sent 3.1 MiB recv 2.8 MiB | drops 3 (bad_signature 2, replay 1)

(one line on the terminal; wrapped here). ASCII labels, so it survives any locale. Nothing
here reads the peer: the caller passes the :class:`peer.network.counters.PeerStatus` snapshot
the node produced (the same one the simulation's metrics and churn carry read), so formatting
is testable without a network, and the status line never shows anything secret (no keys, no
model values, only counts and aggregates).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from peer.network.counters import PeerStatus

#: Shown when the budget is spent: the peer still serves sessions but shares nothing.
BUDGET_SPENT_NOTE = "budget spent: sharing stopped"


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


def format_status(status: PeerStatus, *, uptime_s: float, budget_epsilon: float | None = None,
                  note: str | None = None, max_width: int | None = None,
                  top_drops: int = 3) -> str:
    """Render ``status`` as one line (no newline), cut to ``max_width`` characters if given.

    ``budget_epsilon`` is the configured budget shown after the spent epsilon; ``note`` is any
    extra remark (a spent budget adds its own).
    """
    s = status
    parts = [
        f"{s.peer_id} {'up' if s.connected else 'OFFLINE'} {human_duration(uptime_s)}",
        f"peers {s.peers_live}",
        f"rounds {s.round}",
        f"sessions {s.sessions_done} ok {s.sessions_aborted} aborted"
        + (" (in session)" if s.in_session else ""),
        "acc " + ("-" if s.accuracy is None else f"{100.0 * s.accuracy:.1f}%"),
    ]
    if s.epsilon is not None:
        budget = "" if budget_epsilon is None else f"/{budget_epsilon:.2f}"
        parts.append(f"eps {s.epsilon:.2f}{budget}")
    else:
        parts.append("eps off")
    parts.append(f"sent {human_bytes(s.bytes_sent)} recv {human_bytes(s.bytes_received)}")
    parts.append(_drops(s.drops, top_drops))
    parts.extend(text for text in (BUDGET_SPENT_NOTE if s.budget_exhausted else None, note)
                 if text)
    line = " | ".join(parts)
    # A hostile peer never reaches this line (reasons are our own labels), but keep it one
    # terminal line whatever a caller passes.
    line = line.replace("\n", " ").replace("\r", " ")
    if max_width is not None and len(line) > max_width > 3:
        line = line[: max_width - 3] + "..."
    return line
