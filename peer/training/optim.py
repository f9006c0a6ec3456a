"""Plain SGD (with momentum) and Adam on a fixed list of parameters, without ``torch.optim``.

Why not ``torch.optim``: constructing any ``torch.optim.Optimizer`` imports ``torch._dynamo``
(``add_param_group`` is wrapped to disable the compiler), which adds about 70 MB of resident
memory to a peer process — a fifth of a 1 GB Raspberry Pi's budget for Murmur. A peer needs
only these two update rules, written with in-place tensor ops (the same arithmetic as
``torch.optim.SGD`` with ``dampening=0, nesterov=False`` and ``torch.optim.Adam`` with
``amsgrad=False, weight_decay=0``; ``tests/test_optim.py`` checks that against torch).

Privacy: the optimizer only post-processes the already-noised DP-SGD gradient, so its state
(momentum, Adam moments) is covered by the same (ε, δ) as the gradients it was built from.

The objects expose the four methods the trainer uses: ``zero_grad``, ``step``, ``state_dict``
and ``load_state_dict``; state dicts are plain dicts of tensors and numbers (``torch.save``-able).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from peer.errors import PeerError

__all__ = ["SGD", "Adam", "Optimizer", "OptimizerStateError", "build_optimizer"]


class OptimizerStateError(PeerError, ValueError):
    """A saved optimizer state does not fit this optimizer (kind, sizes or shapes)."""


class _Base:
    kind = ""

    def __init__(self, params: Sequence[torch.nn.Parameter], lr: float) -> None:
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be positive and finite, got {lr}")
        self.params = list(params)
        self.lr = float(lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def _check_buffers(self, buffers: Any, name: str) -> list[torch.Tensor]:
        if not isinstance(buffers, list) or len(buffers) != len(self.params):
            raise OptimizerStateError(f"{self.kind} state: {name} must hold one tensor per param")
        for saved, p in zip(buffers, self.params, strict=True):
            if not isinstance(saved, torch.Tensor) or saved.shape != p.shape:
                raise OptimizerStateError(f"{self.kind} state: {name} shape mismatch")
        return [b.detach().clone().to(p.dtype) for b, p in zip(buffers, self.params, strict=True)]

    def _check_kind(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("kind") != self.kind:
            found = state.get("kind") if isinstance(state, dict) else type(state).__name__
            raise OptimizerStateError(f"saved optimizer is {found!r}, this one is {self.kind!r}")


class SGD(_Base):
    """p ← p − lr·b with b ← μ·b + g (b = g when μ = 0): heavy-ball momentum."""

    kind = "sgd"

    def __init__(
        self, params: Sequence[torch.nn.Parameter], lr: float, momentum: float = 0.0
    ) -> None:
        super().__init__(params, lr)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self._buffers: list[torch.Tensor] | None = None  # created on the first step

    @torch.no_grad()
    def step(self) -> None:
        if self.momentum and self._buffers is None:
            self._buffers = [torch.zeros_like(p) for p in self.params]
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            direction = p.grad
            if self._buffers is not None:
                direction = self._buffers[i].mul_(self.momentum).add_(p.grad)
            p.add_(direction, alpha=-self.lr)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "momentum_buffers": self._buffers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_kind(state)
        buffers = state.get("momentum_buffers")
        self._buffers = None if buffers is None else self._check_buffers(buffers, "momentum")


class Adam(_Base):
    """Adam (Kingma & Ba) with bias correction; defaults as ``torch.optim.Adam``."""

    kind = "adam"

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, lr)
        self.beta1, self.beta2 = (float(b) for b in betas)
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0 and eps > 0):
            raise ValueError("betas must be in [0, 1) and eps > 0")
        self.eps = float(eps)
        self.steps = 0
        self._first = [torch.zeros_like(p) for p in self.params]
        self._second = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        correction1 = 1.0 - self.beta1**self.steps
        correction2 = 1.0 - self.beta2**self.steps
        for p, m, v in zip(self.params, self._first, self._second, strict=True):
            if p.grad is None:
                continue
            m.mul_(self.beta1).add_(p.grad, alpha=1.0 - self.beta1)
            v.mul_(self.beta2).addcmul_(p.grad, p.grad, value=1.0 - self.beta2)
            denominator = (v / correction2).sqrt_().add_(self.eps)
            p.addcdiv_(m, denominator, value=-self.lr / correction1)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "steps": self.steps, "first": self._first,
                "second": self._second}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_kind(state)
        steps = state.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise OptimizerStateError("adam state: steps must be a non-negative integer")
        first = self._check_buffers(state.get("first"), "first moment")
        second = self._check_buffers(state.get("second"), "second moment")
        self.steps, self._first, self._second = steps, first, second


Optimizer = SGD | Adam


def build_optimizer(name: str, params: Sequence[torch.Tensor], *, lr: float,
                    momentum: float) -> Optimizer:
    """The trainer's optimizer: ``"adam"`` (``momentum`` unused), anything else SGD."""
    if name == "adam":
        return Adam(params, lr=lr)
    return SGD(params, lr=lr, momentum=momentum)
