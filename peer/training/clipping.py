"""Per-example clipping primitives shared by the DP-SGD engines (peer/training/dpsgd.py).

Security property: :func:`clip_factors` scales each example by a factor that depends on that
example's norm alone and drops a non-finite one, so a clipped sum changes by at most C when
one record is added or removed (docs/privacy.md, "Why clip, and what keeps a gradient finite").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peer.errors import PeerError

_CLIP_EPS = 1e-6  # keeps the clip factor finite for a zero gradient; factor stays <= 1


class UnsupportedModelError(PeerError, ValueError):
    """The fast engine cannot compute exact per-example gradients for this model."""


@dataclass(frozen=True)
class ClippedGradient:
    """Sum of clipped per-example gradients as one flat vector, plus diagnostics."""

    flat_sum: torch.Tensor  # [param_count] float32, in model.parameters() order
    per_example_norms: torch.Tensor  # [batch] norms *before* clipping (inf/NaN: dropped)
    batch_size: int


def trainable_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Per-example scale ``min(1, C / (norm + eps))``, and 0 where the norm is inf or NaN.

    A clipped norm is always <= C: a gradient whose norm overflowed cannot be scaled to C
    (C / NaN is NaN), so it is dropped instead. Each factor depends on that example's norm
    alone, which keeps the clipped sum's sensitivity to one record at C (docs/privacy.md,
    "Why clip, and what keeps a gradient finite").
    """
    factors = (max_grad_norm / (norms + _CLIP_EPS)).clamp_(max=1.0)
    return factors.masked_fill_(~torch.isfinite(norms), 0.0)


def zero_rows(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``values`` with every example row (dim 0) not in ``keep`` set to 0: a dropped
    example's inf or NaN would otherwise survive its zero factor (0 * inf = NaN)."""
    mask = keep.view(-1, *([1] * (values.dim() - 1)))
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype))


def output_vector(out: torch.Tensor | None, count: int) -> torch.Tensor:
    """The vector a clipped sum is written into: ``out``, once checked to be a contiguous
    float32 vector of ``count`` entries (the engines write every entry of exactly that), or a
    new one."""
    if out is None:
        return torch.empty(count, dtype=torch.float32)
    if (out.dim() != 1 or out.numel() != count or out.dtype != torch.float32
            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous float32 vector of {count} entries, got "
                         f"{out.dtype} of shape {tuple(out.shape)}")
    return out


def row_sq_norms(per_example: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each example's slice, in one fused kernel (no squared copy)."""
    return torch.linalg.vector_norm(per_example.reshape(per_example.shape[0], -1), dim=1).square_()
