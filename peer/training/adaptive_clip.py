"""Adaptive clipping: a clipping norm that follows a quantile of the gradient norms privately.

Andrew, Thakkar, McMahan & Ramaswamy, "Differentially Private Learning with Adaptive
Clipping" (NeurIPS 2021), with the geometric update. At each private step with norm C_t the
peer releases, beside the noised gradient sum, the centred count of unclipped examples
``K = sum_i (1[||g_i|| <= C_t] - 1/2) + N(0, sigma_b^2)`` and moves
``C_{t+1} = C_t * exp(-eta * (K / m + 1/2 - gamma))``.

Security property: the gradient sum (sensitivity C_t, noise sigma_delta * C_t) and the count
(sensitivity 1/2, noise sigma_b) together are one Gaussian mechanism of multiplier sigma when
``sigma_delta = (sigma^-2 - (2 sigma_b)^-2)^-1/2`` (docs/privacy.md, "Adaptive clipping"), so
the ledger records the same event as without adaptive clipping. C_t is a function of released
counts only (post-processing). The count's noise comes from the step's own GaussianSource.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from peer.training.config import TrainerConfig
from peer.training.import_path import is_user_model
from peer.training.privacy.noise import GaussianSource

#: C stays in this range: a bound on a function of released values, only to keep it a float.
CLIP_NORM_RANGE: tuple[float, float] = (1e-6, 1e6)
#: The paper's count noise is m/20 (b~ accurate to +-0.05); at large sigma it is raised to
#: ``COUNT_NOISE_PER_SIGMA * sigma`` so the gradient noise grows by at most 1/sqrt(1 - 1/16).
PAPER_COUNT_NOISE_FRACTION = 0.05
COUNT_NOISE_PER_SIGMA = 2.0


def adaptive_clipping_on(config: TrainerConfig) -> bool:
    """Whether a trainer of ``config`` clips adaptively: ``clip_adaptive`` when set; unset,
    on for a user model ("package.module:factory") and off for the built-in recipes (whose C
    is tuned) and under group noise (where adaptive clipping is refused)."""
    if not config.dp:
        return False
    if config.clip_adaptive is not None:
        return config.clip_adaptive
    return is_user_model(config.model) and config.noise != "group"


def value_noise_multiplier(sigma: float, count_stddev: float) -> float:
    """sigma_delta: the gradient sum's multiplier that, with the centred count at
    ``count_stddev``, makes one Gaussian mechanism of multiplier ``sigma``.

    Raises ValueError unless ``2 * count_stddev > sigma`` (otherwise the count alone would
    spend more than sigma allows). ``sigma = 0`` (no noise) gives 0.
    """
    if sigma == 0:
        return 0.0
    if not 2 * count_stddev > sigma:
        raise ValueError(f"clip_count_stddev {count_stddev:g} is too small for noise "
                         f"multiplier {sigma:g}: it must exceed sigma / 2 = {sigma / 2:g}")
    return (sigma ** -2 - (2 * count_stddev) ** -2) ** -0.5


def default_count_stddev(sigma: float, expected_batch_size: float) -> float:
    """sigma_b when unset: the paper's m/20, at least 2 sigma (see the module constants)."""
    return max(PAPER_COUNT_NOISE_FRACTION * expected_batch_size, COUNT_NOISE_PER_SIGMA * sigma)


def next_clip_norm(clip_norm: float, unclipped_fraction: float, target_quantile: float,
                   learning_rate: float) -> float:
    """The geometric update ``C * exp(-eta * (b - gamma))``, kept in :data:`CLIP_NORM_RANGE`.

    More examples unclipped than the target (b > gamma) shrinks C; fewer grows it.
    """
    low, high = CLIP_NORM_RANGE
    step = -learning_rate * (unclipped_fraction - target_quantile)
    return min(high, max(low, clip_norm * math.exp(step)))


def centred_unclipped_count(norms: torch.Tensor, clip_norm: float) -> float:
    """``sum_i (1[norm_i <= C] - 1/2)``: each example adds +-1/2 (sensitivity 1/2). A norm
    that is not finite counts as clipped, as the clipped sum weights it 0.

    The 1/2 is subtracted per sampled example (the actual batch size), not m/2 once: that is
    what makes one record's contribution +-1/2. ``sum_i 1[...] - m/2`` would move by 0 or 1
    when a record is added, sensitivity 1, and the split below would no longer hold.
    """
    unclipped = int((norms <= clip_norm).sum())  # NaN compares False: clipped
    return unclipped - 0.5 * int(norms.numel())


@dataclass
class AdaptiveClip:
    """The adaptive clipping state of one DP-SGD step object: the current norm C_t and the
    noise split for the current sigma and expected batch size.

    ``observe`` releases one noised count (from the caller's secure source) and moves C; the
    caller must add the gradient noise at :attr:`value_multiplier` * C_t, with C_t read
    *before* ``observe``.
    """

    clip_norm: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_stddev_setting: float | None = None  #: None: :func:`default_count_stddev`
    value_multiplier: float = 0.0  #: sigma_delta, set by :meth:`retune`
    count_stddev: float = 0.0  #: sigma_b, set by :meth:`retune`
    expected_batch_size: float = 1.0

    @classmethod
    def from_config(cls, config: TrainerConfig) -> AdaptiveClip:
        return cls(clip_norm=config.max_grad_norm,
                   target_quantile=config.clip_target_quantile,
                   learning_rate=config.clip_learning_rate,
                   count_stddev_setting=config.clip_count_stddev)

    def retune(self, sigma: float, expected_batch_size: float) -> None:
        """Split the noise for target multiplier ``sigma`` at expected batch size m."""
        count = (default_count_stddev(sigma, expected_batch_size)
                 if self.count_stddev_setting is None else self.count_stddev_setting)
        self.value_multiplier = value_noise_multiplier(sigma, count)
        self.count_stddev = count if sigma > 0 else 0.0
        self.expected_batch_size = expected_batch_size

    def observe(self, norms: torch.Tensor, noise: GaussianSource,
                noise_scale: float = 1.0) -> float:
        """Release the noised fraction of unclipped examples of one batch and move C to
        C_{t+1}; returns the released fraction b~."""
        count = centred_unclipped_count(norms, self.clip_norm)
        std = self.count_stddev * noise_scale
        if std > 0:
            count += std * float(noise.sample(1)[0])
        fraction = count / self.expected_batch_size + 0.5
        self.clip_norm = next_clip_norm(self.clip_norm, fraction, self.target_quantile,
                                        self.learning_rate)
        return fraction
