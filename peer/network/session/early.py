"""Messages a session holds until it can handle them, under a byte budget.

MQTT orders messages only per publisher and topic, so another member's SHARE (Shamir), or its
KEYS, MASKED, CONFIRM or REVEAL (masked), may reach a member before the initiator's START, and
a REVEAL may arrive before the member holds a quorum of CONFIRMs. Both session kinds hold such
messages in an :class:`EarlyBuffer` and handle them, in arrival order, once they can.

Security property: what a session holds for others is bounded in bytes, per sender and in
total. Before START a member does not know the group yet, so any admitted peer that knows the
session id (the initiator, any invitee, a released invitee) can send it messages. The buffer
holds at most ``per_sender_bytes`` from one sender and ``total_bytes`` in all and refuses the
rest as counted ``early_over_budget`` drops. Nothing held is evicted, so a later flood cannot
push out a message that arrived first. Sizes are conservative estimates of the memory a
decoded message keeps (:func:`held_size`).

The default budget (:meth:`EarlyBudget.for_session`) is what honest peers legitimately send
before START: from each of the g - 1 other members one message the size of the model
(:func:`protocol.limits.session_message_bound`) and a few small ones, with room for
FLOOD_SENDERS more senders, so that a few peers that learned the session id cannot crowd out
the members either.

Pure: no asyncio, no clock.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

import numpy as np

from peer.errors import DroppedError
from protocol.limits import FLOOD_SENDERS, session_message_bound

__all__ = ["EARLY_OVER_BUDGET", "ITEM_OVERHEAD_BYTES", "OBJECT_OVERHEAD_BYTES",
           "SMALL_MESSAGES_BYTES", "EarlyBudget", "EarlyBuffer", "held_size"]

T = TypeVar("T")

#: The drop reason of a message refused because the budget is spent.
EARLY_OVER_BUDGET: Final = "early_over_budget"

#: What :func:`held_size` adds per message for the Python objects around its fields: the
#: header (two ids and a session id) and the tuple holding it with the body.
ITEM_OVERHEAD_BYTES: Final = 1024

#: What :func:`held_size` adds per object inside a body for its CPython header: a str or
#: bytes object is about 33-57 bytes, an ndarray about 112, a tuple 40 plus 8 per item.
OBJECT_OVERHEAD_BYTES: Final = 128

#: Room per sender, beyond its one vector-sized message, for the small messages it may send
#: before START: KEYS, CONFIRM and REVEAL of a masked session are each under 4 KiB with the
#: overheads above.
SMALL_MESSAGES_BYTES: Final = 16 * 1024


@dataclass(frozen=True)
class EarlyBudget:
    """How many bytes a session may hold early: from one sender, and in all."""

    per_sender_bytes: int
    total_bytes: int

    def __post_init__(self) -> None:
        if not 0 < self.per_sender_bytes <= self.total_bytes:
            raise ValueError("need 0 < per_sender_bytes <= total_bytes")

    @classmethod
    def for_session(cls, param_count: int, group_size: int,
                    flood_senders: int = FLOOD_SENDERS) -> EarlyBudget:
        """The budget of a session of ``group_size`` members over a ``param_count``-parameter
        model: one model-sized message plus SMALL_MESSAGES_BYTES per sender, for the g - 1
        other members and ``flood_senders`` more senders."""
        if group_size < 2 or flood_senders < 0:
            raise ValueError("need group_size >= 2 and flood_senders >= 0")
        per_sender = session_message_bound(param_count) + SMALL_MESSAGES_BYTES
        return cls(per_sender, (group_size - 1 + flood_senders) * per_sender)


def held_size(body: object) -> int:
    """A conservative estimate of the memory one decoded message and its header keep: the
    bytes, arrays and strings of the body, in any field or tuple of fields, each with
    OBJECT_OVERHEAD_BYTES, plus ITEM_OVERHEAD_BYTES."""
    return ITEM_OVERHEAD_BYTES + _payload_bytes(body)


def _payload_bytes(value: object) -> int:
    if isinstance(value, bytes | bytearray | memoryview):
        size = memoryview(value).nbytes
    elif isinstance(value, np.ndarray):
        size = int(value.nbytes)
    elif isinstance(value, str):
        size = len(value.encode())
    elif isinstance(value, tuple | list):
        size = sum(_payload_bytes(v) for v in value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        size = sum(_payload_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    else:
        size = 0  # ints, enums: cached or small
    return size + OBJECT_OVERHEAD_BYTES


class EarlyBuffer(Generic[T]):
    """Items held for a session in arrival order, within an :class:`EarlyBudget`."""

    def __init__(self, budget: EarlyBudget) -> None:
        self.budget = budget
        self._items: list[T] = []
        self._by_sender: dict[str, int] = {}
        self.held_bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def held_by(self, sender: str) -> int:
        """Bytes held from ``sender``."""
        return self._by_sender.get(sender, 0)

    def hold(self, sender: str, item: T, size: int) -> None:
        """Hold ``item`` (``size`` bytes, :func:`held_size`) from ``sender``; DroppedError
        ``early_over_budget`` when it would exceed the sender's or the total budget."""
        if (self.held_by(sender) + size > self.budget.per_sender_bytes
                or self.held_bytes + size > self.budget.total_bytes):
            raise DroppedError(EARLY_OVER_BUDGET)
        self._items.append(item)
        self._by_sender[sender] = self.held_by(sender) + size
        self.held_bytes += size

    def take(self) -> list[T]:
        """Every item held, in arrival order; the buffer is empty afterwards."""
        items = self._items
        self.clear()
        return items

    def clear(self) -> None:
        """Forget everything held (the session ended, or handles the items now)."""
        self._items = []
        self._by_sender.clear()
        self.held_bytes = 0
