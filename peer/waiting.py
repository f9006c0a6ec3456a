"""Waiting with a deadline without losing a cancellation.

On Python 3.11, ``asyncio.wait_for(event.wait(), t)`` swallows a cancellation that arrives in
the same loop iteration as the event is set (CPython gh-86296, fixed in 3.12): the cancelled
task carries on as if nothing happened. A peer's background loops wait on events all the time
and are cancelled at shutdown, so one such race left a loop running and a peer that never
stopped. ``asyncio.timeout`` counts cancellations per task and has no such window; every
timed wait on an event in Murmur goes through here, and so does stopping a peer's background
tasks (:func:`stop_tasks`).
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


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


async def stop_tasks(tasks: list[asyncio.Task[None]], timeout_s: float, owner: str) -> None:
    """Cancel ``tasks`` and wait for them at most ``timeout_s``; log the stuck and the failed.

    Cancelled again up to three times: on Python 3.11 a cancellation that arrives as an awaited
    reply does (aiomqtt's PUBACK wait is an asyncio.wait_for) is lost; a peer's loops also end
    on its stopping flag, so a second cancellation finds them asleep.
    """
    for task in tasks:
        task.cancel()
    stuck: set[asyncio.Task[None]] = set(tasks)
    for _attempt in range(3):
        _done, stuck = await asyncio.wait(stuck, timeout=timeout_s / 3)
        if not stuck:
            break
        for task in stuck:
            task.cancel()
    for task in tasks:
        if task in stuck:
            log.error("%s: background task %s did not stop in %.0f s", owner,
                      task.get_coro(), timeout_s)
        elif not task.cancelled() and task.exception() is not None:
            log.error("%s: a background task had failed", owner, exc_info=task.exception())
