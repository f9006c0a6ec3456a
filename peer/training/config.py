"""A peer's training settings (``[training]`` in its config): a dataclass, no torch.

The defaults are what ``murmur-peer run`` trains with; the simulation changes a few of them
(sim/setup.py). Loading a config checks these settings without importing torch, so a typo is
reported before the slow imports start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from peer.sharing import DEFAULT_STRATEGY, strategy_class
from peer.sharing.topk import TopK
from peer.training.import_path import check_import_path, is_user_model
from peer.training.privacy.accountant import ACCOUNTANTS, DEFAULT_ACCOUNTANT

#: The models peer.training.models can build ("scatter" needs kymatio, see features.py).
MODEL_NAMES: tuple[str, ...] = ("mlp", "cnn", "scatter")
#: Storage types of frozen features (TrainerConfig.feature_dtype).
FEATURE_DTYPES: tuple[str, ...] = ("float32", "float16")
#: Who adds a private step's noise: each peer all of it, or the group's honest members a share.
NOISE_MODES: tuple[str, ...] = ("local", "group")


@dataclass
class TrainerConfig:
    """Local training settings. Exactly one of ``noise_multiplier`` / ``target_epsilon``
    is needed when ``dp`` is on; with ``target_epsilon`` the noise is chosen so that
    ``planned_rounds - averaging_rounds`` rounds of ``local_steps`` steps spend exactly that
    epsilon, and the budget defaults to it."""

    # A built-in name (MODEL_NAMES) or a user's factory "package.module:function"
    # (peer/training/user_model.py; docs/peer.md, "Your own model and data").
    model: str = "mlp"
    # lr, momentum, batch size and the averaging tail's top-k won the sweeps of
    # docs/results.md ("Learning quality"); measured with the simulation's rounds.
    lr: float = 0.2
    optimizer: str = "sgd"  # "sgd" or "adam"; either is post-processing of private grads
    momentum: float = 0.5
    batch_size: int = 64  # expected batch size: sample rate q = batch_size / len(train)
    local_steps: int = 20
    dp: bool = True
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    planned_rounds: int = 100
    planned_steps: int | None = None  # overrides planned_rounds * local_steps when set
    delta: float = 1e-5
    # Which registered accountant turns the steps into epsilon (peer.training.privacy):
    # "pld" is 8-15 % tighter than "rdp" (bench/accountant_bench.py) and costs about 50 MB more
    # resident memory; "rdp" suits a peer on a 1 GB device.
    accountant: str = DEFAULT_ACCOUNTANT
    # Take the accountant's figures from state_dir/epsilon_table.json, filled by a short-lived
    # child process (peer/training/privacy/table.py): the same figures, bit for bit, without
    # dp-accounting and scipy resident (50-100 MB). Needs a state directory; without one the
    # library runs in this process.
    epsilon_table: bool = False
    max_grad_norm: float = 1.0  # C; with adaptive clipping the starting C
    # Adaptive clipping (docs/privacy.md, "Adaptive clipping"; peer/training/adaptive_clip.py):
    # each private step also releases a noised count of unclipped examples and moves C
    # geometrically toward the ``clip_target_quantile`` of the gradient norms, at no extra
    # epsilon (the gradient noise rises a little instead). None: on for a user model
    # ("package.module:factory"), off for the built-in recipes (their C is tuned) and under
    # group noise (where it is refused). Defaults from Andrew et al. (NeurIPS 2021).
    clip_adaptive: bool | None = None
    clip_target_quantile: float = 0.5  # gamma: the fraction of examples left unclipped
    clip_learning_rate: float = 0.2  # eta of C <- C * exp(-eta * (b - gamma))
    # sigma_b of the count, in examples; None: max(batch_size / 20, 2 * sigma)
    clip_count_stddev: float | None = None
    budget_epsilon: float | None = None
    # "local": every private step adds the whole noise to this peer's own gradient (trusts no
    # one). "group": each private step is a group release to which each of at least
    # ``honest_min`` honest members adds 1/h of one Gaussian (docs/privacy.md, "Group noise");
    # ``noise_multiplier`` then names the release's sigma_eff.
    noise: str = "local"
    honest_min: int = 3
    # Averaging needs many coordinates per session to average the peers' DP noise away
    # (measured, docs/results.md); deltas with error feedback do well with far fewer.
    topk_fraction: float = 0.25
    # What a round shares and how it is merged: a name in peer.sharing.STRATEGIES ("model":
    # the displacement from the common init, gossip averaging; "delta": the round's own
    # change with error feedback). Both are post-processing of DP outputs.
    share: str = DEFAULT_STRATEGY
    # Share mode "model" only: the last ``averaging_rounds`` of ``planned_rounds`` take no
    # private step and only re-share the current displacement, so the peers' models keep
    # averaging (and their independent DP noise keeps cancelling) after training ends. They
    # are post-processing of released outputs and cost no epsilon; the noise is calibrated
    # for the training rounds only. Rounds past planned_rounds are averaging rounds too.
    averaging_rounds: int = 0
    # Top-k of those averaging-only rounds (None: topk_fraction). The whole model: the peers
    # end at a consensus instead of each keeping its own noise (docs/results.md).
    averaging_topk_fraction: float | None = 1.0
    # Data that keeps coming (peer/training/blocks.py): pending files form the next block,
    # with its own ledger, once they hold this many records. Small blocks mean a large
    # sample rate batch_size / records, so much more noise for the same epsilon.
    min_block_records: int = 1000
    seed: int = 0  # model initialisation only (and everything in insecure mode)
    insecure_fast_noise: bool = False  # seeded noise + sampling: NOT private, experiments only
    engine: str = "auto"  # "auto" | "ghost" | "vmap"
    eval_batch_size: int = 1024
    checkpoint_every_round: bool = True
    # How a frozen prefix's features ("scatter") are stored: "float32", or "float16" (half
    # the memory; each batch is converted back to float32 before the model sees it).
    feature_dtype: str = "float32"

    def validate(self) -> None:
        if is_user_model(self.model):
            check_import_path(self.model, "model")  # imported when the trainer builds it
        elif self.model not in MODEL_NAMES:
            raise ValueError(f"unknown model {self.model!r}; choose one of {MODEL_NAMES} or "
                             "a factory 'package.module:function'")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise ValueError(f"feature_dtype must be one of {FEATURE_DTYPES}, "
                             f"got {self.feature_dtype!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr}")
        if min(self.batch_size, self.local_steps, self.planned_rounds,
               self.min_block_records) < 1:
            raise ValueError("batch_size, local_steps, planned_rounds and min_block_records "
                             "must be >= 1")
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
        if not 0 < self.clip_target_quantile < 1:
            raise ValueError(f"clip_target_quantile must be in (0, 1), "
                             f"got {self.clip_target_quantile}")
        if not (self.clip_learning_rate > 0 and math.isfinite(self.clip_learning_rate)):
            raise ValueError(f"clip_learning_rate must be positive, got {self.clip_learning_rate}")
        if self.clip_count_stddev is not None and not (
                self.clip_count_stddev > 0 and math.isfinite(self.clip_count_stddev)):
            raise ValueError(f"clip_count_stddev must be positive, got {self.clip_count_stddev}")
        if self.clip_adaptive and self.noise == "group":
            raise ValueError("clip_adaptive is refused with noise = 'group': every member of a "
                             "group release must clip to the one C its noise is calibrated to "
                             "(docs/privacy.md, \"Adaptive clipping\")")
        if self.noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {self.noise!r}")
        if self.noise == "group" and (not self.dp or self.noise_multiplier is None):
            raise ValueError("noise = 'group' needs dp = true and the network-wide "
                             "noise_multiplier (sigma_eff): every member must draw at one sigma")
        if self.honest_min < 2:
            raise ValueError(f"honest_min must be >= 2, got {self.honest_min}")
        if self.budget_epsilon is not None and not self.budget_epsilon > 0:
            raise ValueError(f"budget_epsilon must be > 0, got {self.budget_epsilon}")
        TopK(self.topk_fraction)  # validates the fraction
        if self.averaging_topk_fraction is not None:
            TopK(self.averaging_topk_fraction)
        strategy = strategy_class(self.share)
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {tuple(ACCOUNTANTS)}, "
                             f"got {self.accountant!r}")
        if not 0 <= self.averaging_rounds < self.planned_rounds:
            raise ValueError("averaging_rounds must be in 0..planned_rounds-1")
        if self.averaging_rounds and not strategy.needs_common_init:
            raise ValueError(f"averaging_rounds needs a share mode that averages models, "
                             f"not {self.share!r}")
