"""The exception roots of ``peer/``: one for every deliberate error, one for every drop.

* :class:`PeerError` is the root of every error a peer raises on purpose (bad config, unusable
  data, a broken ledger or checkpoint, a broker that cannot be reached), so a caller that wants
  "anything Murmur refused" catches one class. Errors that are also plain bad arguments derive
  from ``ValueError`` too. :class:`ConfigError` is the one a peer's configuration raises
  (peer/config.py and the modules it reads tables and paths with).
* :class:`DroppedError` means "this input was refused, count it under ``reason``": an inbound
  message (membership, inbound checks, session) or a rebuilt group sum (merge). It is never
  fatal; the node counts it by reason and goes on. Inbound checks and the membership view
  raise it directly. Its one subclass is ``peer.sharing.merge.MergeRejected``: the node counts
  rejected merges apart from dropped messages (``count_rejected_merge``), so it catches that
  subclass on its own.

This module imports nothing, so both halves and the peer's assembly can share it.
"""

from __future__ import annotations


class PeerError(Exception):
    """Root of the errors raised on purpose anywhere in ``peer/``."""


class ConfigError(PeerError):
    """The configuration cannot be used; the message names the file, key and problem."""


class DroppedError(PeerError):
    """An input was refused; ``reason`` is a short, stable label for drop counters."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class BudgetExhaustedError(PeerError):
    """The next private round would push epsilon past the configured budget."""

    def __init__(self, spent: float, would_be: float, budget: float) -> None:
        super().__init__(
            f"privacy budget exhausted: spent epsilon {spent:.3f}, the next round would reach "
            f"{would_be:.3f}, budget is {budget:.3f}; refusing further private training"
        )
        self.spent = spent
        self.would_be = would_be
        self.budget = budget
