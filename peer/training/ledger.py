"""The per-peer privacy ledger: what this peer's data has already paid, persisted atomically.

Security property (the ledger "never forgets"): the trainer records the steps of a round and
writes this file (atomic replace + fsync) *before* any update derived from those steps leaves
the trainer, so a crash or SIGKILL after an update was shared can never lose its cost. On
restart the file is read back exactly; a missing ledger next to existing training state, or an
unreadable one, is an error rather than a silent reset to zero. Epsilon only grows: it is the
maximum of the stored value and the accountant's value for the recorded steps.

The accountant is the registry's default (:mod:`peer.training.privacy.accountant`: PLD) unless
the file names another. Files written before the ``accountant`` field existed (their epsilon
came from RDP) still load, with the default; since epsilon only grows, such a peer keeps its
stored RDP epsilon until the tighter accountant's figure for its steps exceeds it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from peer.errors import BudgetExhaustedError, PeerError
from peer.files import atomic_write_bytes
from peer.training.privacy.accountant import ACCOUNTANTS, DEFAULT_ACCOUNTANT
from peer.training.privacy.table import IN_PROCESS, EpsilonSource

LEDGER_FORMAT = 1


class LedgerError(PeerError):
    """The ledger file is unreadable, malformed, or contradicts the configuration."""


@dataclass
class PrivacyLedger:
    """Record-level (epsilon, delta)-DP spent by one peer's DP-SGD steps.

    ``sigma`` / ``sample_rate`` are the current settings; ``segments`` keeps every
    (sigma, sample_rate, steps) run so a settings change is composed exactly.
    ``sigma == 0`` means non-private training: epsilon is infinite. ``accountant`` names the
    registered accountant that composes the segments.
    """

    sigma: float
    max_grad_norm: float
    sample_rate: float
    delta: float
    steps: int = 0
    epsilon: float = 0.0
    budget_epsilon: float | None = None
    segments: list[list[float]] = field(default_factory=list)
    accountant: str = DEFAULT_ACCOUNTANT
    #: Where the accountant's figures come from: the library in this process unless
    #: :meth:`use_epsilons` names an epsilon table (not part of the file).
    _epsilons: ClassVar[EpsilonSource] = IN_PROCESS

    def use_epsilons(self, source: EpsilonSource) -> None:
        """Take the accountant's figures from ``source`` (e.g. an :class:`EpsilonTable`)."""
        self._epsilons = source  # type: ignore[misc]  # per-ledger override of the default

    @property
    def private(self) -> bool:
        return self.sigma > 0

    def _segments_with(self, extra_steps: int) -> list[tuple[float, float, int]]:
        merged = [(float(s), float(q), int(n)) for s, q, n in self.segments]
        if extra_steps > 0:
            if merged and merged[-1][:2] == (self.sigma, self.sample_rate):
                sigma, rate, steps = merged[-1]
                merged[-1] = (sigma, rate, steps + extra_steps)
            else:
                merged.append((self.sigma, self.sample_rate, extra_steps))
        return merged

    def epsilon_after(self, extra_steps: int) -> float:
        """Epsilon if ``extra_steps`` more steps ran at the current settings (never less
        than what is already spent)."""
        if extra_steps < 0:
            raise ValueError(f"extra_steps must be >= 0, got {extra_steps}")
        if not self.private:
            return math.inf if (self.steps + extra_steps) > 0 else 0.0
        if any(s <= 0 for s, _q, n in self.segments if n > 0):
            return math.inf
        value = self._epsilons.epsilon_of_segments(
            self._segments_with(extra_steps), self.delta, self.accountant,
            stride=max(1, extra_steps))
        return max(self.epsilon, value)

    def check_budget(self, extra_steps: int) -> float:
        """Epsilon after ``extra_steps``; raises BudgetExhaustedError if that exceeds budget."""
        would_be = self.epsilon_after(extra_steps)
        if self.budget_epsilon is not None and would_be > self.budget_epsilon:
            raise BudgetExhaustedError(self.epsilon, would_be, self.budget_epsilon)
        return would_be

    def record(self, steps: int) -> float:
        """Add ``steps`` completed steps at the current settings; returns the new epsilon."""
        new_epsilon = self.epsilon_after(steps)
        self.segments = [list(seg) for seg in self._segments_with(steps)]
        self.steps += steps
        self.epsilon = max(self.epsilon, new_epsilon)
        return self.epsilon

    def update_settings(self, sigma: float, sample_rate: float, max_grad_norm: float) -> None:
        """Adopt new settings for future steps; past segments keep their own."""
        self.sigma, self.sample_rate, self.max_grad_norm = sigma, sample_rate, max_grad_norm

    def to_json(self) -> str:
        body = asdict(self)
        body["format"] = LEDGER_FORMAT
        return json.dumps(body, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "ledger") -> PrivacyLedger:
        return cls.from_body(_parse_json(text, source), source)

    @classmethod
    def from_body(cls, body: object, source: str = "ledger") -> PrivacyLedger:
        """A ledger from its parsed JSON object (format 1), checked like :meth:`from_json`."""
        if not isinstance(body, dict) or body.get("format") != LEDGER_FORMAT:
            raise LedgerError(f"{source}: not a Murmur privacy ledger (format {LEDGER_FORMAT})")
        body = {k: v for k, v in body.items() if k != "format"}
        try:
            ledger = cls(**body)
        except TypeError as exc:
            raise LedgerError(f"{source}: wrong fields ({exc})") from exc
        numbers = (ledger.sigma, ledger.max_grad_norm, ledger.sample_rate, ledger.delta)
        if not all(isinstance(v, int | float) for v in numbers) or not isinstance(
            ledger.steps, int
        ):
            raise LedgerError(f"{source}: non-numeric settings")
        if not isinstance(ledger.accountant, str) or ledger.accountant not in ACCOUNTANTS:
            raise LedgerError(f"{source}: unknown accountant {ledger.accountant!r}")
        if ledger.steps < 0 or not (ledger.epsilon >= 0) or not 0 < ledger.delta < 1:
            raise LedgerError(f"{source}: values out of range")
        if sum(int(seg[2]) for seg in ledger.segments) != ledger.steps:
            raise LedgerError(f"{source}: segments do not add up to {ledger.steps} steps")
        return ledger

    def save(self, path: Path) -> None:
        """Atomic, durable write (tmp file + fsync + rename + directory fsync)."""
        atomic_write_bytes(Path(path), self.to_json().encode())

    @classmethod
    def load(cls, path: Path) -> PrivacyLedger:
        return cls.from_json(read_text(path), source=str(path))


def _parse_json(text: str, source: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise LedgerError(f"{source}: not valid JSON ({exc})") from exc


def read_text(path: Path) -> str:
    """The text of a ledger file; a missing or unreadable file is a LedgerError."""
    path = Path(path)
    try:
        return path.read_text()
    except FileNotFoundError as exc:
        raise LedgerError(f"{path}: ledger file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerError(f"{path}: cannot read ledger ({exc})") from exc
