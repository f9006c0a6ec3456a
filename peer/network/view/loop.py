"""A peer's bounded membership view in the node: which buckets it follows, whom it looks up.

With ``ViewConfig.view_size`` 0 (the default) a peer follows every announcement (the full
view): the all-buckets filter is one of the transport's restored subscriptions and nothing
here runs. With ``view_size`` > 0 (docs/design/partial-view.md):

* on every connection the :class:`ViewKeeper` task (re)subscribes what it followed, then asks
  :func:`plan_follow` for more: subscribe (SUBACK awaited), give the retained announcements
  ``settle_s``, count the live peers heard per followed bucket, ask again;
* every ``rotate_s`` it swaps one followed bucket for a new one (:func:`plan_rotation`): the
  new one is subscribed first, then the old one dropped and every peer outside the followed
  buckets forgotten, except the participants of the session in flight; a peer admitted by a
  lookup is forgotten likewise once no session needs it and ``lookup_s`` has passed;
* a message from a sender outside the view, or a START naming members outside it, is held
  (peer/network/view/lookup.py) while the missing peers' exact announce topics are subscribed;
  their retained announcements pass the ordinary admission, and the held messages are then
  handled again from the first check (or, for an admitted START, dispatched).

Security property: nothing changes about what is accepted. Every announcement, looked up or
followed, passes MembershipView's certificate and signature checks; every held message is
re-checked in full once its sender is known; lookups are bounded (lookup.py) and fail as
counted ``unknown_sender`` drops, as an unknown sender always did. What is held waiting is
bounded in bytes too (``held_bytes``, sized by the node from its model and group); a message
given up for that budget is a counted ``lookup_over_budget`` drop.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Collection

from peer.errors import DroppedError
from peer.network.counters import DropCounter
from peer.network.session.early import ITEM_OVERHEAD_BYTES, held_size
from peer.network.transport import Incoming, Transport
from peer.network.view.lookup import DEFAULT_HELD_BYTES, LookupStep, LookupTable
from peer.network.view.membership import MembershipView
from peer.network.view.partial import (
    ALL_BUCKETS,
    Following,
    ViewConfig,
    plan_follow,
    plan_rotation,
    plan_trim,
)
from peer.waiting import wait_event
from protocol import messages as m
from protocol.buckets import bucket_of
from protocol.errors import ProtocolError
from protocol.topics import announce_filter, announce_topic, bucket_filter, parse_topic

log = logging.getLogger(__name__)

#: A message held until its sender is known (checked again in full), or an admitted message
#: of a session whose START waits for members (dispatched as is).
HeldItem = Incoming | tuple[m.Header, m.Body]

#: The drop reason of a held message given up for the byte budget of held lookups.
LOOKUP_OVER_BUDGET = "lookup_over_budget"


def held_item_size(item: HeldItem) -> int:
    """A conservative estimate of the memory a held item keeps: a raw message's payload and
    topic, or a decoded body's bytes (peer.network.session.early.held_size), plus the object
    overhead."""
    if isinstance(item, Incoming):
        return len(item.payload) + len(item.topic) + ITEM_OVERHEAD_BYTES
    return held_size(item[1])


def restored_announce_filters(network_id: str, config: ViewConfig) -> list[str]:
    """The announce filters the transport itself restores on every connection: every bucket
    for the full view; none for a partial one (the :class:`ViewKeeper` subscribes those)."""
    return [announce_filter(network_id)] if config.view_size == 0 else []


class _NewConnection(Exception):
    """The connection the follow plan was working on is gone (or replaced)."""


class ViewKeeper:
    """Follows announcement buckets and looks up peers outside them, for one peer."""

    def __init__(
        self,
        *,
        network_id: str,
        peer_id: str,
        config: ViewConfig,
        membership: MembershipView,
        transport: Transport,
        drops: DropCounter,
        pinned: Callable[[], Collection[str]],
        current_session: Callable[[], bytes | None],
        redeliver: Callable[[Incoming, float], None],
        dispatch: Callable[[m.Header, m.Body, float], None],
        held_bytes: int = DEFAULT_HELD_BYTES,
    ) -> None:
        self.network_id = network_id
        self.peer_id = peer_id
        self.config = config
        self.membership = membership
        self.transport = transport
        self.drops = drops
        self._pinned = pinned
        self._current_session = current_session
        self._redeliver = redeliver
        self._dispatch = dispatch
        #: Partial view (view_size > 0): buckets followed and lookups; else the full view.
        self.partial = config.view_size > 0
        self.following = Following(everything=not self.partial)
        self.lookups: LookupTable[HeldItem] = LookupTable(
            lookup_s=config.lookup_s, held_limit=config.lookup_held, held_bytes=held_bytes)
        self.rotations = 0
        self._rng = secrets.SystemRandom()
        self._connected = asyncio.Event()  # set by the node's on_connected hook
        self._requests: asyncio.Queue[tuple[str, bool]] = asyncio.Queue()

    # ------------------------------------------------------------------------------ status

    @property
    def followed_buckets(self) -> int:
        """Buckets followed now; -1 when following every bucket."""
        return -1 if self.following.everything else len(self.following.buckets)

    # -------------------------------------------------------------------------- the tasks
    def on_connected(self) -> None:
        """A new broker connection (transport hook): its dynamic subscriptions start empty."""
        self._connected.set()

    async def run(self) -> None:
        """Follow buckets on every connection until cancelled (nothing to do for a full view)."""
        if not self.partial:
            return
        subscriber = asyncio.create_task(self._lookup_subscriptions())
        try:
            while True:
                await self._connected.wait()
                self._connected.clear()
                try:
                    await self._follow(restore=True)
                    while True:
                        await self._pause(self.config.rotate_s)
                        if await self._rotate():
                            await self._pause(self.config.settle_s)
                            await self._follow(restore=False)
                            await self._trim()
                except _NewConnection:
                    continue
        finally:
            subscriber.cancel()

    async def _pause(self, seconds: float) -> None:
        if await wait_event(self._connected, seconds) or not self.transport.connected.is_set():
            raise _NewConnection

    async def _change(self, topic_filter: str, subscribe: bool) -> None:
        change = self.transport.subscribe if subscribe else self.transport.unsubscribe
        if not await change(topic_filter):
            if self._connected.is_set() or not self.transport.connected.is_set():
                raise _NewConnection
            log.warning("%s: could not %s %s", self.peer_id,
                        "subscribe to" if subscribe else "unsubscribe from", topic_filter)

    async def _follow(self, *, restore: bool) -> None:
        """Subscribe what was followed (after a reconnect), then follow the plan to its end."""
        net = self.network_id
        if restore:
            filters = [announce_filter(net)] if self.following.everything else \
                [bucket_filter(net, b) for b in self.following.buckets]
            for topic_filter in filters:
                await self._change(topic_filter, True)
            if filters:
                await self._pause(self.config.settle_s)
        while True:
            bucket = plan_follow(self.following, self._heard(), self.config.view_size,
                                 self._rng)
            if bucket is None:
                return
            if bucket == ALL_BUCKETS:
                await self._change(announce_filter(net), True)
                dropped, self.following = self.following.buckets, Following(everything=True)
                for old in dropped:
                    await self._change(bucket_filter(net, old), False)
                log.info("%s: following every bucket", self.peer_id)
                return
            await self._change(bucket_filter(net, bucket), True)
            self.following.buckets.append(bucket)
            await self._pause(self.config.settle_s)

    async def _trim(self) -> None:
        """Drop followed buckets the view does not need (plan_trim), after a rotation."""
        while (bucket := plan_trim(self.following, self._heard(), self.config.view_size,
                                   self._rng)) is not None:
            await self._change(bucket_filter(self.network_id, bucket), False)
            self.following.buckets.remove(bucket)
            self.forget_unfollowed(time.time(), grace_s=0.0)

    async def _rotate(self) -> bool:
        """Swap one followed bucket for a new one; True when it did."""
        plan = plan_rotation(self.following, self._rng)
        if plan is None:
            return False
        new, old = plan
        net = self.network_id
        await self._change(bucket_filter(net, new), True)  # first: no gap in the view
        self.following.buckets.append(new)
        await self._change(bucket_filter(net, old), False)
        self.following.buckets.remove(old)
        self.rotations += 1
        self.forget_unfollowed(time.time(), grace_s=0.0)
        return True

    def _heard(self) -> dict[int, int]:
        """Live peers heard per followed bucket."""
        counts = Counter(bucket_of(self.network_id, mem.peer_id)
                         for mem in self.membership.live(time.time()))
        return {b: counts.get(b, 0) for b in self.following.buckets}

    def forget_unfollowed(self, now: float, grace_s: float) -> list[str]:
        """Forget every peer outside the followed buckets (of a dropped bucket, or looked up)
        last heard more than ``grace_s`` ago, except the participants of the session in
        flight and peers a lookup waits for. Returns the peers forgotten."""
        if self.following.everything:
            return []
        followed = set(self.following.buckets)
        keep = set(self._pinned()) | set(self.lookups.in_flight)
        stale = []
        for peer in self.membership.peer_ids():
            member = self.membership.get(peer)
            if (member is not None and now - member.last_seen > grace_s and peer not in keep
                    and bucket_of(self.network_id, peer) not in followed):
                stale.append(peer)
        return self.membership.forget(stale)

    async def _lookup_subscriptions(self) -> None:
        """Subscribe / unsubscribe the exact announce topics of lookups, in request order."""
        while True:
            topic_filter, subscribe = await self._requests.get()
            change = self.transport.subscribe if subscribe else self.transport.unsubscribe
            await change(topic_filter)  # a failed lookup subscription just times out

    # ----------------------------------------------------------------------------- lookups
    def hold_unknown(self, error: DroppedError, incoming: Incoming, now: float) -> bool:
        """Hold a message refused as ``unknown_sender`` and look its sender up; True when
        held. Only in a partial view, only direct and session topics addressed to us (the
        checks before the sender's, topic binding included, have passed)."""
        if not self.partial or error.reason != "unknown_sender":
            return False
        try:
            parsed = parse_topic(self.network_id, incoming.topic)
        except ProtocolError:
            return False
        if parsed.kind == "announce" or parsed.recipient not in (None, self.peer_id):
            return False
        self._apply(self.lookups.hold(incoming, [parsed.sender], now,
                                      size=held_item_size(incoming)), now)
        return True

    def hold_admitted(self, header: m.Header, body: m.Body, now: float) -> bool:
        """Hold an admitted message while its session's START waits for members; True when
        held (a START of our session naming members outside the view holds itself)."""
        if not self.partial:
            return False
        item = (header, body)
        if self.lookups.holds_key(header.session):
            waiting = self.lookups.waiting_for(header.session)
            self._apply(self.lookups.hold(item, waiting, now, header.session,
                                          held_item_size(item)), now)
            return True
        if not isinstance(body, m.Start | m.MaskedStart) \
                or header.session != self._current_session():
            return False
        unknown = [p for p in body.members if p != self.peer_id and p not in self.membership]
        if not unknown:
            return False
        self._apply(self.lookups.hold(item, unknown, now, header.session,
                                      held_item_size(item)), now)
        return True

    def on_admitted(self, incoming: Incoming, now: float) -> None:
        """After an announce topic's message was admitted: release what waited for its peer."""
        if not self.partial or not self.lookups.in_flight:
            return
        try:
            parsed = parse_topic(self.network_id, incoming.topic)
        except ProtocolError:
            return
        if parsed.kind == "announce" and parsed.sender in self.membership:
            self._apply(self.lookups.known(parsed.sender), now)

    def tick(self, now: float) -> None:
        """Give up lookups past ``lookup_s``, and forget looked-up peers no session needs
        any more once ``lookup_s`` has passed (called about once a second)."""
        if self.partial:
            self._apply(self.lookups.expire(now), now)
            self.forget_unfollowed(now, grace_s=self.config.lookup_s)

    def _apply(self, step: LookupStep[HeldItem], now: float) -> None:
        net = self.network_id
        for peer in step.subscribe:
            self._requests.put_nowait((announce_topic(net, peer), True))
        for peer in step.unsubscribe:
            self._requests.put_nowait((announce_topic(net, peer), False))
        for item in step.failed:
            if isinstance(item, Incoming):
                self.drops.drop("unknown_sender", f"lookup failed: {item.topic}")
            else:
                self._dispatch(item[0], item[1], now)  # its session aborts: unknown_member
        for item in step.over_budget:
            self.drops.drop(LOOKUP_OVER_BUDGET, item.topic if isinstance(item, Incoming)
                            else f"{item[0].kind.name} from {item[0].sender}")
        for item in step.ready:
            if isinstance(item, Incoming):
                self._redeliver(item, now)
            else:
                self._dispatch(item[0], item[1], now)
