"""When a peer trains: paced by the network and by its privacy budget, not by its CPU.

A private round spends privacy budget, and what it learns is worth something only once it is
shared. So by default a peer takes a private step only while it can form a group (connected,
with at least two other eligible live peers), and no sooner than ``private_round_interval_s``
after its previous private round: the daemon derives that interval from the budget's planned
lifetime (``[pace] budget_hours``), so a budget planned for a day lasts a day rather than the
first seconds. A peer cut off from the broker spends nothing.

Between private rounds, and for good once the budget is spent, a peer whose share mode averages
models keeps taking part in sessions with an *averaging* round: it re-shares its current model,
which is a function of what it already released (its accounted steps and the group sums it
merged), so it costs no epsilon. It never takes another private step on data whose budget is
spent; the trainer's ledger refuses before touching the model. It does retry private training
now and then, because a growing data source may have brought a new block with a fresh budget.

Everything here is a pure decision on the peer's state at one moment; the node's training loop
(peer/network/node.py) acts on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

#: Fewest other eligible peers needed for a session (a group of three: in a group of two,
#: each member could subtract its own update from the sum and read the other's).
MIN_OTHER_PEERS = 2


class RoundKind(Enum):
    """What the training loop should do now."""

    WAIT_FOR_PEERS = "wait_for_peers"  # offline or too few peers: spend nothing
    WAIT = "wait"  # paced: nothing due before ``wait_s``
    PRIVATE = "private"  # a DP round (spends budget)
    AVERAGING = "averaging"  # re-share the current model (free)


@dataclass(frozen=True)
class PacingConfig:
    """How rounds are paced; see the module docstring.

    ``private_round_interval_s``: least time between the starts of two private rounds (0: back
    to back, as the simulation runs). ``averaging_interval_s``: least time between two
    averaging rounds; one is only made once the previous update was shared.
    ``retry_private_s``: how often a peer whose budget is spent checks for new data.
    ``train_only_when_grouped``: False trains even while offline or alone (spends budget for
    nothing; for experiments). ``stranded_tail_s``: group noise, how long a peer whose private
    shares cannot be released any more (too few private-step peers left, enough in the
    averaging tail) waits before it joins the tail (docs/privacy.md, "The averaging tail").
    """

    private_round_interval_s: float = 0.0
    averaging_interval_s: float = 5.0
    retry_private_s: float = 60.0
    train_only_when_grouped: bool = True
    stranded_tail_s: float = 2.0

    def __post_init__(self) -> None:
        for name in ("private_round_interval_s", "averaging_interval_s", "retry_private_s",
                     "stranded_tail_s"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class PacingState:
    """The facts a decision needs, sampled at ``now`` (monotonic seconds)."""

    now: float
    connected: bool
    eligible_peers: int
    update_pending: bool  # an update is offered and not yet shared
    budget_spent: bool
    can_average: bool
    next_private_at: float
    next_averaging_at: float
    #: Group noise: live peers announcing the averaging tail's model id (``eligible_peers``
    #: counts those announcing this peer's own).
    tail_peers: int = 0


@dataclass(frozen=True)
class Decision:
    kind: RoundKind
    wait_s: float = 0.0  # for WAIT / WAIT_FOR_PEERS: how long to wait at most before asking again


def can_form_group(connected: bool, eligible_peers: int) -> bool:
    return connected and eligible_peers >= MIN_OTHER_PEERS


def next_round(state: PacingState, config: PacingConfig) -> Decision:
    """The next thing to do (pure). A waiting loop should also wake on any network event."""
    if config.train_only_when_grouped and not can_form_group(state.connected,
                                                             state.eligible_peers):
        return Decision(RoundKind.WAIT_FOR_PEERS, wait_s=1.0)
    if state.now >= state.next_private_at:
        return Decision(RoundKind.PRIVATE)
    if (state.can_average and not state.update_pending
            and state.now >= state.next_averaging_at):
        return Decision(RoundKind.AVERAGING)
    due = [state.next_private_at]
    if state.can_average and not state.update_pending:
        due.append(state.next_averaging_at)
    # Re-check at least every few seconds: a shared update makes an averaging round due.
    return Decision(RoundKind.WAIT, wait_s=max(0.0, min(min(due) - state.now, 5.0)))


def private_round_interval(budget_hours: float | None, private_rounds: int) -> float:
    """Seconds between private rounds so that ``private_rounds`` span ``budget_hours``.

    None: no pacing (0 s, back to back).
    """
    if budget_hours is None:
        return 0.0
    if not (budget_hours > 0 and math.isfinite(budget_hours)):
        raise ValueError(f"budget_hours must be positive, got {budget_hours!r}")
    if private_rounds < 1:
        raise ValueError(f"private_rounds must be >= 1, got {private_rounds}")
    return budget_hours * 3600.0 / private_rounds


def stranded(state: PacingState, min_sum: int) -> bool:
    """Whether a group-noise peer's private shares can no longer be released (pure): fewer
    than ``min_sum`` - 1 other peers still take private steps, while some peer has reached the
    averaging tail and, counting the private-step peers (stranded alike, they move too), at
    least ``min_sum`` - 1 others can average with it there. Without any tail peer (a network
    still starting) nobody is stranded."""
    need = min_sum - 1
    return state.tail_peers > 0 and state.eligible_peers < need <= (
        state.eligible_peers + state.tail_peers)
