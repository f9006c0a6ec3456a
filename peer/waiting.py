"""Waiting with a deadline without losing a cancellation.

On Python 3.11, ``asyncio.wait_for(event.wait(), t)`` swallows a cancellation that arrives in
the same loop iteration as the event is set (CPython gh-86296, fixed in 3.12): the cancelled
task carries on as if nothing happened. A peer's background loops wait on events all the time
and are cancelled at shutdown, so one such race left a loop running and a peer that never
stopped. ``asyncio.timeout`` counts cancellations per task and has no such window; every
timed wait on an event in Murmur goes through here.
"""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until ``event`` is set or ``timeout_s`` has passed; True when it is set.

    A cancellation of the calling task always propagates.
    """
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True
