"""A trainer's state directory: ``ledger.json`` and ``checkpoint.pt``, written and read back.

Security properties:

* **Ledger first.** :meth:`StateFiles.write` saves the ledger before the checkpoint, so a
  peer killed between the two finds a ledger at least as new as the checkpoint's copy.
* **Never an older ledger.** :meth:`StateFiles.restore` continues from the ledger file, or
  from the checkpoint's copy only if that has more steps (block_ledger.newest_ledgers); a
  checkpoint without its ledger file is refused rather than under-count epsilon.
* **Never a foreign model.** A checkpoint whose model id is not the trainer's, or whose
  sharing state has the wrong length, raises :class:`LedgerError` before anything is used.

The files themselves are written atomically (checkpoint.py, peer/files.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from peer.sharing import SharingStrategy
from peer.training.adaptive_clip import AdaptiveClip
from peer.training.block_ledger import BlockLedgers, newest_ledgers
from peer.training.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from peer.training.ledger import LedgerError
from peer.training.optim import Optimizer

__all__ = ["CHECKPOINT_FILE", "LEDGER_FILE", "Resumed", "StateFiles", "TrainerParts"]

LEDGER_FILE = "ledger.json"

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class TrainerParts:
    """What a checkpoint holds of a trainer besides its round and ledgers, by reference:
    :meth:`StateFiles.restore` loads into these objects in place."""

    model_id: str
    model: nn.Module
    optimizer: Optimizer
    sharing: SharingStrategy
    adaptive: AdaptiveClip | None  #: adaptive clipping's state (None: C is fixed)

    def snapshot(self, round: int, ledgers: BlockLedgers) -> TrainerState:
        """Everything a checkpoint stores, as of now."""
        return TrainerState(
            model_id=self.model_id,
            round=round,
            model_state=self.model.state_dict(),
            optimizer_state=self.optimizer.state_dict(),
            residual=self.sharing.state,
            ledger_json=ledgers.to_json(),
            clip_norm=None if self.adaptive is None else self.adaptive.clip_norm,
        )


@dataclass(frozen=True)
class Resumed:
    """What a restart continues from beyond the restored parts."""

    round: int  #: the checkpoint's round counter (0 without a checkpoint)
    ledgers: BlockLedgers | None  #: the newest ledgers on disk (None: a fresh start)


@dataclass(frozen=True)
class StateFiles:
    """The two files of one trainer's state directory."""

    directory: Path

    @classmethod
    def create(cls, directory: Path) -> StateFiles:
        """The files of ``directory``, made (with its parents) if it does not exist."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @property
    def ledger(self) -> Path:
        return self.directory / LEDGER_FILE

    @property
    def checkpoint(self) -> Path:
        return self.directory / CHECKPOINT_FILE

    def write(self, ledgers: BlockLedgers, snapshot: TrainerState | None) -> None:
        """Save the ledgers, then (if given) the checkpoint; both atomically."""
        ledgers.save(self.ledger)
        if snapshot is not None:
            save_checkpoint(self.checkpoint, snapshot)

    def restore(self, parts: TrainerParts, static_records: int) -> Resumed:
        """Load the checkpoint, if any, into ``parts``; the round and the ledgers to continue
        from. Raises LedgerError for a foreign checkpoint or a missing ledger file."""
        round_ = 0
        in_checkpoint: BlockLedgers | None = None
        if self.checkpoint.exists():
            state = load_checkpoint(self.checkpoint)
            if state.model_id != parts.model_id:
                raise LedgerError(
                    f"{self.checkpoint}: checkpoint is for {state.model_id}, "
                    f"config builds {parts.model_id}"
                )
            parts.model.load_state_dict(state.model_state)
            parts.optimizer.load_state_dict(state.optimizer_state)
            try:
                parts.sharing.restore(state.residual)
            except ValueError:
                raise LedgerError(
                    f"{self.checkpoint}: residual has the wrong length") from None
            round_ = state.round
            if state.clip_norm is not None and parts.adaptive is not None:  # adaptive C continues
                parts.adaptive.clip_norm = state.clip_norm
            in_checkpoint = BlockLedgers.from_json(state.ledger_json, str(self.checkpoint),
                                                   static_records)
        ledgers = newest_ledgers(self.ledger, in_checkpoint, static_records, self.checkpoint)
        return Resumed(round=round_, ledgers=ledgers)
