"""peer.training.optim must follow torch.optim's arithmetic exactly and round-trip its state."""

from __future__ import annotations

import pytest
import torch

from peer.training.optim import SGD, Adam, OptimizerStateError


def _params(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in
            ((4, 3), (3,), (2, 2, 2))]


def _run(params: list[torch.nn.Parameter], optimizer: object, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()  # type: ignore[attr-defined]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_matches_torch(momentum: float) -> None:
    ours, reference = _params(1), _params(1)
    _run(ours, SGD(ours, lr=0.05, momentum=momentum), steps=7, seed=2)
    _run(reference, torch.optim.SGD(reference, lr=0.05, momentum=momentum), steps=7, seed=2)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_adam_matches_torch() -> None:
    ours, reference = _params(3), _params(3)
    _run(ours, Adam(ours, lr=0.01), steps=9, seed=4)
    _run(reference, torch.optim.Adam(reference, lr=0.01), steps=9, seed=4)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [lambda p: SGD(p, lr=0.1, momentum=0.5),
                                  lambda p: Adam(p, lr=0.01)])
def test_state_round_trip_continues_identically(make: object) -> None:
    """Stopping after 3 steps, restoring the state into a fresh optimizer and continuing gives
    the same parameters as never stopping."""
    straight = _params(5)
    _run(straight, opt := make(straight), steps=3, seed=6)  # type: ignore[operator]
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in straight]
    fresh = make(resumed)  # type: ignore[operator]
    fresh.load_state_dict(opt.state_dict())
    _run(straight, opt, steps=4, seed=7)
    _run(resumed, fresh, steps=4, seed=7)
    for a, b in zip(straight, resumed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_foreign_state_is_refused() -> None:
    params = _params(8)
    with pytest.raises(OptimizerStateError, match="adam"):
        SGD(params, lr=0.1).load_state_dict(Adam(params).state_dict())
    bad = Adam(params).state_dict()
    bad["first"] = bad["first"][:1]
    with pytest.raises(OptimizerStateError, match="one tensor per param"):
        Adam(params).load_state_dict(bad)
    with pytest.raises(ValueError, match="lr"):
        SGD(params, lr=0.0)
