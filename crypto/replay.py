"""Per-sender replay windows: reject duplicates and stale sequence numbers in bounded memory.

Each sender's state is its highest accepted ``seq`` plus a bitmap of which of the ``window``
sequence numbers just below it were seen (an int used as a bit set; bit ``k`` = ``highest - k``).
A message is accepted once: a repeat raises DuplicateMessageError, anything at or below
``highest - window`` raises StaleMessageError (it can no longer be told apart from a replay).
Out-of-order delivery within the window is accepted.

Memory is bounded by ``max_senders``: the least recently active sender is evicted. Limitation
(documented, by design): once a sender is evicted, the first message seen from it again is
accepted whatever its seq, so an attacker able to flood the window with ``max_senders`` fresh
admitted identities could replay an evicted sender's old message once. Admission certificates
bound who can be a sender, and sealed payloads are bound to a session, which limits the harm.

Not thread-safe: one window belongs to one event loop.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from crypto.errors import DuplicateMessageError, ReplayError, StaleMessageError

MAX_SEQ = 2**63


@dataclass
class _SenderState:
    highest: int
    seen: int  # bit k set <=> seq (highest - k) was accepted


class ReplayWindow:
    """Bounded per-sender replay detection (see module docstring)."""

    def __init__(self, max_senders: int = 4096, window: int = 1024) -> None:
        if max_senders < 1 or window < 1:
            raise ValueError("max_senders and window must be >= 1")
        self.max_senders = max_senders
        self.window = window
        self._mask = (1 << window) - 1
        self._senders: OrderedDict[str, _SenderState] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._senders)

    def __contains__(self, sender: object) -> bool:
        return sender in self._senders

    def check(self, sender: str, seq: int) -> None:
        """Accept and record (sender, seq), or raise a ReplayError subclass without recording."""
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < MAX_SEQ:
            raise ReplayError(f"seq {seq!r} from {sender!r} is outside [0, 2**63)")
        state = self._senders.get(sender)
        if state is None:
            if len(self._senders) >= self.max_senders:
                self._senders.popitem(last=False)
                self.evictions += 1
            self._senders[sender] = _SenderState(highest=seq, seen=1)
            return
        self._senders.move_to_end(sender)
        if seq > state.highest:
            shift = seq - state.highest
            state.seen = ((state.seen << shift) | 1) & self._mask if shift < self.window else 1
            state.highest = seq
            return
        offset = state.highest - seq
        if offset >= self.window:
            raise StaleMessageError(
                f"seq {seq} from {sender!r} is older than the window "
                f"(highest {state.highest}, window {self.window})"
            )
        bit = 1 << offset
        if state.seen & bit:
            raise DuplicateMessageError(f"seq {seq} from {sender!r} was already seen")
        state.seen |= bit
