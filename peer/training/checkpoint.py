"""Atomic checkpoints of a trainer: model, optimizer, residual, ledger, round counter.

The file is written with ``torch.save`` into a temporary file beside the target, fsynced and
renamed over it, so a killed peer finds either the previous or the new checkpoint, whole.
``ledger_json`` is the trainer's ledger file as written (peer/training/block_ledger.py: one
ledger, format 1, or one per block, format 2), so the copy and the file parse the same way.
Loading uses ``torch.load(weights_only=True)``: a tampered checkpoint cannot run code through
pickle; it can only fail to load, which raises :class:`CheckpointError`.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peer.errors import PeerError
from peer.files import atomic_write_with

CHECKPOINT_FORMAT = 1


class CheckpointError(PeerError):
    """The checkpoint is unreadable, foreign or for a different model."""


@dataclass
class TrainerState:
    """Everything needed to resume a trainer exactly where it stood."""

    model_id: str
    round: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    residual: np.ndarray
    ledger_json: str  # BlockLedgers.to_json(): what ledger.json held when this was written
    clip_norm: float | None = None  # adaptive clipping's current C (None: C is fixed)


def save_checkpoint(path: Path, state: TrainerState) -> None:
    """Write ``state`` atomically and durably to ``path``."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_id": state.model_id,
        "round": int(state.round),
        "model_state": {k: v.detach().clone() for k, v in state.model_state.items()},
        "optimizer_state": state.optimizer_state,
        "residual": torch.from_numpy(np.asarray(state.residual, dtype=np.float32).copy()),
        "ledger_json": state.ledger_json,
        "clip_norm": None if state.clip_norm is None else float(state.clip_norm),
    }
    atomic_write_with(Path(path), lambda handle: torch.save(payload, handle))


def _clip_norm(value: Any) -> float | None:
    """A stored adaptive C: None (fixed C, or a checkpoint from before adaptive clipping) or a
    positive finite float."""
    if value is None:
        return None
    clip_norm = float(value)
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f"clip_norm {clip_norm} is not a positive number")
    return clip_norm


def load_checkpoint(path: Path) -> TrainerState:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: checkpoint not found") from exc
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a Murmur checkpoint (format {CHECKPOINT_FORMAT})")
    try:
        return TrainerState(
            model_id=str(payload["model_id"]),
            round=int(payload["round"]),
            model_state=dict(payload["model_state"]),
            optimizer_state=dict(payload["optimizer_state"]),
            residual=payload["residual"].numpy().astype(np.float32),
            ledger_json=str(payload["ledger_json"]),
            clip_norm=_clip_norm(payload.get("clip_norm")),
        )
    except (KeyError, AttributeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: checkpoint is missing fields ({exc})") from exc
