"""DP-SGD: per-example clipping, secure Gaussian noise, Poisson sampling.

One private step on a batch B drawn by Poisson sampling (each record independently with
probability q) computes

    g = ( sum_{i in B} clip_C(grad_i) + N(0, sigma^2 C^2 I) ) / (q * N)

where ``clip_C(v) = v * min(1, C / ||v||)`` over the *whole* flattened per-example gradient.
Dividing by the expected batch size ``q * N`` (not the realised one) keeps the sensitivity
of the released sum at exactly C, which is what the RDP accountant assumes.

Two engines compute ``sum_i clip_C(grad_i)``:

* :class:`GhostClipEngine` (default when the model allows it). One forward pass records each
  trainable layer's input ``a``; one backward pass (``torch.autograd.grad`` to the layer
  outputs, so autograd skips the weight gradients it would otherwise compute) yields each
  layer's output gradient ``b``. Per-example norms come from ``a`` and ``b`` directly: for a
  linear layer ``||b_i a_i^T||^2 = ||a_i||^2 ||b_i||^2`` (never materialised); for a
  convolution the per-example weight gradients are one batched matmul over unfolded patches,
  which is cheap because convolutions hold few parameters. The clipped sum is then one
  weighted matmul per layer, the same work as an ordinary weight gradient. The step therefore
  costs about one forward + one backward, like plain SGD.
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
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from peer.training.adaptive_clip import AdaptiveClip
from peer.training.audit_hook import AuditHook, noise_scale_of
from peer.training.clipping import ClippedGradient, UnsupportedModelError, clip_factors
from peer.training.clipping import row_sq_norms as _row_sq_norms
from peer.training.clipping import trainable_params as _trainable
from peer.training.clipping import zero_rows as _zero_rows
from peer.training.privacy.noise import GaussianSource, SecureGaussian, secure_bernoulli_mask


def _patch_index(
    layer: nn.Conv2d, channels: int, padded_hw: tuple[int, int], out_hw: tuple[int, int]
) -> torch.Tensor:
    """Flat positions into one padded example that form its im2col matrix, [T, K] order.

    T = (out_row, out_col) positions, K = (channel, kernel_row, kernel_col) which matches the
    flattening order of ``layer.weight``.
    """
    height, width = padded_hw
    out_h, out_w = out_hw
    kernel_h, kernel_w = layer.kernel_size
    stride_h, stride_w = layer.stride
    dil_h, dil_w = layer.dilation
    out_row = torch.arange(out_h).view(out_h, 1, 1, 1, 1) * stride_h
    out_col = torch.arange(out_w).view(1, out_w, 1, 1, 1) * stride_w
    channel = torch.arange(channels).view(1, 1, channels, 1, 1) * (height * width)
    k_row = torch.arange(kernel_h).view(1, 1, 1, kernel_h, 1) * dil_h
    k_col = torch.arange(kernel_w).view(1, 1, 1, 1, kernel_w) * dil_w
    return (channel + (out_row + k_row) * width + out_col + k_col).reshape(-1)


@dataclass(frozen=True)
class _LayerTerms:
    """What pass 2 of GhostClipEngine.clipped_sum needs of one layer.

    "linear" (a Linear on [B, in] inputs): first = the inputs a, second = the output
    gradients b (the weight gradient of example i is b_i a_i^T, never materialised).
    "dense": first = the per-example weight gradients as [B, weight numel] rows, second =
    the per-example bias gradients (None without a trainable bias).
    """

    kind: str
    first: torch.Tensor
    second: torch.Tensor | None


class GhostClipEngine:
    """Clipped per-example gradient sums for models of Linear / Conv2d + parameter-free layers.

    Exact (not an approximation): it computes the same clipped sum as materialising every
    per-example gradient, checked against :class:`VmapEngine` in the tests.
    Not thread-safe for concurrent calls on one instance (it stashes activations while a
    call runs); one trainer owns one engine.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._layers: list[nn.Module] = []
        owned: set[int] = set()
        for module in model.modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if isinstance(module, nn.Conv2d):
                if module.groups != 1 or module.padding_mode != "zeros":
                    raise UnsupportedModelError("Conv2d with groups or non-zero padding mode")
                if isinstance(module.padding, str):
                    raise UnsupportedModelError("Conv2d with string padding")
            elif not isinstance(module, nn.Linear):
                raise UnsupportedModelError(f"no per-example rule for {type(module).__name__}")
            self._layers.append(module)
            owned.update(id(p) for p in own)
        params = _trainable(model)
        if any(id(p) not in owned for p in params):
            raise UnsupportedModelError("model has trainable parameters outside Linear/Conv2d")
        self._params = params
        self._param_count = sum(p.numel() for p in params)
        self._inputs: list[torch.Tensor | None] = [None] * len(self._layers)
        self._outputs: list[torch.Tensor | None] = [None] * len(self._layers)
        self._capturing = False
        self._patch_indices: dict[tuple[int, int, int, int], torch.Tensor] = {}
        for index, layer in enumerate(self._layers):
            layer.register_forward_hook(self._make_hook(index))

    def _patches(self, layer: nn.Conv2d, a: torch.Tensor, out_hw: torch.Size) -> torch.Tensor:
        """im2col of a batch in [B, T, K] layout, ready for ``bmm``.

        One ``index_select`` with a cached index: measured about 2x faster on CPU than
        ``F.unfold`` or strided-view copies for the CNN's shapes, and the [B, T, K] layout
        makes the following bmm about 2x faster than unfold's [B, K, T].
        """
        pad_h, pad_w = layer.padding  # type: ignore[misc]
        if pad_h or pad_w:
            a = F.pad(a, (pad_w, pad_w, pad_h, pad_h))
        batch, channels, height, width = a.shape
        key = (id(layer), channels, height, width)
        index = self._patch_indices.get(key)
        if index is None:
            index = _patch_index(layer, channels, (height, width), (out_hw[0], out_hw[1]))
            self._patch_indices[key] = index
        flat = a.reshape(batch, -1).index_select(1, index)
        return flat.view(batch, out_hw[0] * out_hw[1], -1)

    def _make_hook(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self._capturing:
                self._inputs[index] = inputs[0].detach()
                self._outputs[index] = output

        return hook

    def clipped_sum(
        self, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float
    ) -> ClippedGradient:
        batch = x.shape[0]
        flat = torch.zeros(self._param_count, dtype=torch.float32)
        if batch == 0:
            return ClippedGradient(flat, torch.zeros(0), 0)
        inputs, out_grads = self._capture(x, y)
        # Pass 1: per-example squared norms, layer by layer, without a Python loop per example.
        sq_norms = torch.zeros(batch, dtype=torch.float32)
        saved = [self._layer_norms(layer, a, b, sq_norms)
                 for layer, a, b in zip(self._layers, inputs, out_grads, strict=True)]
        norms = sq_norms.sqrt_()
        factors = clip_factors(norms, max_grad_norm)
        finite = torch.isfinite(norms)
        if not bool(finite.all()):  # rare: drop the overflowed examples' rows entirely
            saved = [_LayerTerms(terms.kind, _zero_rows(terms.first, finite),
                                 None if terms.second is None
                                 else _zero_rows(terms.second, finite))
                     for terms in saved]
        # Pass 2: weighted sums straight into the flat output vector.
        self._weighted_sums(flat, saved, factors)
        return ClippedGradient(flat, norms, batch)

    def _capture(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[list[torch.Tensor | None], tuple[torch.Tensor, ...]]:
        """One forward pass with the hooks on: every layer's input, and the gradient of the
        summed loss with respect to every layer's output (b_i is example i's gradient)."""
        self._capturing = True
        try:
            logits = self.model(x)
        finally:
            self._capturing = False
        loss = F.cross_entropy(logits, y, reduction="sum")  # sum: b_i is example i's gradient
        outputs = [o for o in self._outputs if o is not None]
        if len(outputs) != len(self._layers):
            raise UnsupportedModelError("a trainable layer did not run in forward()")
        out_grads = torch.autograd.grad(loss, outputs)
        inputs = self._inputs
        self._inputs = [None] * len(self._layers)
        self._outputs = [None] * len(self._layers)
        return inputs, out_grads

    def _layer_norms(
        self, layer: nn.Module, a: torch.Tensor | None, b: torch.Tensor, sq_norms: torch.Tensor
    ) -> _LayerTerms:
        """Add one layer's per-example squared gradient norms to ``sq_norms`` (in place) and
        return what pass 2 needs of it to form the weighted sum."""
        assert a is not None
        batch = sq_norms.shape[0]
        has_bias = layer.bias is not None and layer.bias.requires_grad
        if isinstance(layer, nn.Linear) and a.dim() == 2:
            b_sq = b.pow(2).sum(1)
            # b_i = 0 with a finite a_i is an exact zero gradient: keep a huge a_i's overflowed
            # square (inf * 0) from making it NaN. An a_i that holds inf itself stays NaN, so
            # the example is dropped, as the per-example engine drops it (its b_i a_i^T is NaN).
            exact_zero = (b_sq == 0) & torch.isfinite(a).all(1)
            sq_norms.add_(a.pow(2).sum(1).mul_(b_sq).masked_fill_(exact_zero, 0.0))
            if has_bias:
                sq_norms.add_(b_sq)
            return _LayerTerms("linear", a, b)
        if isinstance(layer, nn.Linear):
            # Sequence-shaped input: materialise the per-example weight gradient.
            a3 = a.reshape(batch, -1, a.shape[-1])
            b3 = b.reshape(batch, -1, b.shape[-1])
            per_w = torch.bmm(b3.transpose(1, 2), a3)
            bias_sum = b3.sum(1) if has_bias else None
        else:
            b3 = b.reshape(batch, b.shape[1], -1)  # [B, Cout, T]
            patches = self._patches(layer, a, b.shape[-2:])  # [B, T, Cin*kh*kw]
            per_w = torch.bmm(b3, patches)  # [B, Cout, Cin*kh*kw]
            bias_sum = b3.sum(2) if has_bias else None
        sq_norms.add_(_row_sq_norms(per_w))
        if bias_sum is not None:
            sq_norms.add_(bias_sum.pow(2).sum(1))
        return _LayerTerms("dense", per_w.reshape(batch, -1), bias_sum)

    def _weighted_sums(
        self, flat: torch.Tensor, saved: list[_LayerTerms], factors: torch.Tensor
    ) -> None:
        """Write sum_i factor_i * g_i of every layer into its slice of ``flat``."""
        offset = 0
        for layer, terms in zip(self._layers, saved, strict=True):
            w_numel = layer.weight.numel()
            w_out = flat[offset : offset + w_numel]
            if terms.kind == "linear":
                scaled_b = terms.second * factors[:, None]  # type: ignore[operator]
                torch.mm(scaled_b.t(), terms.first, out=w_out.view(layer.weight.shape))
                bias_value = scaled_b.sum(0)
            else:
                torch.mv(terms.first.t(), factors, out=w_out)
                bias_value = (None if terms.second is None
                              else torch.mv(terms.second.t(), factors))
            offset += w_numel
            if layer.bias is not None and layer.bias.requires_grad:
                b_numel = layer.bias.numel()
                assert bias_value is not None
                flat[offset : offset + b_numel].copy_(bias_value)
                offset += b_numel


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
        self, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float
    ) -> ClippedGradient:
        count = sum(p.numel() for p in _trainable(self.model))
        if x.shape[0] == 0:
            return ClippedGradient(torch.zeros(count), torch.zeros(0), 0)
        per_example = self.per_example_flat(x, y)
        norms = per_example.norm(dim=1)
        factors = clip_factors(norms, max_grad_norm)
        finite = torch.isfinite(norms)
        if not bool(finite.all()):
            per_example = _zero_rows(per_example, finite)
        return ClippedGradient(per_example.t().mv(factors), norms, x.shape[0])


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

    def _clipped(self, x: torch.Tensor, y: torch.Tensor) -> ClippedGradient:
        clipped = self.engine.clipped_sum(x, y, self.clip_norm)
        if self.audit is not None:
            self.audit.add_canaries(clipped.flat_sum)
        return clipped

    def private_gradient(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The flat private gradient for one batch (already divided by the expected size)."""
        clip_norm = self.clip_norm  # C_t: the clipping and the noise scale of this step
        clipped = self._clipped(x, y)
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
        flat = self.private_gradient(x, y)
        offset = 0
        for p in _trainable(self.model):
            numel = p.numel()
            p.grad = flat[offset : offset + numel].view_as(p)
            offset += numel
