"""What a :class:`~peer.training.trainer.LocalTrainer` shows of itself, and nothing it does.

:class:`TrainerReadouts` is the trainer's read-only side: the round counter, the privacy
figures of its blocks (epsilon, budget, sigma, sampling rate, adaptive C), the DP engine, the
model lock and its queue of merges, the optimizer's stored state, the parts of the model that
train, the record data held and where its state lives. It holds no state of its own: every
property reads the trainer's attributes declared below, and none of them changes anything,
so the status line, the node's pacing and the tests can read a trainer at any time.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peer.sharing import SharingStrategy
from peer.training import held_data
from peer.training.block_schedule import BlockSchedule
from peer.training.blocks import BlockStatus
from peer.training.config import TrainerConfig
from peer.training.dpsgd import DPSGDStep, GhostClipEngine
from peer.training.ledger import PrivacyLedger
from peer.training.optim import Optimizer
from peer.training.params import FlatParams
from peer.training.state_files import StateFiles

__all__ = ["TrainerReadouts"]


class TrainerReadouts:
    """The read-only properties of a trainer (a mixin of :class:`LocalTrainer` only)."""

    config: TrainerConfig
    sharing: SharingStrategy
    _blocks: BlockSchedule
    _dp_step: DPSGDStep | None
    _files: StateFiles | None
    _frozen: torch.nn.Module | None
    _trainable: torch.nn.Module
    _holdout: held_data.EvalSet
    _noise_replaced: bool
    _optimizer: Optimizer
    _params: FlatParams
    _round: int

    # ----------------------------------------------------------------------- privacy
    @property
    def round(self) -> int:
        """Rounds since the trainer was created (private and averaging, every block)."""
        return self._round

    @property
    def engine(self) -> str:
        """The per-example engine private steps run on: "ghost" (the fast one), "vmap" (the
        general one, torch.func) or "none" (dp off)."""
        if self._dp_step is None:
            return "none"
        return "ghost" if isinstance(self._dp_step.engine, GhostClipEngine) else "vmap"

    @property
    def ledger(self) -> PrivacyLedger | None:
        """The worst block's ledger (without a source: the static set's, the only one)."""
        return max((e.ledger for e in self._blocks.ledgers), key=lambda led: led.epsilon,
                   default=None)

    @property
    def epsilon(self) -> float | None:
        """The worst record's epsilon: the largest of any block's (None when dp is off; inf
        when a ``noise`` source passed to the constructor voids the ledger's figure)."""
        return self._shown_epsilon() if self.config.dp else None

    def _shown_epsilon(self) -> float:
        return math.inf if self._noise_replaced else self._blocks.ledgers.epsilon

    @property
    def budget_epsilon(self) -> float | None:
        """Every block's budget (budget_epsilon, else the DP target; None: unlimited)."""
        return self._blocks.budget

    @property
    def sigma(self) -> float:
        """Noise multiplier of the last trained block (before any round: the static set)."""
        return self._blocks.current.ledger.sigma if self._blocks.current else 0.0

    @property
    def clip_norm(self) -> float | None:
        """Adaptive clipping's current C_t, the norm the next private step clips to (None when
        C is fixed at ``max_grad_norm`` or dp is off)."""
        step = self._dp_step
        return None if step is None or step.adaptive is None else step.clip_norm

    @property
    def sample_rate(self) -> float:
        return self._blocks.current.ledger.sample_rate if self._blocks.current else 0.0

    def _in_averaging_tail(self) -> bool:
        """Whether the plan's private rounds are done and only averaging is left.

        The tail has no end: a peer that finished its plan keeps re-sharing its model (free,
        post-processing) while slower neighbours finish theirs, instead of running into its
        budget and dropping out of the averaging its neighbours still need.
        """
        cfg = self.config
        first = cfg.planned_rounds - cfg.averaging_rounds
        return cfg.averaging_rounds > 0 and self._round >= first

    def blocks_status(self) -> list[BlockStatus]:
        """Every block's records, epsilon, steps and whether (and why) it retired."""
        return self._blocks.status()

    # ----------------------------------------------------------------------- sharing, files
    @property
    def can_average(self) -> bool:
        """Whether :meth:`averaging_round` is possible (the strategy averages models)."""
        return self.sharing.needs_common_init

    @property
    def residual(self) -> np.ndarray:
        """What the sharing strategy keeps between rounds (a copy)."""
        return self.sharing.state

    @property
    def ledger_path(self) -> Path | None:
        return None if self._files is None else self._files.ledger

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self._files is None else self._files.checkpoint

    # ----------------------------------------------------------------------- model
    @property
    def model_lock(self) -> threading.Lock:
        """The lock a round holds while it steps the model (evaluation and checkpointing
        too). A merge never waits for it: while it is held, merges queue."""
        return self._params.lock

    @property
    def pending_merges(self) -> int:
        """Merges queued behind whoever holds :attr:`model_lock`, not yet in the model."""
        return self._params.pending

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer's state as the checkpoint stores it (its kind and buffers)."""
        return self._optimizer.state_dict()

    @property
    def frozen_prefix(self) -> torch.nn.Module | None:
        """The model's frozen, parameter-free feature prefix (None for mlp and cnn)."""
        return self._frozen

    @property
    def trainable(self) -> torch.nn.Module:
        """What trains and is evaluated: the rest after the frozen prefix, else the model."""
        return self._trainable

    @property
    def static_inputs(self) -> torch.Tensor | None:
        """The trainable part's inputs of the static set (features, with a frozen prefix),
        computed once at construction; None when the static set has no records."""
        return self._blocks.static_inputs

    @property
    def data_held(self) -> held_data.HeldData:
        """Bytes of record data held (static set, hold-out, loaded block); with a frozen
        prefix only features and labels, never the raw records (held_data.HeldData)."""
        x, y = self._blocks.held_tensors()
        return held_data.count_held([*x, self._holdout.x], [*y, self._holdout.y],
                                    featurised=self._frozen is not None)
