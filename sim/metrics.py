"""Simulation metrics: one JSON object per line in run_dir/metrics.jsonl.

Each row is a snapshot of one peer's counters at one event (a round finished, a session done
or aborted, a periodic status, a churn leave/join...). Counters are cumulative since the peer
started, so the last row of a peer is its final state.

Writing: every row is one `os.write` on a file opened with O_APPEND, so rows from several
peers (tasks, threads or processes) never interleave within a line. Reading: a line that is not
a valid row (e.g. the partial last line of a killed run) is skipped, counted and logged, never
fatal. Rows carry only counters and scores — never model data, keys or shares.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"

# Event names the runner emits; readers accept any string so new events never break old reports.
EVENT_START = "start"
EVENT_ROUND = "round"
EVENT_SESSION_DONE = "session_done"
EVENT_SESSION_ABORTED = "session_aborted"
# An invitation that never became a session (too few acceptors, all declined, yielded). The node
# emits it as a "session_aborted" event with formed=False; the log names it apart so that its
# rows never read as aborted sessions (which count in sessions_aborted, not here).
EVENT_SESSION_NOT_FORMED = "session_not_formed"
EVENT_STATUS = "status"
EVENT_LEAVE = "leave"
EVENT_JOIN = "join"
EVENT_STOP = "stop"


class MetricsError(ValueError):
    """A metrics row is malformed (wrong type, negative counter, non-finite value)."""


@dataclass(frozen=True)
class MetricsRow:
    """One peer's cumulative counters at one event.

    t: seconds since the run started; accuracy: on the peer's local hold-out (0..1, None if not
    yet measured); epsilon: privacy budget spent so far (None when DP is off); drops: messages
    dropped, by reason (e.g. {"bad_signature": 2, "replay": 1}). sessions_aborted counts
    sessions that failed after their group was fixed; sessions_not_formed counts invitations
    that never became a group (rows written before that field existed read it as 0).
    """

    t: float
    peer: str
    event: str
    sessions_done: int = 0
    sessions_aborted: int = 0
    sessions_not_formed: int = 0
    accuracy: float | None = None
    epsilon: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    round: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_row(self)

    def to_json(self) -> str:
        data = asdict(self)
        if not data["extra"]:
            del data["extra"]
        if data["round"] is None:
            del data["round"]
        return json.dumps(data, separators=(",", ":"), sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetricsRow:
        if not isinstance(data, dict):
            raise MetricsError(f"row must be a JSON object, got {type(data).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise MetricsError(f"unknown row fields: {sorted(unknown)}")
        for required in ("t", "peer", "event"):
            if required not in data:
                raise MetricsError(f"row is missing '{required}'")
        try:
            return cls(**data)
        except TypeError as exc:
            raise MetricsError(str(exc)) from exc


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_row(row: MetricsRow) -> None:
    if not _is_number(row.t) or row.t < 0:
        raise MetricsError(f"t must be a finite number >= 0, got {row.t!r}")
    for name in ("peer", "event"):
        value = getattr(row, name)
        if not isinstance(value, str) or not value or len(value) > 256:
            raise MetricsError(f"{name} must be a non-empty string, got {value!r}")
    for name in ("sessions_done", "sessions_aborted", "sessions_not_formed", "bytes_sent",
                 "bytes_received"):
        if not _is_count(getattr(row, name)):
            raise MetricsError(f"{name} must be an integer >= 0, got {getattr(row, name)!r}")
    if row.accuracy is not None and not (_is_number(row.accuracy) and 0 <= row.accuracy <= 1):
        raise MetricsError(f"accuracy must be in [0, 1] or null, got {row.accuracy!r}")
    if row.epsilon is not None and not (_is_number(row.epsilon) and row.epsilon >= 0):
        raise MetricsError(f"epsilon must be a finite number >= 0 or null, got {row.epsilon!r}")
    if row.round is not None and not _is_count(row.round):
        raise MetricsError(f"round must be an integer >= 0 or null, got {row.round!r}")
    if not isinstance(row.drops, dict) or not all(
        isinstance(k, str) and _is_count(v) for k, v in row.drops.items()
    ):
        raise MetricsError(f"drops must map reason strings to counts >= 0, got {row.drops!r}")
    if not isinstance(row.extra, dict):
        raise MetricsError(f"extra must be an object, got {row.extra!r}")


# PeerStatus fields kept in a row's `extra` by MetricsWriter.record_status.
_STATUS_EXTRAS = (
    "connected",
    "clip_norm",
    "budget_exhausted",
    "aborts_by_reason",
    "merges_applied",
    "merges_rejected",
    "messages_sent",
    "messages_received",
    "reconnects",
    "peers_live",
    "engine",
    "peak_rss_mb",
)


def row_event(event: str, extra: dict[str, Any] | None) -> str:
    """The event name a row is counted under: an aborted session whose group never formed
    (extra["formed"] is False) is EVENT_SESSION_NOT_FORMED; any other event keeps its name.

    The report applies it to rows read back too, so logs written before the two were named
    apart (but with a `formed` field) are counted the same way.
    """
    if event == EVENT_SESSION_ABORTED and extra and extra.get("formed") is False:
        return EVENT_SESSION_NOT_FORMED
    return event


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


class MetricsWriter:
    """Appends MetricsRow lines to run_dir/metrics.jsonl; safe to share between tasks/threads.

    `t` defaults to seconds since `start_time` (the run's time.monotonic() origin, so wall-clock
    jumps do not bend the plots); pass the same start_time to writers in child processes.
    """

    def __init__(self, run_dir: Path, *, start_time: float | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.start_time = time.monotonic() if start_time is None else start_time
        self._lock = threading.Lock()
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.rows_written = 0

    def elapsed(self) -> float:
        return max(0.0, time.monotonic() - self.start_time)

    def write(self, row: MetricsRow) -> None:
        line = (row.to_json() + "\n").encode()
        with self._lock:
            if self._fd is None:
                raise RuntimeError("metrics writer is closed")
            # One write per line with O_APPEND: concurrent writers never split each other's rows.
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(f"short write to {self.path}: {written} of {len(line)} bytes")
            self.rows_written += 1

    def record(
        self, peer: str, event: str, *, t: float | None = None, **counters: Any
    ) -> MetricsRow:
        """Build a row (t = now unless given), write it, and return it."""
        row = MetricsRow(t=self.elapsed() if t is None else t, peer=peer, event=event, **counters)
        self.write(row)
        return row

    def record_status(
        self, status: Any, event: str, *, t: float | None = None, **extra: Any
    ) -> MetricsRow:
        """Write a row from a peer.network.node.PeerStatus-like snapshot (read by attribute name).

        The core counters become row fields; merges, reconnects, live peers and abort reasons
        go to `extra` (with any keyword extras). A non-finite ε (no bound) is recorded as
        epsilon None plus extra["epsilon_unbounded"] = True rather than rejected. A
        "session_aborted" event whose extra says formed=False (an invitation that never became
        a group) is recorded as EVENT_SESSION_NOT_FORMED, so the log never calls it an abort.
        """
        epsilon = _optional_float(getattr(status, "epsilon", None))
        details: dict[str, Any] = {}
        if epsilon is not None and not math.isfinite(epsilon):
            epsilon = None
            details["epsilon_unbounded"] = True
        for name in _STATUS_EXTRAS:
            value = getattr(status, name, None)
            if value is not None:
                details[name] = dict(value) if isinstance(value, dict) else value
        details.update(extra)
        accuracy = _optional_float(getattr(status, "accuracy", None))
        return self.record(
            str(status.peer_id),
            row_event(event, details),
            t=t,
            round=int(status.round) if getattr(status, "round", None) is not None else None,
            sessions_done=int(status.sessions_done),
            sessions_aborted=int(status.sessions_aborted),
            sessions_not_formed=int(getattr(status, "sessions_not_formed", 0)),
            accuracy=accuracy,
            epsilon=epsilon,
            bytes_sent=int(status.bytes_sent),
            bytes_received=int(status.bytes_received),
            drops={str(k): int(v) for k, v in dict(status.drops).items()},
            extra=details,
        )

    def flush(self) -> None:
        """Force rows to disk (fsync), e.g. before the report is built or a process exits."""
        with self._lock:
            if self._fd is not None:
                os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.fsync(fd)
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass(frozen=True)
class MetricsFile:
    """Rows read from a metrics file, plus how many lines were skipped as malformed."""

    rows: list[MetricsRow]
    skipped_lines: int


def read_metrics_file(path: Path) -> MetricsFile:
    """Read every valid row of a metrics.jsonl (or of run_dir/metrics.jsonl if given a dir)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    rows: list[MetricsRow] = []
    skipped = 0
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rows.append(MetricsRow.from_dict(json.loads(line)))
            except (json.JSONDecodeError, MetricsError) as exc:
                skipped += 1
                log.warning("%s:%d: skipped malformed metrics row: %s", path, number, exc)
    return MetricsFile(rows=rows, skipped_lines=skipped)


def read_metrics(path: Path) -> list[MetricsRow]:
    """Valid rows of a metrics file (malformed lines skipped and logged), in file order."""
    return read_metrics_file(path).rows


def peer_sort_key(peer: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order for peer ids: peer-2 before peer-10."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", peer) if part
    )


def last_row_per_peer(rows: list[MetricsRow]) -> dict[str, MetricsRow]:
    """The latest row (by t, then file order) of each peer: its final cumulative counters."""
    latest: dict[str, MetricsRow] = {}
    for row in rows:
        current = latest.get(row.peer)
        if current is None or row.t >= current.t:
            latest[row.peer] = row
    return {peer: latest[peer] for peer in sorted(latest, key=peer_sort_key)}
