"""What a peer counts: drops by reason, session and merge counters, and the status snapshot;
the total of completed sessions kept on disk across runs (:class:`SessionTotals`).

Counted, logged drops: every refused inbound message leaves a trace by reason.

A hostile sender can make a peer drop as many messages as it likes, so logging is rate-limited
per reason (the counter is always exact); the peer goes on either way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from peer.files import FileReadError, atomic_write_bytes, read_small_file

log = logging.getLogger(__name__)


@dataclass
class DropCounter:
    """Counts drops by reason and logs at most ``log_per_reason_s`` apart per reason."""

    owner: str
    log_per_reason_s: float = 5.0
    counts: Counter[str] = field(default_factory=Counter)
    _last_logged: dict[str, float] = field(default_factory=dict)

    def drop(self, reason: str, detail: str = "", count: int = 1) -> None:
        self.counts[reason] += count
        now = time.monotonic()
        if now - self._last_logged.get(reason, -1e18) >= self.log_per_reason_s:
            self._last_logged[reason] = now
            log.info("%s: dropped a message: %s%s (total %d)", self.owner, reason,
                     f" ({detail[:200]})" if detail else "", self.counts[reason])

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)

    def total(self) -> int:
        return sum(self.counts.values())


def _bump(counter: dict[str, int], key: str) -> None:
    counter[key] = counter.get(key, 0) + 1


@dataclass
class SessionCounters:
    """What the node counts about its sessions and merges (one incarnation, cumulative)."""

    round: int = 0  # local training rounds finished
    sessions_done: int = 0
    sessions_aborted: int = 0  # aborted after the group was fixed (shares may have flowed)
    sessions_not_formed: int = 0  # invitations that never became a group (busy, declined, ...)
    aborts_by_reason: dict[str, int] = field(default_factory=dict)
    merges_applied: int = 0
    merges_rejected: dict[str, int] = field(default_factory=dict)
    declines_sent: dict[str, int] = field(default_factory=dict)
    late_messages: int = 0  # messages of a session we just finished (surplus partials)
    send_failures: int = 0
    chunked_sent: int = 0  # messages sent as CHUNKs (larger than max_message_bytes)

    def count_abort(self, reason: str) -> None:
        _bump(self.aborts_by_reason, reason)

    def count_rejected_merge(self, reason: str) -> None:
        _bump(self.merges_rejected, reason)

    def count_decline(self, reason: str) -> None:
        _bump(self.declines_sent, reason)


#: The peer's state word (PeerStatus.state), from the most to the least urgent.
STATE_CONNECTING = "connecting"  # never connected yet in this run
STATE_OFFLINE = "offline"  # was connected, lost the broker; reconnecting
STATE_WAITING = "waiting for peers"  # connected, fewer than 2 eligible live peers
STATE_TRAINING = "training"  # a private round is running
STATE_SHARING = "sharing"  # in an aggregation session
STATE_IDLE = "idle"  # connected, grouped, paced: waiting for its next round
STATE_AVERAGING_ONLY = "budget spent: averaging only"  # no private step; shares its model
STATE_SERVING_ONLY = "serving only"  # cannot contribute (training failed / budget, no averaging)
STATE_STOPPED = "stopped"  # leaving or left (a clean stop)
STATES = (STATE_CONNECTING, STATE_OFFLINE, STATE_WAITING, STATE_TRAINING, STATE_SHARING,
          STATE_IDLE, STATE_AVERAGING_ONLY, STATE_SERVING_ONLY, STATE_STOPPED)


def state_word(*, stopping: bool, connected: bool, ever_connected: bool, in_session: bool,
               training: bool, training_failed: bool, budget_spent: bool, can_average: bool,
               grouped: bool) -> str:
    """The peer's state word (one of :data:`STATES`), the most urgent first."""
    if stopping:
        return STATE_STOPPED
    if not connected:
        return STATE_OFFLINE if ever_connected else STATE_CONNECTING
    if in_session:
        return STATE_SHARING
    if training:
        return STATE_TRAINING
    if training_failed:
        return STATE_SERVING_ONLY
    if budget_spent:
        return STATE_AVERAGING_ONLY if can_average else STATE_SERVING_ONLY
    return STATE_IDLE if grouped else STATE_WAITING


@dataclass(frozen=True)
class PeerStatus:
    """One peer sampled at one moment: what the status line, the simulation's metrics and its
    churn carry all read. Counts are cumulative; :meth:`plus` adds an earlier incarnation's.

    Gauges (connected, accuracy, epsilon, live peers...) describe the moment; every other field
    is a counter, and adding a counter here is all it takes for the metrics and the churn carry
    to follow it.
    """

    peer_id: str
    connected: bool = False
    state: str = STATE_CONNECTING  # one of STATES
    accuracy: float | None = None  # on the local hold-out, in [0, 1]
    dp: bool = True  # whether training is private (False: epsilon is meaningless)
    epsilon: float | None = None  # spent, from the ledger (also right after a restart)
    budget_epsilon: float | None = None  # the ledger's budget (None: unlimited)
    budget_exhausted: bool = False
    clip_norm: float | None = None  # adaptive clipping's current C (None: C is fixed)
    rounds_total: int = 0  # since the peer was created (checkpoint), this run included
    sessions_total: int = 0  # completed sessions since the peer was created, this run included
    peers_live: int = 0
    view_peers: int = 0  # peers in the membership view (live or not yet expired)
    view_buckets: int = -1  # announcement buckets followed; -1: every one (the full view)
    # The per-example engine private steps run on ("ghost", "vmap"; "none": dp off; "": a
    # node without a trainer that says).
    engine: str = ""
    peak_rss_mb: float | None = None  # this process's peak resident memory (peer.resources)
    in_session: bool = False
    # -- counters (summed across incarnations) ------------------------------------------------
    round: int = 0
    sessions_done: int = 0
    sessions_aborted: int = 0
    sessions_not_formed: int = 0
    aborts_by_reason: dict[str, int] = field(default_factory=dict)
    merges_applied: int = 0
    merges_rejected: dict[str, int] = field(default_factory=dict)
    declines_sent: dict[str, int] = field(default_factory=dict)
    late_messages: int = 0
    send_failures: int = 0
    chunked_sent: int = 0  # messages sent as CHUNKs
    chunked_received: int = 0  # messages reassembled from CHUNKs (InboundChecks.reassembled)
    lookups: int = 0  # peers outside a partial view looked up (peer/network/view/loop.py)
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    reconnects: int = 0
    drops: dict[str, int] = field(default_factory=dict)

    @classmethod
    def counter_names(cls) -> tuple[str, ...]:
        """The cumulative fields: everything after ``in_session``."""
        names = [f.name for f in fields(cls)]
        return tuple(names[names.index("in_session") + 1:])

    def counters(self) -> dict[str, Any]:
        """The cumulative fields as plain JSON-ready values (for a churn carry file)."""
        return {name: (dict(value) if isinstance(value, dict) else int(value))
                for name in self.counter_names() for value in [getattr(self, name)]}

    def plus(self, earlier: Mapping[str, Any] | None) -> PeerStatus:
        """This status with ``earlier`` counters (from :meth:`counters`) added to its own."""
        if not earlier:
            return self
        changes: dict[str, Any] = {}
        for name in self.counter_names():
            mine, theirs = getattr(self, name), earlier.get(name)
            if theirs is None:
                continue
            if isinstance(mine, dict):
                merged = {str(k): int(v) for k, v in dict(theirs).items()}
                for key, value in mine.items():
                    merged[key] = merged.get(key, 0) + int(value)
                changes[name] = merged
            else:
                changes[name] = int(mine) + int(theirs)
        return replace(self, **changes)


# ------------------------------------------------------------------------ totals on disk
def load_sessions_total(path: Path | None) -> int:
    """Completed sessions of earlier runs (0 when the file is missing or unreadable)."""
    if path is None or not path.exists():
        return 0
    try:
        body = json.loads(read_small_file(path, 4096, "totals file"))
        total = body["sessions_done"]
        if body.get("format") != 1 or type(total) is not int or total < 0:
            raise ValueError("unexpected content")
        return total
    except (FileReadError, ValueError, KeyError, TypeError, AttributeError) as exc:
        # Only a display figure: never a reason not to start.
        log.warning("%s: ignoring unreadable totals (%s)", path, exc)
        return 0


def save_sessions_total(path: Path, total: int) -> None:
    """Atomically record ``total`` completed sessions (logged, never raised, on failure)."""
    body = json.dumps({"format": 1, "sessions_done": int(total)}).encode()
    try:
        atomic_write_bytes(path, body, mode=0o600)
    except OSError as exc:
        log.error("cannot save %s: %s", path, exc)


class SessionTotals:
    """Completed sessions since the peer was created: earlier runs' total, read from ``path``,
    plus this run's ``counters.sessions_done``. Saved with each checkpoint and after each
    session, off the event loop (it fsyncs), so a SIGKILL loses at most the session in flight.
    Without a path nothing is read or written."""

    def __init__(self, path: Path | None, counters: SessionCounters) -> None:
        self.path = path
        self.counters = counters
        self.before = load_sessions_total(path)
        self._dirty = False
        self._writer: asyncio.Task[None] | None = None

    @property
    def total(self) -> int:
        return self.before + self.counters.sessions_done

    def save(self) -> None:
        if self.path is not None:
            save_sessions_total(self.path, self.total)

    def save_soon(self) -> None:
        """Save from a worker thread, one writer at a time (must run on the event loop)."""
        if self.path is None:
            return
        self._dirty = True
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        while self._dirty:
            self._dirty = False
            await asyncio.to_thread(self.save)
