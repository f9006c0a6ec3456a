"""Lookups of peers outside a partial view: hold what needs them until their announcement.

A peer following only some announcement buckets (docs/design/partial-view.md) may receive a
message from a sender it has never heard of, or a START naming members it does not know.
Rather than drop it, the node holds it here, subscribes to each missing peer's exact
announce topic (whose retained announcement the broker delivers at once), and handles it
again once every peer it waits for is admitted; after ``lookup_s`` it gives up.

Pure bookkeeping with time passed in; the caller does the (un)subscribing and the handling.

Security properties (the lookup must not become a lever for strangers):

* Nothing is trusted by being held: a held message is checked again from the start once its
  sender is known, and a looked-up peer enters the view only through the ordinary admission
  of its signed, certified announcement (peer/network/view/membership.py).
* Bounded memory and broker work: at most ``held_limit`` items and ``held_bytes`` bytes (the
  caller's conservative size of each item) are held in all. Beyond the count the oldest item
  is given up (``failed``); beyond the bytes the oldest items are given up, and an item larger
  than all of ``held_bytes`` is refused at once (``over_budget``, a drop reason of its own).
  At most ``max_in_flight`` lookups run at once, each lasts at most
  ``lookup_s``, and a peer whose lookup failed is not looked up again for ``lookup_s`` (so a
  stranger costs at most one lookup per ``2 x lookup_s``, however many messages it sends). A
  peer whose lookup succeeded may be looked up again whenever it is needed (it is real, and
  the view may have forgotten it since). What cannot be held or looked up fails at once; the
  caller counts it.
* The caller holds only messages whose topic binding is otherwise valid, so a stranger can
  make the peer look up only ids it publishes under; a broker ACL confines a client to its
  own id, so without broker credentials of its own nobody makes the peer look anyone up.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from protocol.limits import MAX_PAYLOAD_BYTES

T = TypeVar("T")

#: Lookups in flight at once, unless configured otherwise: a session involves at most
#: MAX_MEMBERS peers, so a few sessions' worth of first contacts.
DEFAULT_MAX_IN_FLIGHT = 16

#: Bytes held in all, unless configured otherwise: two maximal messages. A peer sizes it
#: from its model and group instead (peer/network/node.py).
DEFAULT_HELD_BYTES = 2 * MAX_PAYLOAD_BYTES


@dataclass
class LookupStep(Generic[T]):
    """What the caller must do after a call: subscribe / unsubscribe the announce topics of
    these peers, handle ``ready`` items again (in order), give up ``failed`` ones and the
    ``over_budget`` ones given up for the byte budget."""

    subscribe: list[str] = field(default_factory=list)
    unsubscribe: list[str] = field(default_factory=list)
    ready: list[T] = field(default_factory=list)
    failed: list[T] = field(default_factory=list)
    over_budget: list[T] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.subscribe or self.unsubscribe or self.ready or self.failed
                    or self.over_budget)


@dataclass
class _Held(Generic[T]):
    item: T
    waiting: set[str]
    key: object
    size: int


class LookupTable(Generic[T]):
    """Items waiting for peers to be admitted, and the lookups of those peers."""

    def __init__(self, *, lookup_s: float, held_limit: int,
                 held_bytes: int = DEFAULT_HELD_BYTES,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        if lookup_s <= 0 or held_limit < 1 or held_bytes < 1 or max_in_flight < 1:
            raise ValueError("need lookup_s > 0, held_limit >= 1, held_bytes >= 1 and "
                             "max_in_flight >= 1")
        self.lookup_s = lookup_s
        self.held_limit = held_limit
        self.held_bytes_limit = held_bytes
        self.max_in_flight = max_in_flight
        self.held_bytes = 0  # the sizes of the items held now
        self._deadline: dict[str, float] = {}  # peer -> when its lookup gives up
        self._failed: dict[str, float] = {}  # peer -> when its last lookup failed
        self._held: list[_Held[T]] = []  # in arrival order
        self.started_total = 0  # lookups started, for status
        self.resolved_total = 0  # lookups that found the peer

    # ------------------------------------------------------------------------------ queries
    @property
    def in_flight(self) -> list[str]:
        """Peers being looked up now."""
        return list(self._deadline)

    @property
    def held(self) -> int:
        return len(self._held)

    def holds_key(self, key: object) -> bool:
        """Whether some held item carries ``key`` (later items of the same key must wait)."""
        return any(h.key == key for h in self._held)

    def waiting_for(self, key: object) -> set[str]:
        """Every peer the held items of ``key`` wait for."""
        return set().union(*(h.waiting for h in self._held if h.key == key))

    # ---------------------------------------------------------------------------- changes
    def hold(self, item: T, peers: Collection[str], now: float,
             key: object = None, size: int = 0) -> LookupStep[T]:
        """Hold ``item`` (``size`` bytes) until every one of ``peers`` is admitted
        (:meth:`known`).

        A peer not yet being looked up is looked up now (``subscribe``) unless too many
        lookups are in flight or it was looked up less than ``lookup_s`` ago: then the item
        fails at once. An item larger than ``held_bytes`` is refused at once
        (``over_budget``). Holding beyond ``held_limit`` gives up the oldest item
        (``failed``), beyond ``held_bytes`` the oldest items (``over_budget``).
        """
        step: LookupStep[T] = LookupStep()
        self._forget_old_failures(now)
        wanted = set(peers)
        if not wanted:
            step.ready.append(item)
            return step
        if size > self.held_bytes_limit:
            step.over_budget.append(item)
            return step
        new = [p for p in sorted(wanted) if p not in self._deadline]
        if (len(self._deadline) + len(new) > self.max_in_flight
                or any(p in self._failed for p in new)):
            step.failed.append(item)
            return step
        for peer in new:
            self._deadline[peer] = now + self.lookup_s
            self.started_total += 1
            step.subscribe.append(peer)
        self._held.append(_Held(item, wanted, key, size))
        self.held_bytes += size
        while len(self._held) > self.held_limit:
            step.failed.append(self._give_up_oldest())
        while self.held_bytes > self.held_bytes_limit:
            step.over_budget.append(self._give_up_oldest())
        self._end_idle_lookups(step, now)
        return step

    def known(self, peer: str) -> LookupStep[T]:
        """``peer`` was admitted: its lookup ends; items no longer waiting are ready."""
        step: LookupStep[T] = LookupStep()
        if self._deadline.pop(peer, None) is not None:
            self.resolved_total += 1
            step.unsubscribe.append(peer)
        keep: list[_Held[T]] = []
        for held in self._held:
            held.waiting.discard(peer)
            if held.waiting:
                keep.append(held)
            else:
                step.ready.append(held.item)
        self._held = keep
        self.held_bytes = sum(h.size for h in keep)
        return step

    def expire(self, now: float) -> LookupStep[T]:
        """Give up lookups past ``lookup_s`` and every item waiting for one of them."""
        step: LookupStep[T] = LookupStep()
        late = {p for p, deadline in self._deadline.items() if now >= deadline}
        if not late:
            return step
        for peer in sorted(late):
            del self._deadline[peer]
            self._failed[peer] = now
            step.unsubscribe.append(peer)
        keep: list[_Held[T]] = []
        for held in self._held:
            if held.waiting & late:
                step.failed.append(held.item)
            else:
                keep.append(held)
        self._held = keep
        self.held_bytes = sum(h.size for h in keep)
        self._end_idle_lookups(step, now)
        return step

    def clear(self) -> LookupStep[T]:
        """Give up everything (the connection is gone: its subscriptions with it)."""
        step: LookupStep[T] = LookupStep(failed=[h.item for h in self._held])
        self._held = []
        self.held_bytes = 0
        self._deadline.clear()
        return step

    # --------------------------------------------------------------------------- internal
    def _give_up_oldest(self) -> T:
        held = self._held.pop(0)
        self.held_bytes -= held.size
        return held.item

    def _forget_old_failures(self, now: float) -> None:
        self._failed = {p: t for p, t in self._failed.items() if now - t < self.lookup_s}

    def _end_idle_lookups(self, step: LookupStep[T], now: float) -> None:
        """End lookups no held item waits for any more (their items were given up): a
        failure too, so a flood of messages cannot restart them at once."""
        waited = set().union(*(h.waiting for h in self._held))
        for peer in [p for p in self._deadline if p not in waited]:
            del self._deadline[peer]
            self._failed[peer] = now
            step.unsubscribe.append(peer)
