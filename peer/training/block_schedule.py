"""Which block a private round trains on, with which noise, and when a block retires.

A trainer's records are cut into disjoint blocks: its own static training set (block 0, if
it has records) and the blocks a :class:`~peer.training.blocks.BlockSource` forms over time.
:class:`BlockSchedule` keeps one :class:`~peer.training.ledger.PrivacyLedger` per block
(in :class:`~peer.training.block_ledger.BlockLedgers`) and picks one block per round.

Security properties:

* **One block per round.** Every step of a round Poisson-samples only the chosen block's
  records, at that block's rate q = batch_size / records and its own noise multiplier
  (calibrated like the single-ledger trainer: ``noise_multiplier``, or ``sigma_for`` of the
  target epsilon for the planned private steps at that q). A record is therefore touched only
  by its own block's steps, which that block's ledger accounts: by parallel composition over
  disjoint records its epsilon is its block's. Adaptivity is fine: a later block's steps see
  earlier records only through released (accounted) outputs.
* **Record counts are public.** q, sigma calibrated at q, and where one block ends and the
  next begins depend on per-file record counts (never on record contents); each block's
  epsilon is the add/remove guarantee at those parameters held fixed. One record more or
  fewer can move a boundary and later blocks' rates: that counterfactual, and the counts
  themselves, are outside the guarantee (docs/privacy.md, "What is assumed public: record
  counts").
* **Refuse before spending.** The chosen block's budget is checked before the round. With a
  source, a block that cannot afford a round *retires* for good (persisted), so its epsilon
  never grows; without a source the static set follows its one ledger's rule (checked before
  each round, nothing persisted), and the ledger's own BudgetExhaustedError is raised.
* **Changed data is never trained on.** A live block whose file changed or vanished (seen by
  the poll, or by the digest check when the block is loaded) is retired as refused.
* **Fair choice**: the live block with the least epsilon spent (then fewest steps, then the
  oldest); all blocks have the same budget, so this is the least-spent fraction.
* **Bounded memory**: the static set's tensors, plus at most one loaded source block, each
  as the trainable part's inputs (with a frozen prefix: features only, never the raw records).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from peer.errors import BudgetExhaustedError
from peer.training.block_ledger import (
    RETIRED_BUDGET,
    STATIC_BLOCK,
    BlockEntry,
    BlockLedgers,
)
from peer.training.blocks import BlockSource, BlockStatus
from peer.training.config import TrainerConfig
from peer.training.data import DataError, Dataset
from peer.training.ledger import LedgerError, PrivacyLedger
from peer.training.privacy.table import IN_PROCESS, EpsilonSource

log = logging.getLogger(__name__)


class NoBlockReadyError(BudgetExhaustedError):
    """No block can afford a private round now: all retired, or too few records yet.

    A BudgetExhaustedError, so a caller that stops on an exhausted budget stops here too; a
    caller that knows data keeps coming may try again later (``waiting_records`` > 0 says
    records are already waiting for ``min_block_records``).
    """

    def __init__(self, spent: float, budget: float | None, retired: int,
                 waiting_records: int) -> None:
        Exception.__init__(
            self, f"no block can afford a private round: {retired} block(s) retired, "
            f"{waiting_records} record(s) waiting to form a block; worst epsilon {spent:.3f}")
        self.spent, self.would_be = spent, math.inf
        self.budget = budget if budget is not None else math.inf
        self.retired, self.waiting_records = retired, waiting_records


@dataclass
class ActiveBlock:
    """The block a round trains on: its trainable-part inputs and labels, and settings."""

    entry: BlockEntry
    x: torch.Tensor
    y: torch.Tensor

    @property
    def records(self) -> int:
        return int(self.y.shape[0])

    @property
    def sample_rate(self) -> float:
        return self.entry.ledger.sample_rate

    @property
    def sigma(self) -> float:
        return self.entry.ledger.sigma


class BlockSchedule:
    """The trainer's blocks and their ledgers; see the module docstring."""

    def __init__(self, config: TrainerConfig, static: Dataset, source: BlockSource | None,
                 inputs: Callable[[np.ndarray], torch.Tensor],
                 epsilons: EpsilonSource = IN_PROCESS) -> None:
        self.config = config
        #: Where every ledger's accountant figures (and sigma_for) come from.
        self.epsilons = epsilons
        self.source = source
        self._inputs = inputs
        self._sigmas: dict[float, float] = {}
        #: Records of the static set (its raw records are not kept: only their inputs).
        self.static_records = len(static)
        self._static_x = inputs(static.x) if len(static) else None
        self._static_y = torch.from_numpy(static.y)
        self._loaded: ActiveBlock | None = None
        self.ledgers = BlockLedgers()
        if len(static) or source is None:
            self.ledgers.add(BlockEntry(STATIC_BLOCK, len(static), (), self.new_ledger(
                len(static))))
        #: The block of the last round (the static one until then), for sigma / sample_rate.
        self.current: BlockEntry | None = self.ledgers.get(STATIC_BLOCK)
        #: Whether the ledgers changed outside a round (new block, retirement): persist them.
        self.dirty = False

    @property
    def static_inputs(self) -> torch.Tensor | None:
        """The trainable part's inputs of the static set, computed once (None: no records)."""
        return self._static_x

    def held_tensors(self) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        """(inputs, labels) held: the static set's and a loaded source block's."""
        loaded = self._loaded
        return ([self._static_x, loaded.x if loaded else None],
                [self._static_y, loaded.y if loaded else None])

    # ----------------------------------------------------------------------- settings
    @property
    def budget(self) -> float | None:
        """The per-block budget: budget_epsilon, else the DP target epsilon (or None)."""
        cfg = self.config
        if cfg.budget_epsilon is None and cfg.dp and cfg.target_epsilon is not None:
            return cfg.target_epsilon
        return cfg.budget_epsilon

    def settings(self, records: int) -> tuple[float, float]:
        """(sample rate q, noise multiplier) of a block of ``records`` records."""
        cfg = self.config
        rate = min(1.0, cfg.batch_size / max(records, 1))
        if not cfg.dp:
            return rate, 0.0
        if cfg.noise_multiplier is not None:
            return rate, float(cfg.noise_multiplier)
        if rate not in self._sigmas:  # sigma_for costs about a second: once per q
            assert cfg.target_epsilon is not None
            planned = cfg.planned_steps or (
                cfg.planned_rounds - cfg.averaging_rounds) * cfg.local_steps
            self._sigmas[rate] = self.epsilons.sigma_for(cfg.target_epsilon, cfg.delta, rate,
                                                         planned, cfg.accountant)
        return rate, self._sigmas[rate]

    def new_ledger(self, records: int) -> PrivacyLedger:
        rate, sigma = self.settings(records)
        cfg = self.config
        ledger = PrivacyLedger(sigma=sigma, max_grad_norm=cfg.max_grad_norm, sample_rate=rate,
                               delta=cfg.delta, budget_epsilon=self.budget,
                               accountant=cfg.accountant)
        ledger.use_epsilons(self.epsilons)
        return ledger

    def _adopt_settings(self, entry: BlockEntry) -> None:
        rate, sigma = self.settings(entry.records)
        entry.ledger.update_settings(sigma, rate, self.config.max_grad_norm)

    def adopt(self, stored: BlockLedgers, where: str = "ledger") -> None:
        """Continue from ledgers read back at start-up (a single ledger's checks, per block)."""
        cfg = self.config
        for entry in stored:
            if entry.ledger.delta != cfg.delta:
                raise LedgerError(
                    f"ledger in {where} was kept at delta={entry.ledger.delta}, config asks "
                    f"delta={cfg.delta}; epsilons at different deltas do not compose")
            if entry.block_id == STATIC_BLOCK:
                entry.records = self.static_records  # counted afresh: the static set may change
                if entry.records:
                    self._adopt_settings(entry)
            if entry.ledger.steps > 0 and (entry.ledger.sigma > 0) != cfg.dp:
                log.warning("block %d: switching between private and non-private training",
                            entry.block_id)
            entry.ledger.budget_epsilon = self.budget
            # A ledger keeps the largest epsilon any accountant gave it, so a switch is safe.
            entry.ledger.accountant = cfg.accountant
            entry.ledger.use_epsilons(self.epsilons)
        self.ledgers = stored
        self.current = stored.get(STATIC_BLOCK) or self.current
        self._loaded = None

    # ----------------------------------------------------------------------- rounds
    def poll(self) -> None:
        """Add the source's new blocks; retire live blocks whose files changed."""
        if self.source is None:
            return
        found = self.source.poll(self.ledgers)
        for block_id, why in found.changed.items():
            self._retire(self.ledgers.get(block_id), f"refused: {why}")
        for block in found.new_blocks:
            self.ledgers.add(BlockEntry(block.block_id, block.records, block.files,
                                        self.new_ledger(block.records)))
            self.dirty = True

    def start_round(self, steps: int) -> ActiveBlock:
        """The block this round trains on, its budget already checked for ``steps`` steps.

        Raises BudgetExhaustedError (without a source: the static ledger's own; with one:
        NoBlockReadyError) before any step when no block can afford the round.
        """
        self.poll()
        live = [e for e in self.ledgers if e.retired is None and e.records > 0]
        live.sort(key=lambda e: (e.ledger.epsilon if self.config.dp else 0.0, e.ledger.steps,
                                 e.block_id))
        for entry in live:
            self._adopt_settings(entry)
            if self.config.dp:
                try:
                    entry.ledger.check_budget(steps)
                except BudgetExhaustedError:
                    if self.source is None:
                        raise  # the static set never retires: checked again next round
                    self._retire(entry, RETIRED_BUDGET)
                    continue
            try:
                active = self._load(entry)
            except DataError as exc:  # BlockChangedError, or unreadable since formed
                self._retire(entry, f"refused: {exc}")
                continue
            self.current = entry
            return active
        retired = sum(e.retired is not None for e in self.ledgers)
        waiting = self.source.pending_records if self.source is not None else 0
        raise NoBlockReadyError(self.ledgers.epsilon, self.budget, retired, waiting)

    def _load(self, entry: BlockEntry) -> ActiveBlock:
        if entry.block_id == STATIC_BLOCK:
            assert self._static_x is not None
            return ActiveBlock(entry, self._static_x, self._static_y)
        if self._loaded is None or self._loaded.entry is not entry:
            assert self.source is not None
            self._loaded = None  # free the previous block before reading the next
            data = self.source.load(entry.block_id, entry.files, entry.records)
            self._loaded = ActiveBlock(entry, self._inputs(data.x), torch.from_numpy(data.y))
        return self._loaded

    def _retire(self, entry: BlockEntry | None, why: str) -> None:
        if entry is None or entry.retired is not None:
            return
        entry.retired = why
        self.dirty = True
        if self._loaded is not None and self._loaded.entry is entry:
            self._loaded = None
        log.warning("block %d retired at epsilon %.3f after %d steps: %s", entry.block_id,
                    entry.ledger.epsilon, entry.ledger.steps, why)

    def status(self) -> list[BlockStatus]:
        """Every block, oldest first (a snapshot; safe to call while a round runs)."""
        return [BlockStatus(e.block_id, e.records, e.ledger.epsilon, e.ledger.steps,
                            e.retired is not None, e.retired) for e in list(self.ledgers)]
