"""The local trainer: a peer's private half (DP-SGD, ledger, top-k, checkpoints). No network.

Security properties:

* Every private step clips each example's gradient to ``max_grad_norm`` and adds Gaussian
  noise from the secure source; batches are Poisson-sampled with secure randomness. That is
  exactly the mechanism the RDP accountant analyses, so the ledger's epsilon is a record-level
  (epsilon, delta)-DP guarantee for this peer's training data over everything it shares.
* The ledger is checked *before* a round (a round that would exceed the budget never starts)
  and persisted atomically *before* ``train_round`` returns the update; the update, the
  top-k selection and the residual are post-processing of DP outputs.
* The model, optimizer, residual, ledger and round counter are checkpointed atomically; a
  restart resumes them, and the ledger on disk is never replaced by an older one.

Threading: one trainer may be driven from a worker thread (``asyncio.to_thread``) while the
event loop calls :meth:`LocalTrainer.apply_update`; the model lock (:attr:`model_lock`,
peer/training/params.py) serialises access to the model, and merges that arrive mid-round are
queued and applied between steps (and excluded from the round's own update). The trainer
holds no global state; ``torch.set_num_threads`` is process-wide, so it is left to the
caller (see :func:`configure_torch_threads`).

Data that keeps coming: with a ``source`` (blocks.py) the records form disjoint blocks, each
with its own ledger; a round trains on one (block_schedule.py), ``epsilon`` is the worst
block's. Without one the static training set is the only block, and nothing changes.

Frozen features: a model with a frozen, parameter-free prefix (``split_frozen``; "scatter")
has its training and hold-out data featurised once at construction through the process-wide
cache of :mod:`peer.training.features`, and trains, DP-steps and evaluates only the trainable
rest on those features. The prefix acts on each example alone and never changes, so the
per-example gradients, the clipping and the privacy analysis are exactly those of the whole
model; ``self.model`` (its state_dict, flat parameters, model id) is unchanged. The trainer
keeps no reference to the raw records once featurised (held_data.py; :attr:`data_held`).

Size: at about 500 lines this module is past the project's 450-line guide, on purpose:
``LocalTrainer`` is the one owner of the model, its lock, optimizer, blocks and ledger, and its
three kinds of step (a local round, an averaging round, a group epoch's start) share that
state; the step bodies live in dpsgd.py, block_schedule.py and group_epoch.py (adaptive
clipping in adaptive_clip.py).
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from peer.sharing import SharingStrategy, build_strategy
from peer.training import held_data
from peer.training.adaptive_clip import AdaptiveClip, adaptive_clipping_on
from peer.training.block_ledger import BlockLedgers, newest_ledgers
from peer.training.block_schedule import ActiveBlock, BlockSchedule
from peer.training.blocks import BlockSource, BlockStatus, open_block_source
from peer.training.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from peer.training.config import TrainerConfig
from peer.training.data import Dataset
from peer.training.dpsgd import AuditHook, DPSGDStep, GhostClipEngine, poisson_batch
from peer.training.group_epoch import GroupEpoch
from peer.training.group_noise import GroupNoise
from peer.training.ledger import BudgetExhaustedError, LedgerError, PrivacyLedger
from peer.training.models import (
    build_model,
    configure_torch_threads,
    model_base_id,
    param_count,
    seeded_init,
    split_frozen,
    training_engine,
)
from peer.training.optim import build_optimizer
from peer.training.params import FlatParams
from peer.training.privacy.noise import GaussianSource, SecureGaussian, choose_noise
from peer.training.privacy.table import epsilon_source

__all__ = [
    "BlockSource",
    "BlockStatus",
    "BudgetExhaustedError",
    "LocalTrainer",
    "LocalUpdate",
    "TrainerConfig",
    "configure_torch_threads",
    "open_block_source",
]

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.json"

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class LocalUpdate:
    """One round's sparse update: what may leave the peer (post-processing of DP outputs)."""

    indices: np.ndarray  # uint32, sorted, unique
    values: np.ndarray  # float32, same length
    steps: int  # private steps in this round
    epsilon: float  # the worst block's epsilon after this round (inf when dp is off)
    round: int  # 1-based round number
    block: int | None = None  # the block this round trained on (None: averaging round)


class LocalTrainer:
    """Trains one peer's model privately; see the module docstring for the guarantees."""

    def __init__(
        self,
        config: TrainerConfig,
        train: Dataset,
        holdout: Dataset,
        state_dir: Path | None = None,
        source: BlockSource | None = None,
        noise: GaussianSource | None = None,
        *,
        audit: AuditHook | None = None,
    ) -> None:
        """``train``: the static records (block 0). With a ``source`` it may be record-less
        (``blocks.template_dataset``): it then only gives the input shape and class count.
        ``noise``: the DP steps' N(0, 1) source; None (every peer) uses the configured one.
        Tests and audits only: another source voids the ledger's epsilon, so :attr:`epsilon`
        reports inf (a zero source makes a noise-free twin; at q = 1 its update differs from a
        normal trainer's by exactly the noise).
        ``audit``: audit only (sim/audit.py; dpsgd.AuditHook): canaries added to every private
        step's clipped sum; one that weakens the noise voids the epsilon likewise."""
        config.validate()
        if len(train) == 0 and source is None:
            raise ValueError("training set is empty")
        self.config = config
        self.model = build_model(config.model, train.input_shape, train.num_classes)
        seeded_init(self.model, config.seed)
        #: Frozen feature prefix (None for mlp/cnn) and the trainable rest (the whole model
        #: when there is no prefix); they share the model's modules.
        self._frozen, self._trainable = split_frozen(self.model)
        #: Raw records -> the trainable part's inputs (frozen features if any).
        self._inputs = partial(held_data.trainable_inputs, self._frozen,
                               getattr(torch, config.feature_dtype))
        self.param_count = param_count(self.model)
        # The flat vector, x0 (same seed on every peer), the model lock and queued merges.
        self._params = FlatParams([p for p in self.model.parameters() if p.requires_grad])
        #: What a round shares, the residual fill and the merge rule (peer.sharing).
        self.sharing: SharingStrategy = build_strategy(
            config.share, config.topk_fraction, self.param_count,
            config.averaging_topk_fraction)
        # Peers only group with the same model id, so a network never mixes share modes
        # (a displacement averaged with deltas would be meaningless).
        self.model_id = self.sharing.model_id(model_base_id(config.model, self.model),
                                              self._params.initial_digest())
        if config.noise == "group":  # one sigma, C and h per group (docs/privacy.md)
            self.model_id += (f"-group-h{config.honest_min}-s{config.noise_multiplier:.6g}"
                              f"-C{config.max_grad_norm:g}-b{config.batch_size}")
        # The hold-out as inputs: features (raw records not kept), else a view of the records.
        self._holdout = held_data.EvalSet(self._inputs(holdout.x), torch.from_numpy(holdout.y))
        if source is not None:
            source.bind(train.input_shape, train.num_classes)
        self.source = source
        # The blocks, their ledgers and DP settings; the trainable part's inputs of the
        # static set are computed once here (features, for a frozen prefix).
        self._blocks = BlockSchedule(config, train, source, self._inputs,
                                     epsilon_source(config.epsilon_table, state_dir))
        # peer.training.optim, not torch.optim: constructing a torch.optim optimizer imports
        # torch._dynamo (+70 MB resident), too much for a 1 GB Raspberry Pi.
        self._optimizer = build_optimizer(config.optimizer, self._params.params, lr=config.lr,
                                          momentum=config.momentum)
        self._round = 0
        # Insecure mode seeds batch sampling too (experiments only: NOT private).
        self._sampling: torch.Generator | None = (
            torch.Generator().manual_seed(config.seed) if config.insecure_fast_noise else None)
        #: The DP engine setting: a user model's is the one exact for it (user_model.py).
        self._engine = training_engine(config.model, self._trainable, train.input_shape,
                                       config.engine)
        self._dp_step = self._make_dp_step(noise, audit) if config.dp else None
        #: A caller's noise source or weakened noise: the ledger's epsilon no longer describes
        #: the steps.
        self._noise_replaced = ((noise is not None and type(noise) is not SecureGaussian)
                                or (audit is not None and audit.noise_scale != 1.0))
        self.state_dir = Path(state_dir) if state_dir is not None else None
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._resume()
        if self.sharing.needs_common_init:
            # The fill lends the displacement as of the last round: after a restart, now.
            self.sharing.reshare(self._params.displacement())
        log.info("trainer %s: %d static records, %d blocks, q=%.4f, sigma=%.3f, C=%.2f, epsilon "
                 "spent %.3f, engine %s", self.model_id, len(train), len(self._blocks.ledgers),
                 self.sample_rate, self.sigma, self.clip_norm or config.max_grad_norm,
                 self._blocks.ledgers.epsilon, self.engine)

    # ----------------------------------------------------------------------- set-up
    def _make_dp_step(self, noise: GaussianSource | None,
                      audit: AuditHook | None) -> DPSGDStep:
        cfg = self.config
        # One step object for every block, retuned each round (DPSGDStep.retune).
        return DPSGDStep.build(self._trainable, noise_multiplier=self.sigma,
                               max_grad_norm=cfg.max_grad_norm,
                               expected_batch_size=float(cfg.batch_size),
                               noise=choose_noise(noise, cfg.insecure_fast_noise, cfg.seed),
                               engine=self._engine, audit=audit,
                               adaptive=(AdaptiveClip.from_config(cfg)
                                         if adaptive_clipping_on(cfg) else None))

    @property
    def ledger_path(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / LEDGER_FILE

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / CHECKPOINT_FILE

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

    @property
    def can_average(self) -> bool:
        """Whether :meth:`averaging_round` is possible (the strategy averages models)."""
        return self.sharing.needs_common_init

    def blocks_status(self) -> list[BlockStatus]:
        """Every block's records, epsilon, steps and whether (and why) it retired."""
        return self._blocks.status()

    @property
    def residual(self) -> np.ndarray:
        """What the sharing strategy keeps between rounds (a copy)."""
        return self.sharing.state

    def _resume(self) -> None:
        assert self.ledger_path is not None and self.checkpoint_path is not None
        stored: BlockLedgers | None = None
        static_records = self._blocks.static_records
        if self.checkpoint_path.exists():
            state = load_checkpoint(self.checkpoint_path)
            if state.model_id != self.model_id:
                raise LedgerError(
                    f"{self.checkpoint_path}: checkpoint is for {state.model_id}, "
                    f"config builds {self.model_id}"
                )
            self.model.load_state_dict(state.model_state)
            self._optimizer.load_state_dict(state.optimizer_state)
            try:
                self.sharing.restore(state.residual)
            except ValueError:
                raise LedgerError(
                    f"{self.checkpoint_path}: residual has the wrong length") from None
            self._round = state.round
            if state.clip_norm is not None and self._dp_step is not None \
                    and self._dp_step.adaptive is not None:  # adaptive C continues
                self._dp_step.adaptive.clip_norm = state.clip_norm
            stored = BlockLedgers.from_json(state.ledger_json, str(self.checkpoint_path),
                                            static_records)
        stored = newest_ledgers(self.ledger_path, stored, static_records, self.checkpoint_path)
        if stored is None:
            return
        self._blocks.adopt(stored, str(self.state_dir))  # delta, settings, budget, accountant
        log.info("resumed round %d, %d steps, epsilon %.3f", self._round, stored.steps,
                 stored.epsilon)

    # ----------------------------------------------------------------------- read-outs
    @property
    def model_lock(self) -> threading.Lock:
        """The lock a round holds while it steps the model (evaluation and checkpointing
        too). A merge never waits for it: while it is held, merges queue."""
        return self._params.lock

    @property
    def pending_merges(self) -> int:
        """Merges queued behind whoever holds :attr:`model_lock`, not yet in the model."""
        return self._params.pending

    def apply_pending_merges(self) -> None:
        """Apply the queued merges, as a round does between its steps (caller holds
        :attr:`model_lock`)."""
        self._params.apply_pending()

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

    # ----------------------------------------------------------------------- API
    def train_round(self) -> LocalUpdate:
        """Run ``local_steps`` steps on one block; return the top-k update (ledger on disk).

        Polls the source for new (and changed) blocks first. Raises BudgetExhaustedError,
        before touching the model, if no block can afford the round. Without a source the
        plan's averaging tail applies (``averaging_rounds``); with one it does not (data keeps
        coming: the caller chooses :meth:`averaging_round` itself).
        """
        cfg = self.config
        if self.source is None and self._in_averaging_tail():
            return self.averaging_round()
        if cfg.noise == "group":
            raise ValueError("noise = 'group': private steps are group releases "
                             "(begin_group_epoch), never local rounds")
        with self._params.lock:
            block = self._start_block(cfg.local_steps)
            if self._dp_step is not None:
                self._dp_step.retune(block.sigma, block.sample_rate * block.records)
            before = self._params.flat()
            self.model.train()
            for _ in range(cfg.local_steps):
                batch = poisson_batch(block.records, block.sample_rate, self._sampling)
                # Features stored as float16 (feature_dtype) reach the model as float32.
                x, y = block.x[batch].float(), block.y[batch]
                if self._dp_step is not None:
                    self._dp_step.step(x, y)  # noise is added even to an empty batch
                else:
                    if len(batch) == 0:
                        continue
                    self._optimizer.zero_grad(set_to_none=True)
                    F.cross_entropy(self._trainable(x), y).backward()
                self._optimizer.step()
                merged = self._params.apply_pending()
                if merged is not None:
                    before.add_(merged)  # merges are not this peer's own update
            delta = (self._params.flat() - before).numpy()
            block.entry.ledger.record(cfg.local_steps)
            self._round += 1
            indices, values = self.sharing.after_round(delta, self._params.displacement())
            # Persist before the update can leave: the ledger first, then the checkpoint.
            self._persist(checkpoint=cfg.checkpoint_every_round)
            return LocalUpdate(
                indices=indices,
                values=values,
                steps=cfg.local_steps,
                epsilon=self._shown_epsilon(),
                round=self._round,
                block=block.entry.block_id,
            )

    def _start_block(self, steps: int) -> ActiveBlock:
        """Queued merges applied, the block that can afford ``steps`` (new or retired blocks
        on disk first); the caller holds the model lock."""
        self._params.apply_pending()
        try:
            return self._blocks.start_round(steps)
        finally:
            if self._blocks.dirty:
                self._persist(checkpoint=False)

    def begin_group_epoch(self, params: GroupNoise, steps: int) -> GroupEpoch:
        """``steps`` group-noise steps on one block, charged to its ledger (on disk) before
        any share exists; BudgetExhaustedError, before anything, if no block can afford them
        (docs/privacy.md, "Group noise")."""
        if self._dp_step is None or self.config.noise != "group":
            raise ValueError("group epochs need dp = true and noise = 'group'")
        if params.dim != self.param_count or params.max_grad_norm != self.config.max_grad_norm:
            raise ValueError("group-noise parameters do not match this model")
        if self._dp_step.adaptive is not None:  # validate() refuses it; never a moving C here
            raise ValueError("adaptive clipping is refused with group noise")
        with self._params.lock:
            block = self._start_block(steps)
            block.entry.ledger.record(steps)
            self._round += 1
            self._persist(checkpoint=self.config.checkpoint_every_round)
        self.model.train()
        return GroupEpoch(params, steps, block.sigma, block.x, block.y, block.sample_rate,
                          self._dp_step, self._params.params, self._optimizer,
                          self._params.lock, self._sampling)

    def parameter_vector(self) -> np.ndarray:
        """The trainable parameters now, as one flat float32 vector (a copy)."""
        with self._params.lock:
            self._params.apply_pending()
            return self._params.flat().numpy().copy()

    def _in_averaging_tail(self) -> bool:
        """Whether the plan's private rounds are done and only averaging is left.

        The tail has no end: a peer that finished its plan keeps re-sharing its model (free,
        post-processing) while slower neighbours finish theirs, instead of running into its
        budget and dropping out of the averaging its neighbours still need.
        """
        cfg = self.config
        first = cfg.planned_rounds - cfg.averaging_rounds
        return cfg.averaging_rounds > 0 and self._round >= first

    def averaging_round(self) -> LocalUpdate:
        """A round with no private step: re-share the model's current displacement.

        Everything in the model is already a function of released DP outputs (this peer's
        accounted steps and merged group sums), so this costs no epsilon; no ledger is
        touched. Raises ValueError if the sharing strategy does not average models.
        """
        if not self.can_average:
            raise ValueError(f"share mode {self.config.share!r} does not average models")
        with self._params.lock:
            self._params.apply_pending()
            self._round += 1
            indices, values = self.sharing.reshare(self._params.displacement())
            self._persist(checkpoint=self.config.checkpoint_every_round)
            return LocalUpdate(
                indices=indices,
                values=values,
                steps=0,
                epsilon=self._shown_epsilon(),
                round=self._round,
            )

    def apply_update(self, indices: np.ndarray, values: np.ndarray) -> None:
        """Add a sparse (already bounded) merge to the model; never blocks on training.

        Raises ValueError on out-of-range indices, mismatched lengths or non-finite values.
        """
        self._params.merge(indices, values)

    def evaluate(self, ds: Dataset | None = None) -> float:
        """Accuracy (0..1) on ``ds``, the local hold-out by default; NaN if it is empty."""
        size = len(self._holdout) if ds is None else len(ds)
        if size == 0:
            return float("nan")
        batch = self.config.eval_batch_size
        batches = (self._holdout.batches(batch) if ds is None  # inputs made at construction
                   else held_data.record_batches(ds.x, ds.y, self._inputs, batch))
        with self._params.lock:
            self._params.apply_pending()
            self.model.eval()
            correct = held_data.count_correct(self._trainable, batches)
            self.model.train()
        return correct / size

    def save_checkpoint(self) -> None:
        """Persist ledger, then model/optimizer/residual/round (no-op without state_dir)."""
        with self._params.lock:
            self._params.apply_pending()
            self._persist(checkpoint=True)

    def _persist(self, *, checkpoint: bool) -> None:
        self._blocks.dirty = False
        if self.ledger_path is None or self.checkpoint_path is None:
            return
        self._blocks.ledgers.save(self.ledger_path)
        if checkpoint:
            save_checkpoint(
                self.checkpoint_path,
                TrainerState(
                    model_id=self.model_id,
                    round=self._round,
                    model_state=self.model.state_dict(),
                    optimizer_state=self._optimizer.state_dict(),
                    residual=self.sharing.state,
                    ledger_json=self._blocks.ledgers.to_json(),
                    clip_norm=self.clip_norm,
                ),
            )
