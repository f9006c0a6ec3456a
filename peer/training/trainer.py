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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from peer.sharing import SharingStrategy, build_strategy
from peer.training import held_data
from peer.training.adaptive_clip import AdaptiveClip, adaptive_clipping_on
from peer.training.block_schedule import ActiveBlock, BlockSchedule
from peer.training.blocks import BlockSource, BlockStatus, open_block_source
from peer.training.config import TrainerConfig
from peer.training.data import Dataset
from peer.training.dpsgd import AuditHook, DPSGDStep, poisson_batch
from peer.training.group_epoch import GroupEpoch, group_epoch_step
from peer.training.group_noise import GroupNoise
from peer.training.ledger import BudgetExhaustedError
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
from peer.training.state_files import CHECKPOINT_FILE, LEDGER_FILE, StateFiles, TrainerParts
from peer.training.trainer_readouts import TrainerReadouts

__all__ = [
    "CHECKPOINT_FILE",
    "LEDGER_FILE",
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


@dataclass(frozen=True)
class LocalUpdate:
    """One round's sparse update: what may leave the peer (post-processing of DP outputs)."""

    indices: np.ndarray  # uint32, sorted, unique
    values: np.ndarray  # float32, same length
    steps: int  # private steps in this round
    epsilon: float  # the worst block's epsilon after this round (inf when dp is off)
    round: int  # 1-based round number
    block: int | None = None  # the block this round trained on (None: averaging round)


def _model_id(config: TrainerConfig, model: torch.nn.Module, sharing: SharingStrategy,
              params: FlatParams) -> str:
    """The id peers group by: the architecture, x0, the share mode and any group-noise
    parameters."""
    # Peers only group with the same model id, so a network never mixes share modes
    # (a displacement averaged with deltas would be meaningless).
    model_id = sharing.model_id(model_base_id(config.model, model), params.initial_digest())
    if config.noise == "group":  # one sigma, C and h per group (docs/privacy.md)
        model_id += (f"-group-h{config.honest_min}-s{config.noise_multiplier:.6g}"
                     f"-C{config.max_grad_norm:g}-b{config.batch_size}")
    return model_id


def _noise_replaced(noise: GaussianSource | None, audit: AuditHook | None) -> bool:
    """A caller's noise source or weakened noise: the ledger's epsilon no longer describes
    the steps."""
    return ((noise is not None and type(noise) is not SecureGaussian)
            or (audit is not None and audit.noise_scale != 1.0))


class LocalTrainer(TrainerReadouts):
    """Trains one peer's model privately; see the module docstring for the guarantees.

    Its read-only properties (round, epsilon, engine, model lock, ...) are in
    :class:`~peer.training.trainer_readouts.TrainerReadouts`; where its state lives on disk
    in :mod:`peer.training.state_files`."""

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
        self.model_id = _model_id(config, self.model, self.sharing, self._params)
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
        self._noise_replaced = _noise_replaced(noise, audit)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        #: What a checkpoint holds besides the round and the ledgers.
        self._parts = TrainerParts(
            self.model_id, self.model, self._optimizer, self.sharing,
            None if self._dp_step is None else self._dp_step.adaptive)
        self._files = self._open_state()
        if self.sharing.needs_common_init:
            # The fill lends the displacement as of the last round: after a restart, now.
            self.sharing.reshare(self._params.displacement())
        self._log_started(len(train))

    # ----------------------------------------------------------------------- set-up
    def _log_started(self, static_records: int) -> None:
        log.info("trainer %s: %d static records, %d blocks, q=%.4f, sigma=%.3f, C=%.2f, epsilon "
                 "spent %.3f, engine %s", self.model_id, static_records,
                 len(self._blocks.ledgers), self.sample_rate, self.sigma,
                 self.clip_norm or self.config.max_grad_norm, self._blocks.ledgers.epsilon,
                 self.engine)

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

    def _open_state(self) -> StateFiles | None:
        """The state directory's files (the directory made if missing), after resuming from
        what they hold; None without a state directory."""
        if self.state_dir is None:
            return None
        files = StateFiles.create(self.state_dir)
        resumed = files.restore(self._parts, self._blocks.static_records)
        self._round = resumed.round
        if resumed.ledgers is not None:
            # delta, settings, budget, accountant
            self._blocks.adopt(resumed.ledgers, str(self.state_dir))
            log.info("resumed round %d, %d steps, epsilon %.3f", self._round,
                     resumed.ledgers.steps, resumed.ledgers.epsilon)
        return files

    def apply_pending_merges(self) -> None:
        """Apply the queued merges, as a round does between its steps (caller holds
        :attr:`model_lock`)."""
        self._params.apply_pending()

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
        dp_step = group_epoch_step(self.config, self._dp_step, params, self.param_count)
        with self._params.lock:
            block = self._start_block(steps)
            block.entry.ledger.record(steps)
            self._round += 1
            self._persist(checkpoint=self.config.checkpoint_every_round)
        self.model.train()
        return GroupEpoch(params, steps, block.sigma, block.x, block.y, block.sample_rate,
                          dp_step, self._params.params, self._optimizer,
                          self._params.lock, self._sampling)

    def parameter_vector(self) -> np.ndarray:
        """The trainable parameters now, as one flat float32 vector (a copy)."""
        with self._params.lock:
            self._params.apply_pending()
            return self._params.flat().numpy().copy()

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
        if self._files is not None:
            self._files.write(self._blocks.ledgers, self._parts.snapshot(
                self._round, self._blocks.ledgers) if checkpoint else None)
