"""Counted, logged drops: every refused inbound message leaves a trace by reason.

A hostile sender can make a peer drop as many messages as it likes, so logging is rate-limited
per reason (the counter is always exact); the peer goes on either way.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class DropCounter:
    """Counts drops by reason and logs at most ``log_per_reason_s`` apart per reason."""

    owner: str
    log_per_reason_s: float = 5.0
    counts: Counter[str] = field(default_factory=Counter)
    _last_logged: dict[str, float] = field(default_factory=dict)

    def drop(self, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        now = time.monotonic()
        if now - self._last_logged.get(reason, -1e18) >= self.log_per_reason_s:
            self._last_logged[reason] = now
            log.info("%s: dropped a message: %s%s (total %d)", self.owner, reason,
                     f" ({detail[:200]})" if detail else "", self.counts[reason])

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)

    def total(self) -> int:
        return sum(self.counts.values())
