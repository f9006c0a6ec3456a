"""The fast DP-SGD engine: exact clipped per-example gradient sums for Linear / Conv2d models.

One forward pass records each trainable layer's input ``a``; one backward pass
(``torch.autograd.grad`` to the layer outputs, so autograd skips the weight gradients it would
otherwise compute) yields each layer's output gradient ``b``. Per-example norms come from ``a``
and ``b`` directly: for a linear layer ``||b_i a_i^T||^2 = ||a_i||^2 ||b_i||^2`` (never
materialised); for a convolution the per-example weight gradients are one batched matmul over
unfolded patches, which is cheap because convolutions hold few parameters. The clipped sum is
then one weighted matmul per layer, the same work as an ordinary weight gradient. The step
therefore costs about one forward + one backward, like plain SGD.

The large per-step buffers (the padded input, the unfolded patches and the per-example weight
gradients of each convolution) live in a :class:`Workspace` that the engine keeps between
steps. Allocating them afresh each step made glibc hand the pages back to the kernel and fault
them in again on the next step (about 900 page faults, 3.6 MB, per batch-64 CNN step), which
cost more than the arithmetic it fed (docs/privacy.md, "What a private step costs").

Security property: the clipped sum equals the one computed from materialised per-example
gradients (tested against :class:`peer.training.dpsgd.VmapEngine`), so its L2 sensitivity to
adding or removing one record is C. The workspace only holds intermediate values of the
current call; every entry a call reads was written earlier in that same call, or is a padding
border that is never written and stays zero. The engine refuses what would break the first
claim: when it is built, a model whose trainable parameters are not each layer's weight then
its bias, in the model's order (the layout of the vector it writes); at a step, a layer that
runs twice (its hooks keep one input and output per layer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from peer.training.clipping import (
    ClippedGradient,
    UnsupportedModelError,
    clip_factors,
    output_vector,
    row_sq_norms,
    trainable_params,
    zero_rows,
)


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


@dataclass
class Workspace:
    """Float32 buffers reused from one step to the next, one per (purpose, layer) key.

    ``take(key, shape)`` returns a contiguous view of ``shape`` into the key's buffer, which
    is replaced by one of exactly the request's size when a step needs more (a Poisson batch
    larger than any before: ever rarer as training goes on). A buffer is zeroed when it is
    made and only ever written through the views a call takes, so with ``same_geometry`` a
    region no call writes (a padding border) stays zero. The bytes held are at most those
    the largest batch seen allocated in its step; :attr:`held_bytes` reports them.
    """

    buffers: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    shapes: dict[tuple[str, int], tuple[int, ...]] = field(default_factory=dict)

    def take(self, key: tuple[str, int], shape: tuple[int, ...], *,
             same_geometry: bool = False) -> torch.Tensor:
        """A view of ``shape`` into ``key``'s buffer. ``same_geometry``: the buffer is also
        replaced when ``shape[1:]`` differs from the last request's, so a region only the
        other geometry wrote (a padding border) is never read as zero when it is not."""
        need = 1
        for size in shape:
            need *= size
        buffer = self.buffers.get(key)
        inner = shape[1:] if same_geometry else ()
        if buffer is None or buffer.numel() < need or self.shapes.get(key) != inner:
            buffer = torch.zeros(need, dtype=torch.float32)
            self.buffers[key] = buffer
            self.shapes[key] = inner
        return buffer[:need].view(shape)

    @property
    def held_bytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers.values())


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


@dataclass(frozen=True)
class _LayerSlices:
    """One layer's views into the flat output vector: the weight in its own shape and flat,
    and the bias (None without a trainable bias)."""

    weight: torch.Tensor
    weight_flat: torch.Tensor
    bias: torch.Tensor | None


class GhostClipEngine:
    """Clipped per-example gradient sums for models of Linear / Conv2d + parameter-free layers.

    Exact (not an approximation): it computes the same clipped sum as materialising every
    per-example gradient, checked against :class:`peer.training.dpsgd.VmapEngine` in the tests.
    Not thread-safe for concurrent calls on one instance (it stashes activations and reuses
    its workspace while a call runs); one trainer owns one engine.
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
        params = trainable_params(model)
        if any(id(p) not in owned for p in params):
            raise UnsupportedModelError("model has trainable parameters outside Linear/Conv2d")
        # The engine writes each layer's weight, then its trainable bias, one after the other
        # (_slices_of): that must be the model's trainable parameters, in their order.
        layout = []
        for layer in self._layers:
            layout.append(layer.weight)
            if layer.bias is not None and layer.bias.requires_grad:
                layout.append(layer.bias)
        if [id(p) for p in layout] != [id(p) for p in params]:
            raise UnsupportedModelError(
                "a layer's trainable parameters are not its weight then its bias (a frozen "
                "weight under a trained bias, a parameter shared between layers, or one a "
                "Linear/Conv2d subclass added)")
        self._params = params
        self._param_count = sum(p.numel() for p in params)
        self._inputs: list[torch.Tensor | None] = [None] * len(self._layers)
        self._outputs: list[torch.Tensor | None] = [None] * len(self._layers)
        self._capturing = False
        self._patch_indices: dict[tuple[int, int, int, int], torch.Tensor] = {}
        self.workspace = Workspace()
        self._slices: list[_LayerSlices] = []
        self._slices_key: tuple[int, int] | None = None
        for index, layer in enumerate(self._layers):
            layer.register_forward_hook(self._make_hook(index))

    def _patches(
        self, index: int, layer: nn.Conv2d, a: torch.Tensor, out_hw: torch.Size
    ) -> torch.Tensor:
        """im2col of a batch in [B, T, K] layout, ready for ``bmm``, in the workspace.

        One ``index_select`` with a cached index: measured about 2x faster on CPU than
        ``F.unfold`` or strided-view copies for the CNN's shapes, and the [B, T, K] layout
        makes the following bmm about 2x faster than unfold's [B, K, T].
        """
        pad_h, pad_w = layer.padding  # type: ignore[misc]
        batch, channels, height, width = a.shape
        if pad_h or pad_w:
            height, width = height + 2 * pad_h, width + 2 * pad_w
            padded = self.workspace.take(("pad", index), (batch, channels, height, width),
                                         same_geometry=True)
            padded[:, :, pad_h : height - pad_h, pad_w : width - pad_w].copy_(a)
            a = padded
        key = (id(layer), channels, height, width)
        patch_index = self._patch_indices.get(key)
        if patch_index is None:
            patch_index = _patch_index(layer, channels, (height, width), (out_hw[0], out_hw[1]))
            self._patch_indices[key] = patch_index
        # One patch buffer for every layer: a layer's patches are dead once its bmm is done.
        out = self.workspace.take(("patches", 0), (batch, patch_index.numel()))
        torch.index_select(a.reshape(batch, -1), 1, patch_index, out=out)
        return out.view(batch, out_hw[0] * out_hw[1], -1)

    def _make_hook(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self._capturing:
                if self._outputs[index] is not None:
                    # A second call would replace the first's input and output, and the
                    # per-example gradients would miss the first call's part.
                    raise UnsupportedModelError("a trainable layer ran twice in forward()")
                self._inputs[index] = inputs[0].detach()
                self._outputs[index] = output

        return hook

    def clipped_sum(
        self, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float,
        out: torch.Tensor | None = None,
    ) -> ClippedGradient:
        """The clipped sum of the batch's per-example gradients as one flat vector, written
        into ``out`` (a float32 vector of every trainable parameter, each entry overwritten)
        when one is given, else into a new one."""
        batch = x.shape[0]
        flat = output_vector(out, self._param_count)
        if batch == 0:
            return ClippedGradient(flat.zero_(), torch.zeros(0), 0)
        inputs, out_grads = self._capture(x, y)
        # Pass 1: per-example squared norms, layer by layer, without a Python loop per example.
        sq_norms = torch.zeros(batch, dtype=torch.float32)
        saved = [self._layer_norms(index, layer, a, b, sq_norms)
                 for index, (layer, a, b)
                 in enumerate(zip(self._layers, inputs, out_grads, strict=True))]
        norms = sq_norms.sqrt_()
        factors = clip_factors(norms, max_grad_norm)
        finite = torch.isfinite(norms)
        if not bool(finite.all()):  # rare: drop the overflowed examples' rows entirely
            saved = [_LayerTerms(terms.kind, zero_rows(terms.first, finite),
                                 None if terms.second is None
                                 else zero_rows(terms.second, finite))
                     for terms in saved]
        # Pass 2: weighted sums straight into the flat output vector.
        self._weighted_sums(self._slices_of(flat), saved, factors)
        return ClippedGradient(flat, norms, batch)

    def _slices_of(self, flat: torch.Tensor) -> list[_LayerSlices]:
        """Each layer's weight (in its own shape) and bias views into ``flat``, in parameter
        order; the views of the last vector asked for are kept, so a caller that passes the
        same ``out`` every step builds them once. ``flat`` is a contiguous float32 vector
        (:func:`output_vector`), so its address and length name the memory the views write;
        and the kept views hold that memory, so no other vector can be given its address
        while they are kept."""
        if self._slices_key != (flat.data_ptr(), flat.numel()):
            slices, offset = [], 0
            for layer in self._layers:
                weight = flat[offset : offset + layer.weight.numel()]
                offset += weight.numel()
                bias = None
                if layer.bias is not None and layer.bias.requires_grad:
                    bias = flat[offset : offset + layer.bias.numel()]
                    offset += bias.numel()
                slices.append(_LayerSlices(weight.view(layer.weight.shape), weight, bias))
            if offset != flat.numel():  # every entry must be written: flat may be reused
                raise ValueError(f"out has {flat.numel()} entries, the layers {offset}")
            self._slices, self._slices_key = slices, (flat.data_ptr(), flat.numel())
        return self._slices

    def _capture(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[list[torch.Tensor | None], tuple[torch.Tensor, ...]]:
        """One forward pass with the hooks on: every layer's input, and the gradient of the
        summed loss with respect to every layer's output (b_i is example i's gradient)."""
        # Empty slots first: a forward pass that raised may have left some filled.
        self._inputs = [None] * len(self._layers)
        self._outputs = [None] * len(self._layers)
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
        self, index: int, layer: nn.Module, a: torch.Tensor | None, b: torch.Tensor,
        sq_norms: torch.Tensor,
    ) -> _LayerTerms:
        """Add one layer's per-example squared gradient norms to ``sq_norms`` (in place) and
        return what pass 2 needs of it to form the weighted sum."""
        assert a is not None
        batch = sq_norms.shape[0]
        has_bias = layer.bias is not None and layer.bias.requires_grad
        if isinstance(layer, nn.Linear) and a.dim() == 2:
            b_sq = row_sq_norms(b)
            weight_sq = row_sq_norms(a).mul_(b_sq)
            exact_zero = b_sq == 0
            if bool(exact_zero.any()):
                # b_i = 0 with a finite a_i is an exact zero gradient: keep a huge a_i's
                # overflowed square (inf * 0) from making it NaN. An a_i that holds inf itself
                # stays NaN, so the example is dropped, as the per-example engine drops it
                # (its b_i a_i^T is NaN).
                weight_sq.masked_fill_(exact_zero & torch.isfinite(a).all(1), 0.0)
            sq_norms.add_(weight_sq)
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
            patches = self._patches(index, layer, a, b.shape[-2:])  # [B, T, Cin*kh*kw]
            per_w = self.workspace.take(("per_w", index),
                                        (batch, b3.shape[1], patches.shape[2]))
            torch.bmm(b3, patches, out=per_w)  # [B, Cout, Cin*kh*kw]
            bias_sum = b3.sum(2) if has_bias else None
        sq_norms.add_(row_sq_norms(per_w))
        if bias_sum is not None:
            sq_norms.add_(bias_sum.pow(2).sum(1))
        return _LayerTerms("dense", per_w.reshape(batch, -1), bias_sum)

    def _weighted_sums(
        self, slices: list[_LayerSlices], saved: list[_LayerTerms], factors: torch.Tensor
    ) -> None:
        """Write sum_i factor_i * g_i of every layer into its slices of the flat vector."""
        for views, terms in zip(slices, saved, strict=True):
            if terms.kind == "linear":
                scaled_b = terms.second * factors[:, None]  # type: ignore[operator]
                torch.mm(scaled_b.t(), terms.first, out=views.weight)
                if views.bias is not None:
                    torch.sum(scaled_b, 0, out=views.bias)
            else:
                torch.mv(terms.first.t(), factors, out=views.weight_flat)
                if views.bias is not None:
                    assert terms.second is not None
                    torch.mv(terms.second.t(), factors, out=views.bias)
