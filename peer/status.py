"""The one-line live status of a running peer: pure formatting of a status snapshot.

Example::

    alice training 12m04s | peers 4 | rounds 1501 (+924 this run) | sessions 210 (+21 this run),
    2 aborted | acc 91.3% | eps 1.84/8.00 | sent 3.1 MiB recv 2.8 MiB | drops 3 (bad_signature 2,
    replay 1) | peak rss 287 MiB

(one line on the terminal; wrapped here). The word after the peer id is the node's state
(:data:`peer.network.counters.STATES`: connecting, offline, waiting for peers, training,
sharing, idle, budget spent: averaging only, serving only); the duration is this run's uptime.
Rounds and sessions are totals since the peer was created, with this run's share in brackets
when a restart makes them differ. ``peak rss`` is the process's resident-memory high-water mark
(:mod:`peer.resources`). ``eps spent/budget`` whenever training is private (also
before the first round and after a restart: the figure is the ledger's); ``eps off`` only when
DP is disabled.

ASCII labels, so it survives any locale. Nothing here reads the peer: the caller passes the
:class:`peer.network.counters.PeerStatus` snapshot the node produced (the same one the
simulation's metrics and churn carry read), so formatting is testable without a network, and
the status line never shows anything secret (no keys, no model values, only counts and
aggregates).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from peer.network.counters import PeerStatus

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


def _total(label: str, total: int, this_run: int) -> str:
    """'rounds 1501 (+924 this run)'; just 'rounds 37' when the whole total is this run's."""
    total = max(total, this_run)  # a node that does not fill the total yet: this run's count
    return f"{label} {total}" + (f" (+{this_run} this run)" if total != this_run else "")


def _epsilon(status: PeerStatus, budget_epsilon: float | None) -> str:
    if not status.dp:
        return "eps off"
    spent = "-" if status.epsilon is None else f"{status.epsilon:.2f}"
    return f"eps {spent}/{budget_epsilon:.2f}" if budget_epsilon is not None else (
        f"eps {spent} (no budget)")


def format_status(status: PeerStatus, *, uptime_s: float, budget_epsilon: float | None = None,
                  note: str | None = None, max_width: int | None = None,
                  top_drops: int = 3) -> str:
    """Render ``status`` as one line (no newline), cut to ``max_width`` characters if given.

    ``budget_epsilon`` overrides ``status.budget_epsilon`` (the ledger's budget) when given;
    ``note`` is any extra remark, appended last.
    """
    s = status
    budget = s.budget_epsilon if budget_epsilon is None else budget_epsilon
    parts = [
        f"{s.peer_id} {s.state} {human_duration(uptime_s)}",
        f"peers {s.peers_live}",
        _total("rounds", s.rounds_total, s.round),
        _total("sessions", s.sessions_total, s.sessions_done) + f", {s.sessions_aborted} aborted",
        "acc " + ("-" if s.accuracy is None else f"{100.0 * s.accuracy:.1f}%"),
        _epsilon(s, budget),
        *([] if s.clip_norm is None else [f"C {s.clip_norm:.3g}"]),
        *([f"engine {s.engine}"] if s.engine not in ("", "none") else []),
        f"sent {human_bytes(s.bytes_sent)} recv {human_bytes(s.bytes_received)}",
        _drops(s.drops, top_drops),
    ]
    if s.peak_rss_mb is not None:
        parts.append(f"peak rss {s.peak_rss_mb:.0f} MiB")
    if note:
        parts.append(note)
    line = " | ".join(parts)
    # A hostile peer never reaches this line (reasons are our own labels), but keep it one
    # terminal line of printable ASCII whatever a caller passes (an exception text in a note).
    line = "".join(ch if " " <= ch <= "~" else " " if ch in "\t\r\n" else "?" for ch in line)
    if max_width is not None and len(line) > max_width > 3:
        line = line[: max_width - 3] + "..."
    return line


# ------------------------------------------------------------------- lines without a terminal
#: Event kinds that get a line of their own when stdout is not a terminal.
_NOTED_EVENTS = ("connected", "disconnected", "budget_milestone", "budget_exhausted",
                 "training_failed")


def _number(data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def describe_event(kind: str, data: Mapping[str, Any]) -> str:
    """A short ASCII remark for one noted event (``kind`` in ``_NOTED_EVENTS``)."""
    if kind == "connected":
        return "connected to the broker"
    if kind == "disconnected":
        return "lost the broker; reconnecting"
    if kind == "budget_milestone":
        fraction, spent = _number(data, "fraction"), _number(data, "epsilon")
        share = "a share" if fraction is None else f"{100 * fraction:.0f}%"
        return f"{share} of the privacy budget spent" + (
            "" if spent is None else f" (eps {spent:.2f})")
    if kind == "budget_exhausted":
        spent = _number(data, "epsilon")
        return "privacy budget spent" + ("" if spent is None else f" (eps {spent:.2f})") + (
            ": no more private training")
    if kind == "training_failed":
        return f"training failed: {str(data.get('error', '?'))[:200]}"
    return kind


@dataclass
class PlainReport:
    """Decides the status lines printed when stdout is not a terminal (systemd, a pipe).

    The first line as soon as the peer has connected (or after ``heartbeat_s`` if it never
    does); one line per noted event (connected, disconnected, budget milestones and
    exhaustion, a failed training); completed sessions at most once per ``sessions_every_s``
    with their count; and a line every ``heartbeat_s`` when nothing else was printed.

    :meth:`on_event` is the node's event callback: it runs on the event loop inside the node's
    code, so it only records (no formatting, no I/O); :meth:`due` returns the notes of the
    lines to print now (``None``: a plain status line).
    """

    started: float  # time.monotonic() at start
    heartbeat_s: float = 60.0
    sessions_every_s: float = 10.0
    _notes: list[str] = field(default_factory=list)
    _sessions: int = 0  # completed since the last session line
    _last_session: tuple[int, float] | None = None  # (members, seconds) of the latest one
    _last_session_line: float = -math.inf
    _last_line: float | None = None  # None: nothing printed yet

    def on_event(self, event: Any) -> None:
        kind, data = event.kind, event.data
        if kind == "session_done":
            self._sessions += 1
            members, seconds = data.get("members"), _number(data, "duration_s")
            self._last_session = (len(members) if isinstance(members, list | tuple) else 0,
                                  seconds if seconds is not None else math.nan)
        elif kind in _NOTED_EVENTS and len(self._notes) < 100:  # bounded if never drained
            self._notes.append(describe_event(kind, data))

    def due(self, now: float, connected: bool) -> list[str | None]:
        """The lines to print at monotonic time ``now`` (each a note or None); marks them done."""
        lines: list[str | None] = list(self._notes)
        self._notes.clear()
        if self._sessions and now - self._last_session_line >= self.sessions_every_s:
            lines.append(self._session_note())
            self._sessions, self._last_session_line = 0, now
        if not lines:
            if self._last_line is None:
                if connected:
                    lines.append("connected to the broker")
                elif now - self.started >= self.heartbeat_s:
                    lines.append(None)
            elif now - self._last_line >= self.heartbeat_s:
                lines.append(None)
        if lines:
            self._last_line = now
        return lines

    def flush(self) -> list[str]:
        """The notes recorded and not printed yet, sessions included (when the peer stops)."""
        lines = list(self._notes) + ([self._session_note()] if self._sessions else [])
        self._notes.clear()
        self._sessions = 0
        return lines

    def _session_note(self) -> str:
        if self._sessions == 1 and self._last_session is not None:
            members, seconds = self._last_session
            took = "" if math.isnan(seconds) else f", {seconds:.1f}s"
            return f"session done ({members} members{took})"
        return f"{self._sessions} sessions done since the last line"
