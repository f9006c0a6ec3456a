"""The node's training loop: rounds paced by peer/network/pacing.py, run in a worker thread.

* A private round (``trainer.train_round``) runs only when the pacing says so: the peer can
  form a group and the budget's schedule has a round due. ``BudgetExhaustedError`` (raised by
  the trainer before it touches the model) switches the peer to averaging rounds when its
  share mode averages models, else to serving only; it retries private training now and then,
  because a growing data source may bring a new block with a fresh budget.
* An averaging round (``trainer.averaging_round``) re-shares the current model: no private step,
  no epsilon (docs/privacy.md, "After the budget").
* A training bug never takes the peer off the network: it logs, emits ``training_failed`` and
  keeps serving sessions for others.

:class:`TrainingGauges` holds what the status line shows about training; the node reads it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from peer.errors import BudgetExhaustedError
from peer.network.pacing import PacingConfig, PacingState, RoundKind, next_round, stranded
from peer.waiting import wait_event

log = logging.getLogger(__name__)

#: Fractions of the budget at which a "budget_milestone" event is emitted.
BUDGET_MILESTONES = (0.25, 0.5, 0.75)


def optional_float(value: object) -> float | None:
    """``value`` as a float, None when it is None or not a number."""
    if value is None:
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


@dataclass
class TrainingGauges:
    """What the peer knows about its own training now (read by ``Peer.status``).

    ``epsilon`` and ``budget_epsilon`` come from the trainer's ledger from the start, so a
    restarted peer shows what it has spent before its first new round.
    """

    dp: bool = True
    epsilon: float | None = None
    budget_epsilon: float | None = None
    accuracy: float | None = None
    budget_exhausted: bool = False
    training_now: bool = False
    training_error: str | None = None
    milestones_passed: set[float] = field(default_factory=set)

    @classmethod
    def of(cls, trainer: Any) -> TrainingGauges:
        gauges = cls(
            dp=bool(getattr(getattr(trainer, "config", None), "dp", True)),
            epsilon=optional_float(getattr(trainer, "epsilon", None)),
            budget_epsilon=optional_float(getattr(trainer, "budget_epsilon", None)),
        )
        gauges.milestones_passed = gauges.milestones_reached()  # passed before this run
        return gauges

    def milestones_reached(self) -> set[float]:
        eps, budget = self.epsilon, self.budget_epsilon
        if eps is None or budget is None or not self.dp:
            return set()
        return {f for f in BUDGET_MILESTONES if eps >= f * budget}

    def new_milestones(self) -> list[float]:
        """Milestones reached since the last call (each one reported once)."""
        fresh = sorted(self.milestones_reached() - self.milestones_passed)
        self.milestones_passed.update(fresh)
        return fresh


class RoundHost(Protocol):
    """What the loop needs from the node (peer.network.node.Peer)."""

    peer_id: str
    trainer: Any
    gauges: TrainingGauges

    @property
    def stopping(self) -> bool: ...
    def pacing_state(self, now: float, next_private_at: float,
                     next_averaging_at: float) -> PacingState: ...
    def round_done(self, update: Any) -> None: ...  # count it and offer it to sessions
    def offer_group_step(self, step: Any, rounds: int,
                         initiate: bool = True) -> None: ...  # group noise: a share
    def enter_averaging_tail(self) -> bool: ...  # group noise: the tail's model id from now
    @property
    def group_steps(self) -> Any: ...  # peer.group_steps.GroupSteps, or None (local noise)
    def withdraw_update(self) -> None: ...  # nothing fresh to contribute any more
    def emit(self, kind: str, **data: Any) -> None: ...


class RoundLoop:
    """Runs the host's rounds until it stops; see the module docstring."""

    def __init__(self, host: RoundHost, pacing: PacingConfig, wake: asyncio.Event, *,
                 round_pause_s: float, evaluate_every: int) -> None:
        self.host = host
        self.pacing = pacing
        self.wake = wake  # set by the node when a session ends or the link changes
        self.round_pause_s = round_pause_s
        self.evaluate_every = evaluate_every
        self.rounds_run = 0

    @property
    def can_average(self) -> bool:
        return bool(getattr(self.host.trainer, "can_average", False))

    async def run(self) -> None:
        if self.host.group_steps is not None:
            await self._run_group_steps()
            return
        host, pacing = self.host, self.pacing
        next_private_at = next_averaging_at = 0.0
        while not host.stopping:
            now = time.monotonic()
            decision = next_round(host.pacing_state(now, next_private_at, next_averaging_at),
                                  pacing)
            if decision.kind in (RoundKind.WAIT, RoundKind.WAIT_FOR_PEERS):
                self.wake.clear()
                await wait_event(self.wake, max(0.05, decision.wait_s))
                continue
            if decision.kind is RoundKind.PRIVATE:
                retry = pacing.retry_private_s if host.gauges.budget_exhausted else 0.0
                next_private_at = now + max(pacing.private_round_interval_s, retry)
                update = await self._private_round()
            else:
                next_averaging_at = now + pacing.averaging_interval_s
                update = await self._in_thread(host.trainer.averaging_round)
            if update is False:
                return  # training failed: serve only
            if update is not None:
                await self._after_round(update)
                await asyncio.sleep(self.round_pause_s)

    async def _run_group_steps(self) -> None:
        """Group noise: keep at most one share ready, each a new one-step epoch (a new batch
        and a new G, charged to the ledger first); the seat offers it to one session and the
        release moves the model (peer/group_steps.py). Never a local round. Then the averaging
        tail (docs/privacy.md, "The averaging tail"): once the plan is done, the budget spent
        or the peer stranded, it switches to the tail's model id and offers its model alone,
        one share per tail round, ``averaging_rounds`` times; then it only answers others' tail
        invitations with its model."""
        host, gauges, steps = self.host, self.host.gauges, self.host.group_steps
        per_round = max(1, int(steps.trainer.config.local_steps))
        interval = self.pacing.private_round_interval_s / per_round
        next_at = 0.0
        stranded_since: float | None = None
        while not host.stopping:
            now = time.monotonic()
            state = host.pacing_state(now, next_at, math.inf)  # a share waits: update_pending
            stranded_since = (stranded_since or now) if stranded(state, steps.min_sum) else None
            if (stranded_since is not None and not steps.in_tail and steps.tail_rounds > 0
                    and now - stranded_since >= self.pacing.stranded_tail_s):
                self._enter_tail("too few private-step peers left to release a share")
                if steps.in_tail:
                    continue  # the shared state changed: sample it again
            answering = steps.tail_done  # its own tail is done: it answers others' only
            if answering and not gauges.budget_exhausted:
                self._tail_done()
            decision = next_round(state, self.pacing)
            if ((gauges.budget_exhausted and not answering) or state.update_pending
                    or decision.kind is not RoundKind.PRIVATE):
                self.wake.clear()
                await wait_event(self.wake, max(0.05, min(decision.wait_s or 1.0, 1.0)))
                continue
            await steps.settled()  # a share is taken at the model after every release
            if steps.in_tail:
                next_at = now + interval * per_round  # a tail round is one share
                share = await self._in_thread(functools.partial(steps.make_tail, not answering))
            else:
                next_at = now + interval
                share = await self._group_share()
            if share is False:
                return
            if share is None:  # now in the tail or serving only; or a session still in flight
                self.wake.clear()
                await wait_event(self.wake, 0.2)
                continue
            gauges.epsilon = optional_float(getattr(host.trainer, "epsilon", None))
            host.offer_group_step(share, steps.rounds_done, initiate=not answering)
            if not answering and (steps.in_tail or steps.steps_made % per_round == 0):
                await self._group_round_done(steps.rounds_done, 0 if steps.in_tail else per_round)

    async def _group_share(self) -> Any:
        """The next private share; None when the budget or the plan is spent (the peer moves
        to the averaging tail), False when training failed."""
        gauges, steps = self.host.gauges, self.host.group_steps
        if steps.plan_done:
            self._enter_tail("the planned private steps are done")
            return None
        try:
            gauges.training_now = True
            return await asyncio.to_thread(steps.make)
        except BudgetExhaustedError as exc:
            self._enter_tail(str(exc))
            return None
        except Exception as exc:
            return self._failed(exc)
        finally:
            gauges.training_now = False

    def _enter_tail(self, why: str) -> None:
        """No more private steps: join the averaging tail (none configured: serve only). While
        a session is in flight nothing changes; the loop asks again."""
        host, steps = self.host, self.host.group_steps
        if steps.in_tail:
            return
        if steps.tail_rounds < 1:
            self._spent(why)
        elif host.enter_averaging_tail():
            steps.in_tail = True
            log.info("%s: %s; averaging tail of %d rounds, no more private steps",
                     host.peer_id, why, steps.tail_rounds)

    def _tail_done(self) -> None:
        """The peer's own tail is done: it starts no session any more and answers others' tail
        invitations with its model (free); shown as a spent budget, its plan being over."""
        gauges = self.host.gauges
        gauges.budget_exhausted = True
        log.info("%s: averaging tail done; answering others' tail sessions only",
                 self.host.peer_id)
        self.host.emit("budget_exhausted", epsilon=gauges.epsilon)

    def _spent(self, why: str) -> None:
        """No more shares of any kind: the peer serves others' sessions only."""
        host, gauges = self.host, self.host.gauges
        if gauges.budget_exhausted:
            return
        gauges.budget_exhausted = True
        host.withdraw_update()
        log.warning("%s: no more group-noise shares (%s); serving only", host.peer_id, why)
        host.emit("budget_exhausted", epsilon=gauges.epsilon)

    async def _group_round_done(self, rounds: int, steps: int) -> None:
        """Every ``local_steps`` private shares, and every tail share (``steps`` 0): the round
        event and, now and then, an evaluation."""
        host, gauges = self.host, self.host.gauges
        await host.group_steps.settled()
        if self.evaluate_every and rounds % self.evaluate_every == 0:
            accuracy = float(await asyncio.to_thread(host.trainer.evaluate))
            gauges.accuracy = accuracy if math.isfinite(accuracy) else None
        host.emit("round", round=rounds, epsilon=gauges.epsilon, accuracy=gauges.accuracy,
                  steps=steps)
        for fraction in gauges.new_milestones():
            host.emit("budget_milestone", fraction=fraction, epsilon=gauges.epsilon,
                      budget_epsilon=gauges.budget_epsilon)

    async def _private_round(self) -> Any:
        """One private round; None when the budget is spent, False when training failed."""
        host, gauges = self.host, self.host.gauges
        try:
            gauges.training_now = True
            update = await asyncio.to_thread(host.trainer.train_round)
        except BudgetExhaustedError as exc:
            if not gauges.budget_exhausted:
                gauges.budget_exhausted = True
                if not self.can_average:
                    host.withdraw_update()
                log.warning("%s: privacy budget spent; %s from now on: %s", host.peer_id,
                            "averaging only" if self.can_average else "serving only", exc)
                host.emit("budget_exhausted", epsilon=gauges.epsilon)
            return None
        except Exception as exc:
            return self._failed(exc)
        finally:
            gauges.training_now = False
        if gauges.budget_exhausted and int(update.steps) > 0:
            log.info("%s: new data with a fresh budget: private training resumes",
                     host.peer_id)
            gauges.budget_exhausted = False
        return update

    async def _in_thread(self, fn: Callable[[], Any]) -> Any:
        try:
            return await asyncio.to_thread(fn)
        except Exception as exc:
            return self._failed(exc)

    def _failed(self, exc: Exception) -> bool:
        # A training bug must not take the peer off the network: it keeps serving sessions
        # for others (it declines invites: it has nothing fresh to add).
        self.host.gauges.training_error = repr(exc)
        self.host.withdraw_update()
        log.error("%s: training failed; serving only from now on", self.host.peer_id,
                  exc_info=exc)
        self.host.emit("training_failed", error=repr(exc))
        return False

    async def _after_round(self, update: Any) -> None:
        host, gauges = self.host, self.host.gauges
        self.rounds_run += 1
        gauges.epsilon = optional_float(getattr(host.trainer, "epsilon", update.epsilon))
        host.round_done(update)
        if self.evaluate_every and self.rounds_run % self.evaluate_every == 0:
            accuracy = float(await asyncio.to_thread(host.trainer.evaluate))
            gauges.accuracy = accuracy if math.isfinite(accuracy) else None  # NaN: no hold-out
        host.emit("round", round=int(update.round), epsilon=gauges.epsilon,
                  accuracy=gauges.accuracy, steps=int(update.steps))
        for fraction in gauges.new_milestones():
            host.emit("budget_milestone", fraction=fraction, epsilon=gauges.epsilon,
                      budget_epsilon=gauges.budget_epsilon)
