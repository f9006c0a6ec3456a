"""DP-SGD: per-example clipping, secure Gaussian noise, Poisson sampling.

One private step on a batch B drawn by Poisson sampling (each record independently with
probability q) computes

    g = ( sum_{i in B} clip_C(grad_i) + N(0, sigma^2 C^2 I) ) / (q * N)

where ``clip_C(v) = v * min(1, C / ||v||)`` over the *whole* flattened per-example gradient.
Dividing by the expected batch size ``q * N`` (not the realised one) keeps the sensitivity
of the released sum at exactly C, which is what the RDP accountant assumes.

Two engines compute ``sum_i clip_C(grad_i)``:

* :class:`GhostClipEngine` (default when the model allows it; peer/training/ghost_engine.py):
  per-example norms from each layer's input and output gradient, one forward and one
  backward pass, about the cost of plain SGD.
* :class:`VmapEngine`: ``torch.func.vmap(grad(...))`` over any model, kept as the general
  fallback and as the reference the fast engine is tested against.

Security property: the clipped sum has L2 sensitivity C with respect to adding or removing
one record. An example whose gradient norm is not finite (an overflow: inf or NaN) cannot be
scaled to norm C, so it gets clip factor 0 and contributes nothing; that choice depends on
the example's own gradient only, so every example still contributes a vector of norm <= C,
and one NaN can never spread into the step. The noise comes from
:class:`peer.training.privacy.noise.SecureGaussian` (os.urandom)
unless the caller explicitly passes the insecure experiment source.

Adaptive clipping (adaptive_clip.py) changes only :class:`DPSGDStep`: it clips to the current
C_t, draws the gradient noise at sigma_delta * C_t, releases the noised count and divides the
gradient by C_t as well; both engines take C as their argument, so they need nothing new.

The clipping primitives both engines share live in peer/training/clipping.py, the audit hook
in peer/training/audit_hook.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from peer.training.adaptive_clip import AdaptiveClip
from peer.training.audit_hook import AuditHook, noise_scale_of
from peer.training.clipping import (
    ClippedGradient,
    UnsupportedModelError,
    clip_factors,
    output_vector,
)
from peer.training.clipping import trainable_params as _trainable
from peer.training.clipping import zero_rows as _zero_rows
from peer.training.ghost_engine import GhostClipEngine
from peer.training.privacy.noise import GaussianSource, SecureGaussian, secure_bernoulli_mask

__all__ = [
    "AuditHook", "ClippedGradient", "DPSGDStep", "GhostClipEngine", "UnsupportedModelError",
    "VmapEngine", "clip_factors", "make_engine", "poisson_batch",
]


class VmapEngine:
    """Clipped per-example gradient sums for any model via ``torch.func.vmap(grad(...))``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]

        def example_loss(
            params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
        ) -> torch.Tensor:
            logits = functional_call(self.model, params, (x.unsqueeze(0),))
            return F.cross_entropy(logits, y.unsqueeze(0))

        self._per_example_grads = vmap(grad(example_loss), in_dims=(None, 0, 0))

    def per_example_flat(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Every example's full gradient as rows of a [batch, param_count] matrix."""
        params = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        grads = self._per_example_grads(params, x, y)
        return torch.cat([grads[n].reshape(x.shape[0], -1) for n in self._names], dim=1)

    def clipped_sum(
        self, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float,
        out: torch.Tensor | None = None,
    ) -> ClippedGradient:
        """As :meth:`GhostClipEngine.clipped_sum`: written into ``out`` when one is given."""
        flat = output_vector(out, sum(p.numel() for p in _trainable(self.model)))
        if x.shape[0] == 0:
            return ClippedGradient(flat.zero_(), torch.zeros(0), 0)
        per_example = self.per_example_flat(x, y)
        norms = per_example.norm(dim=1)
        factors = clip_factors(norms, max_grad_norm)
        finite = torch.isfinite(norms)
        if not bool(finite.all()):
            per_example = _zero_rows(per_example, finite)
        return ClippedGradient(torch.mv(per_example.t(), factors, out=flat), norms, x.shape[0])


def make_engine(model: nn.Module, engine: str = "auto") -> GhostClipEngine | VmapEngine:
    """``"ghost"``, ``"vmap"`` or ``"auto"`` (ghost when the model allows it)."""
    if engine == "vmap":
        return VmapEngine(model)
    if engine == "ghost":
        return GhostClipEngine(model)
    if engine != "auto":
        raise ValueError(f"unknown DP engine {engine!r}")
    try:
        return GhostClipEngine(model)
    except UnsupportedModelError:
        return VmapEngine(model)


def poisson_batch(
    n: int, sample_rate: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices of a Poisson-sampled batch: each of ``n`` records independently with rate q.

    This is the sampling the RDP accountant analyses. Without a ``generator`` the membership
    draws come from the secure source (amplification by subsampling assumes the batch is
    secret); a seeded generator is for reproducible experiments only and weakens that
    assumption.
    """
    if generator is None:
        mask = secure_bernoulli_mask(n, sample_rate)
    else:
        mask = torch.rand(n, generator=generator) < sample_rate
    return mask.nonzero().flatten()


@dataclass
class DPSGDStep:
    """Turns a batch into a private gradient written into the model's ``.grad`` fields.

    ``step(x, y)`` leaves ``p.grad`` = (clipped sum + N(0, sigma^2 C^2)) / expected_batch for
    every trainable parameter; the caller's optimizer then takes its ordinary step (any
    optimizer is post-processing of this private gradient). With ``adaptive`` the step clips
    to its current C_t, adds N(0, sigma_delta^2 C_t^2) and then releases the count that moves
    C (adaptive_clip.py): together one Gaussian mechanism at sigma.
    """

    model: nn.Module
    noise_multiplier: float
    max_grad_norm: float
    expected_batch_size: float
    noise: GaussianSource
    engine: GhostClipEngine | VmapEngine
    audit: AuditHook | None = None  #: audit only (peer/training/audit_hook.py)
    adaptive: AdaptiveClip | None = None  #: adaptive clipping state (None: C fixed)
    # step()'s gradient: one flat vector reused every step, each parameter's .grad a view
    # of its slice (built on the first step; every entry is overwritten by each step, so a
    # .grad kept past the next step holds that step's gradient: copy it to keep it).
    _grads: tuple[torch.Tensor, list[tuple[nn.Parameter, torch.Tensor]]] | None = field(
        default=None, init=False, repr=False)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        noise: GaussianSource | None = None,
        engine: str = "auto",
        audit: AuditHook | None = None,
        adaptive: AdaptiveClip | None = None,
    ) -> DPSGDStep:
        if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
        if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if expected_batch_size <= 0:
            raise ValueError(f"expected batch size must be positive, got {expected_batch_size}")
        if adaptive is not None:  # the noise split before any step can use it
            adaptive.retune(noise_multiplier, expected_batch_size)
        return cls(
            model=model,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            noise=noise if noise is not None else SecureGaussian(),
            engine=make_engine(model, engine),
            audit=audit,
            adaptive=adaptive,
        )

    def retune(self, noise_multiplier: float, expected_batch_size: float) -> None:
        """Use another block's noise multiplier and expected batch size from the next step.

        One step object serves every block of a trainer: its engine hooks the model's layers,
        and a second engine on the same model would hook them twice.
        """
        if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if not (expected_batch_size > 0 and math.isfinite(expected_batch_size)):
            raise ValueError(f"expected batch size must be positive, got {expected_batch_size}")
        if self.adaptive is not None:  # first: a refused split must leave the step unchanged
            self.adaptive.retune(noise_multiplier, expected_batch_size)
        self.noise_multiplier = noise_multiplier
        self.expected_batch_size = expected_batch_size

    @property
    def clip_norm(self) -> float:
        """The C the next step clips to: the adaptive C_t, else ``max_grad_norm``."""
        return self.max_grad_norm if self.adaptive is None else self.adaptive.clip_norm

    @property
    def noise_scale(self) -> float:
        """The factor on the noise's standard deviation: 1 unless an audit weakens it."""
        return noise_scale_of(self.audit)

    def clipped_sum(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The flat sum of the batch's clipped per-example gradients (with an audit's canaries
        added, when one is attached), before noise."""
        return self._clipped(x, y).flat_sum

    def _clipped(self, x: torch.Tensor, y: torch.Tensor,
                 out: torch.Tensor | None = None) -> ClippedGradient:
        clipped = self.engine.clipped_sum(x, y, self.clip_norm, out=out)
        if self.audit is not None:
            self.audit.add_canaries(clipped.flat_sum)
        return clipped

    def private_gradient(self, x: torch.Tensor, y: torch.Tensor,
                         out: torch.Tensor | None = None) -> torch.Tensor:
        """The flat private gradient for one batch (already divided by the expected size),
        written into ``out`` when one is given (a float32 vector of every trainable
        parameter; each entry is overwritten)."""
        clip_norm = self.clip_norm  # C_t: the clipping and the noise scale of this step
        clipped = self._clipped(x, y, out)
        flat = clipped.flat_sum
        multiplier = (self.noise_multiplier if self.adaptive is None
                      else self.adaptive.value_multiplier)
        std = multiplier * clip_norm * self.noise_scale
        if std > 0:
            flat.add_(self.noise.sample(flat.numel()), alpha=std)
        divisor = self.expected_batch_size
        if self.adaptive is not None:
            self.adaptive.observe(clipped.per_example_norms, self.noise, self.noise_scale)
            # Also divided by C_t, so a step's length does not follow C (post-processing).
            divisor *= clip_norm
        return flat.mul_(1.0 / divisor)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self._grads is None:
            params = _trainable(self.model)
            flat = torch.empty(sum(p.numel() for p in params), dtype=torch.float32)
            views, offset = [], 0
            for p in params:
                views.append((p, flat[offset : offset + p.numel()].view_as(p)))
                offset += p.numel()
            self._grads = (flat, views)
        flat, views = self._grads
        self.private_gradient(x, y, out=flat)
        for p, view in views:
            p.grad = view
