"""Fixed, data-independent image features: the 2-D scattering transform (kymatio).

Tramèr & Boneh (ICLR 2021, "Differentially Private Learning Needs Better Features") train a
linear model with DP-SGD on ScatterNet features (J = 2, L = 8 wavelets; 81 channels of 7x7
for a 28x28 image). The transform is a fixed filter bank: it has no trainable parameters and
is computed from one example alone, so it costs no privacy. The features are then normalised
*per example* (GroupNorm without affine parameters, their data-independent variant): no
statistic is taken over other records, so per-example gradients and the DP analysis are
unchanged.

Why the import is indirect: ``kymatio.torch`` (and ``kymatio.Scattering2D(frontend="torch")``)
also import the 3-D frontend, whose filter bank imports ``scipy.special.sph_harm``, removed in
SciPy 1.17. The 2-D frontend itself does not need it, so it is imported from its own module.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SCATTER_J = 2
SCATTER_L = 8
#: Groups of the per-example GroupNorm (Tramèr & Boneh use 27 for 81 grey-scale channels).
SCATTER_GROUPS = 27


class FeatureError(ImportError):
    """The scattering transform is unavailable (kymatio missing or incompatible)."""


def scatter_channels(in_channels: int = 1, j: int = SCATTER_J, angles: int = SCATTER_L) -> int:
    """Output channels of a second-order scattering transform: 1 + JL + L^2 J(J-1)/2 each."""
    return in_channels * (1 + j * angles + angles * angles * j * (j - 1) // 2)


def _scattering_class() -> type[nn.Module]:
    try:
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise FeatureError(f"the scatter model needs kymatio 0.3 (pip install kymatio): {exc}"
                           ) from exc
    return ScatteringTorch2D


class ScatterFeatures(nn.Module):
    """[B, C, H, W] images -> [B, C*K, H/2^J, W/2^J] per-example normalised scattering features.

    Parameter-free: the filters are buffers, and GroupNorm has ``affine=False``. Every output
    row depends only on its own input row.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        in_channels: int = 1,
        j: int = SCATTER_J,
        groups: int | None = SCATTER_GROUPS,
    ) -> None:
        super().__init__()
        self.scattering = _scattering_class()(J=j, shape=tuple(shape), L=SCATTER_L)
        self.channels = scatter_channels(in_channels, j)
        self.out_hw = (math.ceil(shape[0] / 2**j), math.ceil(shape[1] / 2**j))
        # eps as in torch's default; groups=None: raw features (no normalisation).
        self.norm = (nn.GroupNorm(groups, self.channels, affine=False) if groups
                     else nn.Identity())
        for buffer in self.buffers():
            buffer.requires_grad_(False)

    @property
    def out_features(self) -> int:
        return self.channels * self.out_hw[0] * self.out_hw[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        features = self.scattering(x.contiguous())  # [B, C, K, h, w]
        features = features.reshape(batch, self.channels, *features.shape[-2:])
        return self.norm(features)


@torch.no_grad()
def compute_features(
    module: ScatterFeatures, x: torch.Tensor, chunk: int = 256
) -> torch.Tensor:
    """Features of ``x`` flattened to [N, out_features], in chunks (bounded peak memory)."""
    out = torch.empty(x.shape[0], module.out_features, dtype=torch.float32)
    for start in range(0, x.shape[0], chunk):
        out[start : start + chunk] = module(x[start : start + chunk]).reshape(
            min(chunk, x.shape[0] - start), -1)
    return out
