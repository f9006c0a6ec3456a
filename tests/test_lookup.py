"""Lookups of peers outside a partial view (peer/network/view/lookup.py): pure bookkeeping."""

from __future__ import annotations

import os

import pytest

from peer.errors import DroppedError
from peer.network.counters import DropCounter
from peer.network.transport import Incoming
from peer.network.view.lookup import DEFAULT_HELD_BYTES, LookupTable
from peer.network.view.loop import ViewKeeper
from peer.network.view.membership import MembershipView
from peer.network.view.partial import ViewConfig
from protocol.topics import direct_topic


def table(**kw: float) -> LookupTable[str]:
    args = {"lookup_s": 2.0, "held_limit": 4, "max_in_flight": 3,
            "held_bytes": DEFAULT_HELD_BYTES, **kw}
    return LookupTable(lookup_s=args["lookup_s"], held_limit=int(args["held_limit"]),
                       held_bytes=int(args["held_bytes"]),
                       max_in_flight=int(args["max_in_flight"]))


def test_held_messages_are_released_in_order_once_the_sender_is_known() -> None:
    t = table()
    first = t.hold("a1", ["alice"], now=0.0)
    assert first.subscribe == ["alice"] and not first.failed and not first.ready
    second = t.hold("a2", ["alice"], now=0.1)
    assert second.subscribe == []  # one lookup per peer
    assert t.hold("b1", ["bob"], now=0.2).subscribe == ["bob"]
    step = t.known("alice")
    assert step.ready == ["a1", "a2"] and step.unsubscribe == ["alice"]
    assert t.in_flight == ["bob"] and t.held == 1
    assert t.resolved_total == 1 and t.started_total == 2


def test_an_item_waiting_for_several_peers_waits_for_all() -> None:
    t = table()
    assert sorted(t.hold("start", ["bob", "carol"], now=0.0).subscribe) == ["bob", "carol"]
    assert t.known("bob").ready == []
    assert t.known("carol").ready == ["start"]


def test_expired_lookups_fail_their_items_and_unsubscribe() -> None:
    t = table()
    t.hold("a1", ["alice"], now=0.0)
    t.hold("b1", ["bob"], now=1.5)
    assert not t.expire(1.9)
    step = t.expire(2.0)
    assert step.failed == ["a1"] and step.unsubscribe == ["alice"]
    assert t.in_flight == ["bob"]
    assert t.known("alice").ready == []  # too late: nothing waits any more


def test_in_flight_lookups_are_bounded() -> None:
    t = table(max_in_flight=2)
    t.hold("x", ["p1"], now=0.0)
    t.hold("y", ["p2"], now=0.0)
    step = t.hold("z", ["p3"], now=0.0)
    assert step.failed == ["z"] and step.subscribe == []
    assert sorted(t.in_flight) == ["p1", "p2"]
    # waiting on a peer already looked up needs no new lookup: still accepted
    assert t.hold("x2", ["p1"], now=0.0).failed == []


def test_a_failed_lookup_is_not_retried_for_lookup_s() -> None:
    t = table()
    t.hold("a1", ["alice"], now=0.0)
    assert t.expire(2.0).failed == ["a1"]
    assert t.hold("a2", ["alice"], now=3.9).failed == ["a2"]  # failed at 2.0: too soon
    assert t.hold("a3", ["alice"], now=4.0).subscribe == ["alice"]
    # a lookup ended because its held items were given up counts as failed too
    t = table(held_limit=1)
    t.hold("a1", ["alice"], now=0.0)
    assert t.hold("b1", ["bob"], now=0.5).unsubscribe == ["alice"]
    assert t.hold("a2", ["alice"], now=1.0).failed == ["a2"]


def test_a_found_peer_may_be_looked_up_again_at_once() -> None:
    t = table()
    t.hold("a1", ["alice"], now=0.0)
    assert t.known("alice").ready == ["a1"]
    assert t.hold("a2", ["alice"], now=0.1).subscribe == ["alice"]  # forgotten since: again


def test_held_items_are_bounded_oldest_given_up_first() -> None:
    t = table(held_limit=2)
    t.hold("a1", ["alice"], now=0.0)
    t.hold("b1", ["bob"], now=0.0)
    step = t.hold("b2", ["bob"], now=0.0)
    assert step.failed == ["a1"]
    assert step.unsubscribe == ["alice"]  # nothing waits for alice any more
    assert t.in_flight == ["bob"] and t.held == 2


def test_keys_group_the_messages_of_one_session() -> None:
    t = table()
    t.hold("start", ["carol"], now=0.0, key=b"s1")
    assert t.holds_key(b"s1") and not t.holds_key(b"s2")
    assert t.waiting_for(b"s1") == {"carol"}
    t.hold("share", t.waiting_for(b"s1"), now=0.1, key=b"s1")
    assert t.known("carol").ready == ["start", "share"]
    assert not t.holds_key(b"s1")


def test_nothing_to_wait_for_is_ready_at_once_and_clear_gives_up_all() -> None:
    t = table()
    assert t.hold("now", [], now=0.0).ready == ["now"]
    t.hold("a1", ["alice"], now=0.0)
    assert t.clear().failed == ["a1"] and t.in_flight == [] and t.held == 0


def test_held_bytes_are_bounded_oldest_given_up_first() -> None:
    t = table(held_limit=10, held_bytes=1000)
    assert not t.hold("a1", ["alice"], now=0.0, size=400).over_budget
    assert not t.hold("b1", ["bob"], now=0.0, size=400).over_budget
    assert t.held_bytes == 800
    step = t.hold("b2", ["bob"], now=0.0, size=300)  # 1100 > 1000: a1 goes
    assert step.over_budget == ["a1"] and step.failed == []
    assert step.unsubscribe == ["alice"]  # nothing waits for alice any more
    assert t.held == 2 and t.held_bytes == 700
    step = t.hold("c1", ["carol"], now=0.0, size=1000)  # fits only alone: both bobs go
    assert step.over_budget == ["b1", "b2"] and t.held_bytes == 1000
    assert t.known("carol").ready == ["c1"] and t.held_bytes == 0


def test_an_item_larger_than_the_budget_is_refused_without_a_lookup() -> None:
    t = table(held_bytes=1000)
    t.hold("a1", ["alice"], now=0.0, size=10)
    step = t.hold("huge", ["bob"], now=0.0, size=1001)
    assert step.over_budget == ["huge"] and step.subscribe == [] and step.failed == []
    assert t.in_flight == ["alice"] and t.held == 1 and t.held_bytes == 10
    assert t.started_total == 1


def test_released_expired_and_cleared_items_free_their_bytes() -> None:
    t = table(held_bytes=1000)
    t.hold("a1", ["alice"], now=0.0, size=100)
    t.hold("b1", ["bob"], now=1.0, size=200)
    t.hold("c1", ["carol"], now=1.5, size=300)
    assert t.known("alice").ready == ["a1"] and t.held_bytes == 500
    assert t.expire(3.0).failed == ["b1"] and t.held_bytes == 300
    assert t.clear().failed == ["c1"] and t.held_bytes == 0


@pytest.mark.parametrize("kw", [{"lookup_s": 0}, {"held_limit": 0}, {"max_in_flight": 0},
                                {"held_bytes": 0}])
def test_rejects_nonsense(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        table(**kw)


async def test_the_view_counts_messages_given_up_for_the_byte_budget() -> None:
    """The node's view keeper sizes each held message (payload and topic) and counts the
    ones given up for the byte budget as ``lookup_over_budget``, apart from the lookups
    that failed (``unknown_sender``)."""
    budget = 3 * (100_000 + 1024 + 64)
    drops = DropCounter("me")
    keeper = ViewKeeper(
        network_id="net", peer_id="me", config=ViewConfig(view_size=2),
        membership=MembershipView("net", bytes(32), "me", silence_expiry_s=60.0,
                                  clock_skew_s=60.0),
        transport=None,  # type: ignore[arg-type]  # holding needs no broker
        drops=drops, pinned=list, current_session=lambda: None,
        redeliver=lambda item, now: None, dispatch=lambda header, body, now: None,
        held_bytes=budget)
    unknown = DroppedError("unknown_sender")
    for sender in ("s1", "s2", "s3", "s4"):
        held = keeper.hold_unknown(unknown, Incoming(direct_topic("net", sender, "me"),
                                                     os.urandom(100_000), False), 0.0)
        assert held
    assert keeper.lookups.held == 3 and keeper.lookups.held_bytes <= budget
    assert drops.snapshot() == {"lookup_over_budget": 1}  # s1's message made room for s4's
    huge = Incoming(direct_topic("net", "s5", "me"), os.urandom(budget), False)
    assert keeper.hold_unknown(unknown, huge, 0.0)
    assert drops.snapshot() == {"lookup_over_budget": 2} and keeper.lookups.held == 3
    keeper.tick(10.0)  # the lookups time out: their messages are the usual failed lookups
    assert drops.snapshot() == {"lookup_over_budget": 2, "unknown_sender": 3}
    assert keeper.lookups.held_bytes == 0
