"""One member's lockstep group-noise epoch: S private steps that are all group releases.

:meth:`peer.training.trainer.LocalTrainer.begin_group_epoch` charges the epoch's S steps to the
block's ledger (written to disk) and returns a :class:`GroupEpoch`. Each step then is:

1. :meth:`GroupEpoch.share`: a fresh Poisson batch of the block, the sum of its clipped
   per-example gradients at the current model, and this member's ``Y = R(s S) + R(G)``
   (peer/training/group_noise.py). Nothing else derived from S is kept.
2. the group's secure aggregation rebuilds the sum of at least ``h + c`` members' ``Y``;
3. :meth:`GroupEpoch.apply`: the decoded sum, divided by the contributors' expected batch
   sizes, is the gradient every member's optimizer steps with.

Security property: this member's model changes only by released group sums, and every step
draws a new batch and a new G (docs/privacy.md, "Group noise").
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from peer.training.config import TrainerConfig
from peer.training.dpsgd import DPSGDStep, poisson_batch
from peer.training.group_noise import GroupNoise, member_share
from peer.training.optim import Optimizer

__all__ = ["GroupEpoch", "group_epoch_step"]


def group_epoch_step(config: TrainerConfig, dp_step: DPSGDStep | None, params: GroupNoise,
                     param_count: int) -> DPSGDStep:
    """The trainer's DP step, if an epoch with the group's ``params`` may start on it;
    ValueError if the trainer is not set up for group noise or the parameters are another
    model's."""
    if dp_step is None or config.noise != "group":
        raise ValueError("group epochs need dp = true and noise = 'group'")
    if params.dim != param_count or params.max_grad_norm != config.max_grad_norm:
        raise ValueError("group-noise parameters do not match this model")
    if dp_step.adaptive is not None:  # validate() refuses it; never a moving C here
        raise ValueError("adaptive clipping is refused with group noise")
    return dp_step


@dataclass
class GroupEpoch:
    """The remaining steps of one epoch; made by the trainer, used by one caller at a time."""

    params: GroupNoise
    steps: int  #: steps charged to the ledger for this epoch
    sigma_eff: float  #: what the ledger records per step
    x: torch.Tensor  #: the block's inputs of the trainable part
    y: torch.Tensor
    sample_rate: float
    dp_step: DPSGDStep
    model_params: list[nn.Parameter]
    optimizer: Optimizer
    lock: threading.Lock
    sampling: torch.Generator | None = None
    done: int = field(default=0)

    @property
    def expected_batch(self) -> float:
        """This member's expected batch size q n: public, part of the step's divisor."""
        return self.sample_rate * len(self.y)

    def share(self) -> np.ndarray:
        """This step's ``Y`` (int64, one per trainable parameter) from a fresh batch."""
        if self.done >= self.steps:
            raise ValueError(f"the epoch's {self.steps} charged steps are used up")
        self.done += 1  # a share made is a step taken, whether or not its release happens
        # noise_scale is 1 except in an audit's weakened run (dpsgd.AuditHook).
        sigma = self.params.sigma_for_effective(self.sigma_eff) * self.dp_step.noise_scale
        with self.lock:
            batch = poisson_batch(len(self.y), self.sample_rate, self.sampling)
            # The step's C is the group's: begin_group_epoch checked they are equal.
            clipped = self.dp_step.clipped_sum(self.x[batch].float(), self.y[batch])
            return member_share(clipped, sigma, self.params, self.dp_step.noise)

    def apply(self, gradient: np.ndarray) -> None:
        """Step the optimizer with the released gradient (the decoded group sum divided by the
        contributors' expected batch sizes)."""
        flat = torch.as_tensor(np.asarray(gradient, dtype=np.float32)).reshape(-1)
        if flat.numel() != self.params.dim or not bool(torch.isfinite(flat).all()):
            raise ValueError("a released gradient must be finite, one value per parameter")
        with self.lock:
            offset = 0
            for p in self.model_params:
                p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            self.optimizer.step()
