"""Network faults for the simulation: message delay and loss on a peer's send path, and churn.

Delay and loss are injected by wrapping one peer's outgoing publish call
(``peer.network.transport.publish``) with an instance-level wrapper, so that the peer code itself is
untouched and every message a simulated peer sends - announcements, invitations, shares,
partial sums - goes through the same faulty path. A lost message is simply never handed to the
broker; the sender believes it was sent, as with a lossy radio link. The receiving side needs no
hook: loss and delay on the sender's side are, for a receiver, indistinguishable from a
lossy/slow network.

Churn is a Poisson process per peer: a peer leaves (a clean stop: leave message, checkpoint)
at rate ``churn_rate`` per minute and rejoins ``churn_downtime_s`` later as a new process or
object that resumes from its checkpoint, with the same identity and certificate.

Randomness: the fault decisions use ``random.Random(seed)`` so a scenario's fault pattern is
repeatable. This generator never touches keys, nonces, shares or DP noise (those use the OS
CSPRNG in crypto/ and peer/training/privacy/).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sim.scenario import Scenario

log = logging.getLogger(__name__)

PublishCall = Callable[..., Awaitable[None]]


@dataclass
class FaultStats:
    """What the fault layer did to one peer's outgoing messages (for logs and the report)."""

    delayed: int = 0
    lost: int = 0
    passed: int = 0


def install_send_faults(
    transport: Any,
    *,
    delay_ms: float,
    loss_rate: float,
    rng: random.Random,
    stats: FaultStats | None = None,
) -> FaultStats:
    """Wrap ``transport.publish`` so each outgoing message is delayed and/or dropped.

    ``delay_ms`` is the mean added latency; each message waits uniformly between 0.5x and 1.5x
    of it (a fixed delay would keep messages in lock-step, which real links do not). A message
    is dropped with probability ``loss_rate``. Returns the (possibly shared) counters. Does
    nothing to the transport when both faults are off.
    """
    stats = stats if stats is not None else FaultStats()
    if delay_ms <= 0 and loss_rate <= 0:
        return stats
    original: PublishCall = transport.publish

    async def faulty_publish(topic: str, payload: bytes, *, retain: bool = False) -> None:
        if loss_rate > 0 and rng.random() < loss_rate:
            stats.lost += 1
            return
        if delay_ms > 0:
            stats.delayed += 1
            await asyncio.sleep(delay_ms * rng.uniform(0.5, 1.5) / 1000.0)
        stats.passed += 1
        await original(topic, payload, retain=retain)

    # Instance attribute shadows the bound method: only this peer's transport is affected.
    transport.publish = faulty_publish
    return stats


@dataclass(frozen=True)
class ChurnEvent:
    """Peer ``peer_index`` leaves at ``leave_at_s`` (seconds from start) and rejoins after
    ``downtime_s``."""

    peer_index: int
    leave_at_s: float
    downtime_s: float


def churn_schedule(
    *,
    peers: int,
    churn_rate_per_min: float,
    downtime_s: float,
    horizon_s: float,
    seed: int,
    first_leave_after_s: float = 5.0,
) -> list[ChurnEvent]:
    """A repeatable churn plan: per peer, leave times of a Poisson process of the given rate.

    A peer that is down does not leave again: the next leave is drawn after it rejoined.
    ``first_leave_after_s`` keeps the start-up (connect, announce) out of the fault window.
    Events are sorted by time.
    """
    if churn_rate_per_min <= 0 or peers <= 0:
        return []
    rng = random.Random(seed ^ 0x5EED_C4A2)
    rate_per_s = churn_rate_per_min / 60.0
    events: list[ChurnEvent] = []
    for index in range(peers):
        t = first_leave_after_s
        while True:
            t += rng.expovariate(rate_per_s)
            if t >= horizon_s:
                break
            events.append(ChurnEvent(index, t, downtime_s))
            t += downtime_s
    events.sort(key=lambda e: (e.leave_at_s, e.peer_index))
    return events


def scenario_churn(s: Scenario) -> list[ChurnEvent]:
    """The churn plan of a scenario over its whole duration."""
    return churn_schedule(peers=s.peers, churn_rate_per_min=s.churn_rate,
                          downtime_s=s.churn_downtime_s, horizon_s=s.duration_s, seed=s.seed)


class ChurnDriver:
    """Plays a churn plan: at each event's time (from ``started``, a monotonic clock reading)
    it starts ``cycle(event)`` as a task; a cycle returns True when the peer left and rejoined.

    Both engines use it; only what a leave and a rejoin are differs (a task or a process).
    """

    def __init__(self, schedule: list[ChurnEvent], started: float,
                 cycle: Callable[[ChurnEvent], Awaitable[bool]]) -> None:
        self.schedule = schedule
        self.started = started
        self.cycle = cycle
        self.tasks: list[asyncio.Task[bool]] = []
        self._driver: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._driver = asyncio.create_task(self._drive())

    async def _drive(self) -> None:
        for event in self.schedule:
            delay = self.started + event.leave_at_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.tasks.append(asyncio.create_task(self.cycle(event)))

    async def stop(self) -> None:
        """Cancel the plan and the cycles in progress and wait for them; a failed one is
        logged."""
        tasks: list[asyncio.Task[Any]] = [*([self._driver] if self._driver else []),
                                          *self.tasks]
        for task in tasks:
            task.cancel()
        for outcome in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(outcome, BaseException) and not isinstance(outcome,
                                                                     asyncio.CancelledError):
                log.error("background task failed: %r", outcome)

    def completed(self) -> int:
        """How many leave/rejoin cycles completed."""
        return sum(1 for t in self.tasks
                   if t.done() and not t.cancelled() and t.exception() is None and t.result())
