"""Group-noise steps over real sessions (``[training] noise = "group"``).

docs/privacy.md ("Group noise") gives the argument; this joins the trainer to the node for it
(``peer.assembly`` hands a :class:`GroupSteps` to the node, whose training loop and session
seat drive it: the network half never imports the training half). Every private step is one
session:

1. :meth:`GroupSteps.make` (in a worker thread) begins a one-step epoch, which charges the
   ledger on disk first (``LocalTrainer.begin_group_epoch``), and takes its share ``Y_j``: a
   fresh Poisson batch and a fresh G. The contribution carries ``Y_j`` as field elements
   (``group_noise.to_field``, no fixed-point encoding, no clipping) for every coordinate, and
   the member's model, which is a function of earlier releases only.
2. The seat (peer/network/session/seat.py) offers it to one session. A share whose session
   formed (its START was sent or received, so the share may have left) is never offered
   again, whether the session finished or aborted; a step that never left keeps its share.
3. :meth:`GroupSteps.apply` on a finished session: if the release holds at least
   ``min_sum`` = max(3, c + 2, h + c) contributions, the member sets its model to the mean of
   the released models, then steps its optimizer with the released gradient, the decoded
   field sum divided by the contributors' expected batch sizes (each member's configured
   ``batch_size``: public, and equal across a group since it is part of the model id).

4. The averaging tail (docs/privacy.md, "The averaging tail"): once the plan is done, the
   budget spent or the peer stranded, :meth:`GroupSteps.make_tail` offers the current model
   alone (a :class:`TailShare`) to a session of the tail's model id, ``averaging_rounds``
   times, then keeps one ready that only answers others' tail invitations;
   :meth:`GroupSteps.apply` moves to the released mean model and nothing else: no optimizer
   step, no ledger entry.

Security property: the model moves only by released sums (the mean of the members' models,
itself post-processing of earlier releases, and the group's noised gradient sum); nothing
derived from this member's own ``S_j`` is applied, kept or sent outside the share.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from peer.network.session.common import Contribution, GroupResult, group_min_sum
from peer.network.settings import NodeConfig
from peer.training.group_noise import GroupNoise, decode_sum, to_field

log = logging.getLogger(__name__)

__all__ = ["GroupStep", "GroupSteps", "TailShare"]


@dataclass(frozen=True)
class GroupStep:
    """One charged step waiting for its release: the epoch and what it contributes."""

    epoch: Any  # peer.training.group_epoch.GroupEpoch
    contribution: Contribution


@dataclass(frozen=True)
class TailShare:
    """One averaging-tail contribution: this member's model, every coordinate, as plain
    values (no field elements, no noise share, nothing charged)."""

    contribution: Contribution


class GroupSteps:
    """Makes a group-noise peer's steps and applies their releases."""

    def __init__(self, trainer: Any, node: NodeConfig) -> None:
        config = trainer.config
        self.trainer = trainer
        self.min_sum = max(group_min_sum(config.honest_min, node.max_colluders),
                           node.max_colluders + 2, 3)
        self.batch_size = int(config.batch_size)
        self.noise = GroupNoise(honest_min=config.honest_min,
                                max_colluders=node.max_colluders,
                                frac_bits=node.fixed_point.frac_bits,
                                max_grad_norm=config.max_grad_norm, dim=trainer.param_count)
        private_rounds = max(1, config.planned_rounds - config.averaging_rounds)
        #: The plan: private steps this peer takes in all (its rounds of local_steps each).
        self.planned_steps = private_rounds * config.local_steps
        #: Steps charged so far (a restarted peer resumes its count from the ledger).
        self.steps_made = int(getattr(trainer.ledger, "steps", 0) or 0)
        self.applied = 0
        #: The averaging tail: its length in rounds (one tail share each), the tail shares
        #: made, and the tail releases applied.
        self.tail_rounds = int(config.averaging_rounds)
        self.in_tail = False
        self.tail_made = 0
        self.averaged = 0
        self._applying: asyncio.Task[None] | None = None

    @classmethod
    def for_trainer(cls, trainer: Any, node: NodeConfig) -> GroupSteps | None:
        """The steps of a group-noise trainer; None for any other."""
        config = getattr(trainer, "config", None)
        if getattr(config, "noise", "local") != "group":
            return None
        steps = cls(trainer, node)
        log.info("group noise: h = %d, c = %d, sigma_eff %.4g; the epsilon shown holds if at "
                 "most c members of any group collude and the broker is honest but curious "
                 "(docs/privacy.md, \"Group noise\")", config.honest_min, node.max_colluders,
                 config.noise_multiplier)
        return steps

    @property
    def plan_done(self) -> bool:
        return self.steps_made >= self.planned_steps

    @property
    def tail_done(self) -> bool:
        return self.in_tail and self.tail_made >= self.tail_rounds

    @property
    def rounds_done(self) -> int:
        """Rounds so far: whole private rounds, then one per tail share."""
        return self.steps_made // max(1, int(self.trainer.config.local_steps)) + self.tail_made

    def make_tail(self, counted: bool = True) -> TailShare:
        """The next tail share: the model now (a function of earlier releases only).
        ``counted`` False: a share past the tail that only answers others' tail sessions."""
        model = self.trainer.parameter_vector()
        self.tail_made += int(counted)
        contribution = Contribution(indices=np.arange(model.size, dtype=np.uint32),
                                    values=model, round=self.rounds_done)
        return TailShare(contribution)

    def make(self) -> GroupStep:
        """Charge one step (ledger on disk first) and take its share; blocking (a worker
        thread). BudgetExhaustedError, before anything, when the budget cannot afford it."""
        epoch = self.trainer.begin_group_epoch(self.noise, 1)
        self.steps_made += 1
        model = self.trainer.parameter_vector()  # the model the share's gradient is taken at
        share = to_field(epoch.share())
        d = self.noise.dim
        contribution = Contribution(indices=np.arange(d, dtype=np.uint32),
                                    values=np.zeros(d, dtype=np.float32),
                                    round=self.steps_made, field_values=share, model=model)
        return GroupStep(epoch, contribution)

    def gradient(self, result: GroupResult) -> np.ndarray:
        """The released gradient: the decoded field sum over the contributors' batch sizes."""
        assert result.field_sum is not None
        divisor = len(result.contributors) * self.batch_size
        return decode_sum(result.field_sum, self.noise.scale) / divisor

    def apply(self, step: GroupStep | TailShare, result: GroupResult) -> bool:
        """Apply a release; blocking. A private step's: move to the released mean model, then
        step with the released gradient. A tail share's: move to the released mean model only.
        False (nothing applied) for a release below ``min_sum`` or not of the step's kind."""
        if isinstance(step, TailShare):
            return self.apply_tail(result)
        n = len(result.contributors)
        if n < self.min_sum or result.field_sum is None or result.model_sum is None:
            log.error("group release of %d contributions refused (needs %d)", n, self.min_sum)
            return False
        mean = (result.model_sum / n).astype(np.float32)
        own = self.trainer.parameter_vector()
        self.trainer.apply_update(np.arange(own.size, dtype=np.uint32), mean - own)
        step.epoch.apply(self.gradient(result))
        self.applied += 1
        return True

    def apply_tail(self, result: GroupResult) -> bool:
        """Move to the mean of the released models (the plain sum over every coordinate);
        the optimizer and the ledger are not touched."""
        n, d = len(result.contributors), self.noise.dim
        if (n < self.min_sum or result.field_sum is not None
                or result.coordinates.size != d or result.group_sum.shape != (d,)):
            log.error("tail release of %d contributions refused (needs %d, every coordinate "
                      "and no field sum)", n, self.min_sum)
            return False
        mean = (result.group_sum / n).astype(np.float32)
        own = self.trainer.parameter_vector()
        self.trainer.apply_update(np.arange(d, dtype=np.uint32), mean - own)
        self.averaged += 1
        return True

    def release(self, step: GroupStep | TailShare, result: GroupResult) -> None:
        """Apply a finished session's release in a worker thread (the event loop's side)."""
        previous = self._applying

        async def run() -> None:
            if previous is not None:
                await previous
            try:
                await asyncio.to_thread(self.apply, step, result)
            except ValueError as exc:  # a non-finite release: the trainer refuses it
                log.error("group release not applied: %s", exc)

        self._applying = asyncio.get_running_loop().create_task(run())

    async def settled(self) -> None:
        """Wait until every release handed over is applied (the next share sees them)."""
        while self._applying is not None and not self._applying.done():
            await asyncio.shield(self._applying)
