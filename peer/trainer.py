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
event loop calls :meth:`LocalTrainer.apply_update`; an internal lock serialises access to the
model, and merges that arrive mid-round are queued and applied between steps (and excluded
from the round's own update). The trainer holds no global state; ``torch.set_num_threads`` is
process-wide, so it is left to the caller (see :func:`configure_torch_threads`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from peer.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from peer.data import Dataset
from peer.dpsgd import DPSGDStep, poisson_batch
from peer.ledger import BudgetExhaustedError, LedgerError, PrivacyLedger
from peer.models import MODEL_NAMES, build_model, param_count
from peer.optim import SGD, Adam, Optimizer
from peer.privacy.accountant import sigma_for
from peer.privacy.noise import GaussianSource, InsecureFastGaussian, SecureGaussian
from peer.topk import TopK

__all__ = [
    "BudgetExhaustedError",
    "LocalTrainer",
    "LocalUpdate",
    "TrainerConfig",
    "configure_torch_threads",
]

log = logging.getLogger(__name__)

SHARE_MODES = ("delta", "model")
LEDGER_FILE = "ledger.json"
CHECKPOINT_FILE = "checkpoint.pt"


def configure_torch_threads(threads: int) -> None:
    """Set torch's intra-op thread count (process-wide: call once, from the main thread).

    Several peers in one process should use 1 each, or the cores thrash.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


@dataclass
class TrainerConfig:
    """Local training settings. Exactly one of ``noise_multiplier`` / ``target_epsilon``
    is needed when ``dp`` is on; with ``target_epsilon`` the noise is chosen so that
    ``planned_rounds - averaging_rounds`` rounds of ``local_steps`` steps spend exactly that
    epsilon, and the budget defaults to it."""

    model: str = "mlp"
    lr: float = 0.1
    optimizer: str = "sgd"  # "sgd" or "adam"; either is post-processing of private grads
    momentum: float = 0.0
    batch_size: int = 64  # expected batch size: sample rate q = batch_size / len(train)
    local_steps: int = 20
    dp: bool = True
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    planned_rounds: int = 100
    planned_steps: int | None = None  # overrides planned_rounds * local_steps when set
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    budget_epsilon: float | None = None
    topk_fraction: float = 0.01
    # What a round shares: "delta" (this round's own change, top-k with error feedback) or
    # "model" (the model's displacement from the common initialisation, top-k by magnitude;
    # pairs with the merge rule "group_average"). Both are post-processing of DP outputs.
    share: str = "delta"
    # Share mode "model" only: the last ``averaging_rounds`` of ``planned_rounds`` take no
    # private step and only re-share the current displacement, so the peers' models keep
    # averaging (and their independent DP noise keeps cancelling) after training ends. They
    # are post-processing of released outputs and cost no epsilon; the noise is calibrated
    # for the training rounds only.
    averaging_rounds: int = 0
    seed: int = 0  # model initialisation only (and everything in insecure mode)
    insecure_fast_noise: bool = False  # seeded noise + sampling: NOT private, experiments only
    engine: str = "auto"  # "auto" | "ghost" | "vmap"
    eval_batch_size: int = 1024
    checkpoint_every_round: bool = True

    def validate(self) -> None:
        if self.model not in MODEL_NAMES:
            raise ValueError(f"unknown model {self.model!r}; choose one of {MODEL_NAMES}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.batch_size < 1 or self.local_steps < 1 or self.planned_rounds < 1:
            raise ValueError("batch_size, local_steps and planned_rounds must be >= 1")
        if self.planned_steps is not None and self.planned_steps < 1:
            raise ValueError(f"planned_steps must be >= 1, got {self.planned_steps}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"max_grad_norm must be positive, got {self.max_grad_norm}")
        if self.dp:
            if self.noise_multiplier is None and self.target_epsilon is None:
                raise ValueError("dp needs noise_multiplier or target_epsilon")
            if self.noise_multiplier is not None and not self.noise_multiplier > 0:
                raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
            if self.target_epsilon is not None and not self.target_epsilon > 0:
                raise ValueError(f"target_epsilon must be > 0, got {self.target_epsilon}")
        if self.budget_epsilon is not None and not self.budget_epsilon > 0:
            raise ValueError(f"budget_epsilon must be > 0, got {self.budget_epsilon}")
        TopK(self.topk_fraction)  # validates the fraction
        if self.share not in SHARE_MODES:
            raise ValueError(f"share must be one of {SHARE_MODES}, got {self.share!r}")
        if not 0 <= self.averaging_rounds < self.planned_rounds:
            raise ValueError("averaging_rounds must be in 0..planned_rounds-1")
        if self.averaging_rounds and self.share != "model":
            raise ValueError("averaging_rounds needs share='model'")


@dataclass(frozen=True)
class LocalUpdate:
    """One round's sparse update: what may leave the peer (post-processing of DP outputs)."""

    indices: np.ndarray  # uint32, sorted, unique
    values: np.ndarray  # float32, same length
    steps: int  # private steps in this round
    epsilon: float  # the ledger's epsilon after this round (inf when dp is off)
    round: int  # 1-based round number


def _seeded_init(model: nn.Module, seed: int) -> None:
    """Deterministic PyTorch-default-style init from a local generator (no global RNG)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                module.weight.uniform_(-bound, bound, generator=generator)
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=generator)


class LocalTrainer:
    """Trains one peer's model privately; see the module docstring for the guarantees."""

    def __init__(
        self,
        config: TrainerConfig,
        train: Dataset,
        holdout: Dataset,
        state_dir: Path | None = None,
    ) -> None:
        config.validate()
        if len(train) == 0:
            raise ValueError("training set is empty")
        self.config = config
        self.train_data = train
        self.holdout = holdout
        self.model = build_model(config.model, train.input_shape, train.num_classes)
        _seeded_init(self.model, config.seed)
        self.param_count = param_count(self.model)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        # The common starting point (same seed on every peer): "model" sharing sends x - x0.
        self._init_params = self._flat_params().clone()
        # Peers only group with the same model id, so a network never mixes share modes
        # (a displacement averaged with deltas would be meaningless). Averaging models is
        # meaningful only from the same initial weights, so in model mode the id also carries
        # a digest of them: a peer initialised with another seed never groups.
        suffix = f"-avg-{self._init_digest()}" if config.share == "model" else ""
        self.model_id = f"{config.model}-{self.param_count}{suffix}"
        self._x = torch.from_numpy(train.x)
        self._y = torch.from_numpy(train.y)
        self.sample_rate = min(1.0, config.batch_size / len(train))
        self.sigma = self._noise_multiplier()
        self._optimizer = self._make_optimizer()
        self._topk = TopK(config.topk_fraction)
        self._residual = np.zeros(self.param_count, dtype=np.float32)
        self._round = 0
        self._lock = threading.Lock()
        # Guards the residual and the shared snapshot: held only for array copies, never
        # across training, so the event loop can read them while a round runs.
        self._residual_lock = threading.Lock()
        self._shared_snapshot = np.zeros(self.param_count, dtype=np.float32)
        self._pending_lock = threading.Lock()
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        if config.insecure_fast_noise:
            log.warning("insecure_fast_noise is on: seeded noise and sampling, NO privacy")
            noise: GaussianSource = InsecureFastGaussian(config.seed + 1)
            self._sampling: torch.Generator | None = torch.Generator().manual_seed(config.seed)
        else:
            noise = SecureGaussian()
            self._sampling = None
        self._dp_step = (
            DPSGDStep.build(
                self.model,
                noise_multiplier=self.sigma,
                max_grad_norm=config.max_grad_norm,
                expected_batch_size=self.sample_rate * len(train),
                noise=noise,
                engine=config.engine,
            )
            if config.dp
            else None
        )
        budget = config.budget_epsilon
        if budget is None and config.dp and config.target_epsilon is not None:
            budget = config.target_epsilon
        self.ledger = PrivacyLedger(
            sigma=self.sigma,
            max_grad_norm=config.max_grad_norm,
            sample_rate=self.sample_rate,
            delta=config.delta,
            budget_epsilon=budget,
        )
        self.state_dir = Path(state_dir) if state_dir is not None else None
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._resume()
        if config.share == "model":
            self._shared_snapshot = self._displacement()
        log.info(
            "trainer %s: %d train records, q=%.4f, sigma=%.3f, C=%.2f, epsilon spent %.3f",
            self.model_id,
            len(train),
            self.sample_rate,
            self.sigma,
            config.max_grad_norm,
            self.ledger.epsilon,
        )

    # ----------------------------------------------------------------------- set-up
    def _noise_multiplier(self) -> float:
        cfg = self.config
        if not cfg.dp:
            return 0.0
        if cfg.noise_multiplier is not None:
            return float(cfg.noise_multiplier)
        assert cfg.target_epsilon is not None
        training_rounds = cfg.planned_rounds - cfg.averaging_rounds
        planned = cfg.planned_steps or training_rounds * cfg.local_steps
        return sigma_for(cfg.target_epsilon, cfg.delta, self.sample_rate, planned)

    def _make_optimizer(self) -> Optimizer:
        # peer.optim, not torch.optim: constructing a torch.optim optimizer imports
        # torch._dynamo (+70 MB resident), too much for a 1 GB Raspberry Pi.
        cfg = self.config
        if cfg.optimizer == "adam":
            return Adam(self._params, lr=cfg.lr)
        return SGD(self._params, lr=cfg.lr, momentum=cfg.momentum)

    @property
    def ledger_path(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / LEDGER_FILE

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / CHECKPOINT_FILE

    @property
    def round(self) -> int:
        return self._round

    @property
    def residual(self) -> np.ndarray:
        return self._residual.copy()

    def _resume(self) -> None:
        assert self.ledger_path is not None and self.checkpoint_path is not None
        stored: PrivacyLedger | None = None
        if self.checkpoint_path.exists():
            state = load_checkpoint(self.checkpoint_path)
            if state.model_id != self.model_id:
                raise LedgerError(
                    f"{self.checkpoint_path}: checkpoint is for {state.model_id}, "
                    f"config builds {self.model_id}"
                )
            self.model.load_state_dict(state.model_state)
            self._optimizer.load_state_dict(state.optimizer_state)
            if state.residual.shape != (self.param_count,):
                raise LedgerError(f"{self.checkpoint_path}: residual has the wrong length")
            self._residual = state.residual.astype(np.float32)
            self._round = state.round
            stored = PrivacyLedger.from_json(state.ledger_json, str(self.checkpoint_path))
        if self.ledger_path.exists():
            on_disk = PrivacyLedger.load(self.ledger_path)
            # The ledger file is written first, so it is never behind the checkpoint.
            if stored is None or on_disk.steps >= stored.steps:
                stored = on_disk
        elif stored is not None:
            # Training state without its ledger: the file was lost or deleted. Falling back
            # to the checkpoint's copy could under-count (it may be older), so refuse.
            raise LedgerError(
                f"{self.ledger_path}: ledger missing next to {self.checkpoint_path}; refusing "
                "to start rather than under-count epsilon (restore the ledger file, or start "
                "from an empty state directory deliberately)"
            )
        if stored is None:
            return
        if stored.delta != self.config.delta:
            raise LedgerError(
                f"ledger in {self.state_dir} was kept at delta={stored.delta}, config asks "
                f"delta={self.config.delta}; epsilons at different deltas do not compose"
            )
        if stored.steps > 0 and (stored.sigma > 0) != (self.sigma > 0):
            log.warning("switching between private and non-private training on one ledger")
        stored.update_settings(self.sigma, self.sample_rate, self.config.max_grad_norm)
        stored.budget_epsilon = self.ledger.budget_epsilon
        self.ledger = stored
        log.info("resumed round %d, %d steps, epsilon %.3f", self._round, stored.steps,
                 stored.epsilon)

    # ----------------------------------------------------------------------- params
    def _flat_params(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params])

    def _add_to_params(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Add a sparse vector to the parameters; returns it densified (for bookkeeping)."""
        dense = torch.zeros(self.param_count, dtype=torch.float32)
        dense.index_add_(0, indices, values)
        offset = 0
        with torch.no_grad():
            for p in self._params:
                n = p.numel()
                p.add_(dense[offset : offset + n].view_as(p))
                offset += n
        return dense

    def _drain_pending(self) -> torch.Tensor | None:
        """Apply queued merges (caller holds the model lock); returns their dense sum."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
        total: torch.Tensor | None = None
        for indices, values in pending:
            dense = self._add_to_params(indices, values)
            total = dense if total is None else total.add_(dense)
        return total

    # ----------------------------------------------------------------------- API
    def train_round(self) -> LocalUpdate:
        """Run ``local_steps`` steps and return the top-k update (ledger already on disk).

        Raises BudgetExhaustedError, before touching the model, if the round would take
        epsilon past the budget.
        """
        cfg = self.config
        if self._in_averaging_tail():
            return self._averaging_round()
        with self._lock:
            self._drain_pending()
            if cfg.dp:
                self.ledger.check_budget(cfg.local_steps)
            before = self._flat_params()
            self.model.train()
            for _ in range(cfg.local_steps):
                batch = poisson_batch(len(self.train_data), self.sample_rate, self._sampling)
                x, y = self._x[batch], self._y[batch]
                if self._dp_step is not None:
                    self._dp_step.step(x, y)  # noise is added even to an empty batch
                else:
                    if len(batch) == 0:
                        continue
                    self._optimizer.zero_grad(set_to_none=True)
                    F.cross_entropy(self.model(x), y).backward()
                self._optimizer.step()
                merged = self._drain_pending()
                if merged is not None:
                    before.add_(merged)  # merges are not this peer's own update
            delta = (self._flat_params() - before).numpy()
            epsilon = self.ledger.record(cfg.local_steps)
            self._round += 1
            if cfg.share == "model":
                # Share the displacement from the common init; no error feedback: what is
                # not sent now is still in the model and is sent whenever it is large.
                displacement = self._displacement()
                indices, values, _unsent = self._topk.select(
                    displacement, np.zeros_like(displacement)
                )
                with self._residual_lock:
                    self._shared_snapshot = displacement
            else:
                with self._residual_lock:
                    residual = self._residual
                    indices, values, self._residual = self._topk.select(delta, residual)
            # Persist before the update can leave: the ledger first, then the checkpoint.
            self._persist(checkpoint=cfg.checkpoint_every_round)
            return LocalUpdate(
                indices=indices,
                values=values,
                steps=cfg.local_steps,
                epsilon=epsilon,
                round=self._round,
            )

    def _in_averaging_tail(self) -> bool:
        cfg = self.config
        first = cfg.planned_rounds - cfg.averaging_rounds
        return cfg.averaging_rounds > 0 and first <= self._round < cfg.planned_rounds

    def _averaging_round(self) -> LocalUpdate:
        """A round with no private step: re-share the model's current displacement.

        Everything in the model is already a function of released DP outputs (this peer's
        accounted steps and merged group sums), so this costs no epsilon; the ledger is not
        touched.
        """
        with self._lock:
            self._drain_pending()
            self._round += 1
            displacement = self._displacement()
            indices, values, _unsent = self._topk.select(displacement, np.zeros_like(displacement))
            with self._residual_lock:
                self._shared_snapshot = displacement
            self._persist(checkpoint=self.config.checkpoint_every_round)
            return LocalUpdate(
                indices=indices,
                values=values,
                steps=0,
                epsilon=self.ledger.epsilon,
                round=self._round,
            )

    def residual_values(self, indices: np.ndarray) -> np.ndarray:
        """This peer's values on ``indices`` outside its top-k (the session's residual fill).

        Share mode "delta": the error-feedback residual (what top-k held back); mode "model":
        the displacement from the common init as of the last completed round (the snapshot
        the round's own top-k was taken from). Called on the event loop: takes only the short
        residual lock, never the training lock, so it does not wait for a running round.
        Both are post-processing of DP outputs. Raises ValueError on bad indices.
        """
        index_array = self._checked_indices(indices)
        with self._residual_lock:
            source = self._shared_snapshot if self.config.share == "model" else self._residual
            return source[index_array].astype(np.float32, copy=True)

    def consume_residual(self, indices: np.ndarray, values: np.ndarray) -> None:
        """Remove what a completed session shared from the residual (so it is not sent twice).

        Mode "delta": ``residual[indices] -= values`` (if a later round already sent and
        zeroed a coordinate, the negative remainder corrects the double send). Mode "model":
        nothing to remove, the displacement stays in the model. Raises ValueError on bad
        indices, mismatched lengths or non-finite values.
        """
        index_array = self._checked_indices(indices)
        value_array = np.asarray(values, dtype=np.float32)
        if value_array.shape != index_array.shape:
            raise ValueError("indices and values must be 1-D and of equal length")
        if not np.all(np.isfinite(value_array)):
            raise ValueError("residual values must be finite")
        if self.config.share == "model":
            return
        with self._residual_lock:
            np.subtract.at(self._residual, index_array, value_array)

    def _checked_indices(self, indices: np.ndarray) -> np.ndarray:
        index_array = np.asarray(indices)
        if index_array.ndim != 1:
            raise ValueError("indices must be 1-D")
        if index_array.size and not np.issubdtype(index_array.dtype, np.integer):
            raise ValueError(f"indices must be integers, got {index_array.dtype}")
        index_array = index_array.astype(np.int64)
        if index_array.size and (
            int(index_array.min()) < 0 or int(index_array.max()) >= self.param_count
        ):
            raise ValueError(f"index out of range 0..{self.param_count - 1}")
        return index_array

    def _init_digest(self) -> str:
        """8 hex digits of BLAKE2b over the initial parameters (float32 bytes)."""
        raw = self._init_params.numpy().astype("<f4").tobytes()
        return hashlib.blake2b(raw, digest_size=4).hexdigest()

    def _displacement(self) -> np.ndarray:
        """x - x0 as float32 (caller holds the model lock or owns the trainer)."""
        return (self._flat_params() - self._init_params).numpy().astype(np.float32)

    def apply_update(self, indices: np.ndarray, values: np.ndarray) -> None:
        """Add a sparse (already bounded) merge to the model; never blocks on training.

        Raises ValueError on out-of-range indices, mismatched lengths or non-finite values.
        """
        index_array = np.asarray(indices)
        value_array = np.asarray(values, dtype=np.float32)
        if index_array.ndim != 1 or value_array.ndim != 1 or len(index_array) != len(
            value_array
        ):
            raise ValueError("indices and values must be 1-D and of equal length")
        if not np.issubdtype(index_array.dtype, np.integer):
            raise ValueError(f"indices must be integers, got {index_array.dtype}")
        if len(index_array) and (
            int(index_array.min()) < 0 or int(index_array.max()) >= self.param_count
        ):
            raise ValueError(f"index out of range 0..{self.param_count - 1}")
        if not np.all(np.isfinite(value_array)):
            raise ValueError("update values must be finite")
        entry = (
            torch.from_numpy(index_array.astype(np.int64)),
            torch.from_numpy(value_array.copy()),
        )
        with self._pending_lock:
            self._pending.append(entry)
        # Apply now if no round is running; otherwise the round applies it between steps.
        if self._lock.acquire(blocking=False):
            try:
                self._drain_pending()
            finally:
                self._lock.release()

    def evaluate(self, ds: Dataset | None = None) -> float:
        """Accuracy (0..1) on ``ds``, the local hold-out by default; NaN if it is empty."""
        data = self.holdout if ds is None else ds
        if len(data) == 0:
            return float("nan")
        with self._lock:
            self._drain_pending()
            self.model.eval()
            correct = 0
            with torch.no_grad():
                for start in range(0, len(data), self.config.eval_batch_size):
                    stop = start + self.config.eval_batch_size
                    x = torch.from_numpy(data.x[start:stop])
                    y = torch.from_numpy(data.y[start:stop])
                    correct += int((self.model(x).argmax(1) == y).sum())
            self.model.train()
        return correct / len(data)

    def save_checkpoint(self) -> None:
        """Persist ledger, then model/optimizer/residual/round (no-op without state_dir)."""
        with self._lock:
            self._drain_pending()
            self._persist(checkpoint=True)

    def _persist(self, *, checkpoint: bool) -> None:
        if self.ledger_path is None or self.checkpoint_path is None:
            return
        self.ledger.save(self.ledger_path)
        if checkpoint:
            save_checkpoint(
                self.checkpoint_path,
                TrainerState(
                    model_id=self.model_id,
                    round=self._round,
                    model_state=self.model.state_dict(),
                    optimizer_state=self._optimizer.state_dict(),
                    residual=self._residual,
                    ledger_json=self.ledger.to_json(),
                ),
            )
