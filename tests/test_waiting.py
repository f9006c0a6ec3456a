"""peer.waiting.wait_event: a timed wait on an event that never loses a cancellation."""

from __future__ import annotations

import asyncio

import pytest

from peer.waiting import wait_event


async def test_returns_true_when_set_and_false_on_timeout() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, 5.0) is True


async def test_cancellation_arriving_with_the_event_is_not_swallowed() -> None:
    """The race that kept a peer's session starter alive after shutdown (Python 3.11's
    wait_for returns the result instead of raising when both happen in one iteration)."""
    event = asyncio.Event()
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while True:
            event.clear()
            await wait_event(event, 10.0)
            rounds += 1

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)  # the loop is now waiting on the event
    event.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=5.0)
    assert task.cancelled()
    assert rounds == 0
