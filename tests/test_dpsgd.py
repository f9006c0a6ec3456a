"""DP-SGD: exact per-example clipping, noise scale, secure noise, Poisson sampling, accountant."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from peer.training.data import Dataset
from peer.training.dpsgd import (
    DPSGDStep,
    GhostClipEngine,
    UnsupportedModelError,
    VmapEngine,
    clip_factors,
    make_engine,
    poisson_batch,
)
from peer.training.ghost_engine import Workspace
from peer.training.models import build_model
from peer.training.privacy.accountant import (
    AccountingError,
    epsilon,
    epsilon_of_segments,
    sigma_for,
)
from peer.training.privacy.noise import (
    LARGEST_RADIUS,
    MAX_UNIFORM_WORDS,
    SMALLEST_UNIFORM,
    InsecureFastGaussian,
    SecureGaussian,
    bernoulli_threshold,
    box_muller,
    open_unit_uniforms,
    os_random_words,
    secure_bernoulli_mask,
)
from peer.training.trainer import LocalTrainer, TrainerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _batch(shape: tuple[int, ...], n: int = 12, classes: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen) * 3, torch.randint(0, classes, (n,), generator=gen)


@pytest.mark.parametrize(("name", "shape"), [("mlp", (64,)), ("cnn", (1, 28, 28))])
def test_fast_engine_matches_vmap_reference(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, 10)
    x, y = _batch(shape)
    fast = GhostClipEngine(model).clipped_sum(x, y, 0.7)
    reference = VmapEngine(model).clipped_sum(x, y, 0.7)
    torch.testing.assert_close(fast.per_example_norms, reference.per_example_norms,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.flat_sum, reference.flat_sum, rtol=1e-4, atol=1e-6)


def _strided_conv_model(activation: nn.Module) -> nn.Module:
    """A padded, strided, dilated convolution on 3 x 9 x 10 inputs, then a linear layer."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=(1, 2), stride=(1, 2), dilation=(2, 1)),
        activation,
        nn.Flatten(),
        nn.Linear(4 * 7 * 6, 5),
    )


def test_fast_engine_handles_padding_stride_dilation() -> None:
    torch.manual_seed(1)
    model = _strided_conv_model(nn.ReLU())
    x, y = _batch((3, 9, 10), classes=5)
    fast = GhostClipEngine(model).clipped_sum(x, y, 0.5)
    reference = VmapEngine(model).clipped_sum(x, y, 0.5)
    torch.testing.assert_close(fast.flat_sum, reference.flat_sum, rtol=1e-4, atol=1e-6)


def test_one_engine_stays_exact_as_its_workspace_is_reused_across_batch_sizes() -> None:
    """The engine keeps its padded inputs, patches and per-example gradients between calls;
    Poisson batches grow and shrink, and every call must still equal the reference engine
    (a stale row or a dirtied padding border would show here)."""
    torch.manual_seed(3)
    model = _strided_conv_model(nn.Tanh())
    engine, reference = GhostClipEngine(model), VmapEngine(model)
    largest = 0
    for seed, n in enumerate((20, 7, 33, 12, 33, 1)):
        x, y = _batch((3, 9, 10), n=n, classes=5, seed=seed)
        fast = engine.clipped_sum(x, y, 0.5)
        expected = reference.clipped_sum(x, y, 0.5)
        torch.testing.assert_close(fast.flat_sum, expected.flat_sum, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(fast.per_example_norms, expected.per_example_norms,
                                   rtol=1e-4, atol=1e-6)
        largest = max(largest, n)
        # Held: the padded input (3 x 11 x 14), the patches (7 x 6 positions x 27) and the
        # per-example weight gradients (4 x 27) of the largest batch so far, in float32.
        assert engine.workspace.held_bytes == 4 * largest * (3 * 11 * 14 + 7 * 6 * 27 + 4 * 27)


def test_workspace_views_share_a_buffer_and_a_new_geometry_starts_from_zeros() -> None:
    workspace = Workspace()
    first = workspace.take(("pad", 0), (4, 2, 3), same_geometry=True)
    first.fill_(7.0)
    smaller = workspace.take(("pad", 0), (2, 2, 3), same_geometry=True)
    assert smaller.data_ptr() == first.data_ptr() and bool((smaller == 7.0).all())
    other_shape = workspace.take(("pad", 0), (2, 3, 3), same_geometry=True)
    assert bool((other_shape == 0).all()) and workspace.held_bytes == 4 * 2 * 3 * 3
    larger = workspace.take(("pad", 0), (5, 3, 3), same_geometry=True)
    assert bool((larger == 0).all()) and workspace.held_bytes == 4 * 5 * 3 * 3
    # Without same_geometry a smaller request of any shape reuses the buffer as it is.
    scratch = workspace.take(("patches", 0), (3, 10))
    scratch.fill_(1.0)
    reshaped = workspace.take(("patches", 0), (2, 7))
    assert reshaped.data_ptr() == scratch.data_ptr() and bool((reshaped == 1.0).all())
    assert workspace.held_bytes == 4 * (5 * 3 * 3 + 3 * 10)


def test_the_cnn_engine_shares_one_patch_buffer_between_its_convolutions() -> None:
    """Each convolution's patches are dead once its per-example gradients are formed, so the
    CNN's two convolutions use one buffer: the larger (conv1: 14 x 14 positions x 64)."""
    torch.manual_seed(4)
    model = build_model("cnn", (1, 28, 28), 10)
    engine = GhostClipEngine(model)
    x, y = _batch((1, 28, 28), n=9)
    fast = engine.clipped_sum(x, y, 1.0)
    reference = VmapEngine(model).clipped_sum(x, y, 1.0)
    torch.testing.assert_close(fast.flat_sum, reference.flat_sum, rtol=1e-4, atol=1e-6)
    padded, patches = 9 * 1 * 34 * 34, 9 * 196 * 64
    per_example = 9 * (16 * 64 + 32 * 256)
    assert engine.workspace.held_bytes == 4 * (padded + patches + per_example)


@pytest.mark.parametrize("engine_class", [GhostClipEngine, VmapEngine])
def test_a_clipped_sum_written_into_a_reused_vector_overwrites_every_entry(
        engine_class: type) -> None:
    """``out=`` is the DP step's reused gradient vector: a stale entry there would become
    part of a released gradient, so a vector full of NaN must come back equal to a fresh one
    (a bias-free layer included, whose parameters sit between two others')."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, bias=False), nn.Tanh(), nn.Flatten(),
                          nn.Linear(3 * 6 * 6, 4))
    engine = engine_class(model)
    x, y = _batch((1, 8, 8), n=6, classes=4)
    fresh = engine.clipped_sum(x, y, 0.8).flat_sum
    out = torch.full_like(fresh, float("nan"))
    for _ in range(2):  # the second call reuses the views built for ``out``
        written = engine.clipped_sum(x, y, 0.8, out=out)
        assert written.flat_sum.data_ptr() == out.data_ptr()
        torch.testing.assert_close(out, fresh, rtol=1e-5, atol=1e-7)
        out.fill_(float("nan"))
    empty = engine.clipped_sum(x[:0], y[:0], 0.8, out=out)
    assert empty.batch_size == 0 and bool((out == 0).all())


def _mixed_geometry_model() -> nn.Module:
    """Two padded convolutions of different geometry (their padded inputs 2 x 9 x 8 and
    4 x 11 x 8, their patches 42 x 18 and 54 x 36 per example) sharing the patch buffer, a
    bias-free one and a frozen bias between trained ones, on 2 x 7 x 6 inputs."""
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(),  # -> 4 x 7 x 6
        nn.Conv2d(4, 3, 3, padding=(2, 1), bias=False), nn.Tanh(),  # -> 3 x 9 x 6
        nn.Conv2d(3, 5, 2, stride=2), nn.Tanh(), nn.Flatten(),  # -> 5 x 4 x 3
        nn.Linear(60, 6, bias=False), nn.Tanh(), nn.Linear(6, 4),
    )
    model[4].bias.requires_grad_(False)
    return model


def test_the_dp_step_reuses_its_vector_and_workspace_without_a_stale_entry() -> None:
    """Every step's .grad must be that step's batch alone: a batch smaller than the one before
    (stale rows), an empty one, one with a NaN example (its rows dropped), on a model whose
    convolutions differ in geometry and share the patch buffer, with no noise so that any
    entry left from an earlier step would show against the reference engine."""
    torch.manual_seed(6)
    model = _mixed_geometry_model()
    step = DPSGDStep.build(model, noise_multiplier=0.0, max_grad_norm=0.6,
                           expected_batch_size=8.0, engine="ghost")
    assert isinstance(step.engine, GhostClipEngine)
    reference = VmapEngine(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert len(trained) == 7 and all(p is not model[4].bias for p in trained)
    for seed, n in enumerate((11, 3, 14, 0, 5, 14)):
        x, y = _batch((2, 7, 6), n=n, classes=4, seed=seed)
        if n == 5:
            x[2, 1, 3, 3] = float("nan")
        step.step(x, y)
        grad = torch.cat([p.grad.reshape(-1) for p in trained])
        expected = reference.clipped_sum(x, y, 0.6).flat_sum / 8.0
        assert bool(torch.isfinite(grad).all())
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
    assert model[4].bias.grad is None


def test_a_layout_the_fast_engine_cannot_write_is_refused_when_it_is_built() -> None:
    """The fast engine writes each layer's weight and then its trainable bias: a frozen weight
    under a trained bias, or a weight shared by two layers, is refused when the engine is
    built (so "auto" falls back to the general engine) instead of failing at every step."""
    frozen = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    frozen[0].weight.requires_grad_(False)
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    tied = nn.Sequential(first, nn.Tanh(), second)
    x, y = _batch((4,), n=6, classes=3)
    for model in (frozen, tied):
        with pytest.raises(UnsupportedModelError, match="weight then its bias"):
            GhostClipEngine(model)
        step = DPSGDStep.build(model, noise_multiplier=0.0, max_grad_norm=0.5,
                               expected_batch_size=6.0)
        assert isinstance(step.engine, VmapEngine)
        step.step(x, y)
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
        torch.testing.assert_close(grad, VmapEngine(model).clipped_sum(x, y, 0.5).flat_sum / 6)


class _MaybeTwice(nn.Module):
    """Runs its hidden layer once or, with ``twice``, twice."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.head = nn.Linear(4, 4), nn.Linear(4, 3)
        self.twice = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.hidden(x))
        if self.twice:
            h = torch.tanh(self.hidden(h))
        return self.head(h)


def test_a_layer_that_runs_twice_in_a_step_is_refused_at_that_step() -> None:
    """The engine keeps one input and output per layer: a second call would replace the
    first's and the sum would silently miss its part. The call is refused, and the slots it
    left filled do not make the next call fail or read them."""
    torch.manual_seed(7)
    model = _MaybeTwice()
    engine = GhostClipEngine(model)
    x, y = _batch((4,), n=5, classes=3)
    with pytest.raises(UnsupportedModelError, match="ran twice"):
        engine.clipped_sum(x, y, 1.0)
    model.twice = False
    torch.testing.assert_close(engine.clipped_sum(x, y, 1.0).flat_sum,
                               VmapEngine(model).clipped_sum(x, y, 1.0).flat_sum,
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("engine_class", [GhostClipEngine, VmapEngine])
def test_out_must_be_a_contiguous_float32_vector_of_every_parameter(engine_class: type) -> None:
    """The engines write every entry of exactly such a vector (the ghost engine keeps its views
    into it by address and length); anything else is refused, not partly written."""
    model = build_model("mlp", (8,), 3)
    count = sum(p.numel() for p in model.parameters())
    engine = engine_class(model)
    x, y = _batch((8,), n=4, classes=3)
    for bad in (torch.zeros(2 * count)[::2], torch.zeros(count + 1), torch.zeros(count - 1),
                torch.zeros(count, dtype=torch.float64), torch.zeros(1, count)):
        with pytest.raises(ValueError, match="contiguous float32 vector"):
            engine.clipped_sum(x, y, 1.0, out=bad)


def test_every_clipped_example_norm_is_at_most_c() -> None:
    torch.manual_seed(2)
    model = build_model("cnn", (1, 28, 28), 10)
    x, y = _batch((1, 28, 28), n=32)
    per_example = VmapEngine(model).per_example_flat(x, y)
    norms = per_example.norm(dim=1)
    for c in (0.01, 0.5, 1.0, float(norms.max()) * 2):
        clipped = per_example * clip_factors(norms, c)[:, None]
        assert torch.all(clipped.norm(dim=1) <= c * (1 + 1e-5))
        # Examples already under the bound are left untouched.
        small = norms < c
        torch.testing.assert_close(clipped[small], per_example[small], rtol=1e-5, atol=1e-6)
    assert float(norms.min()) > 0.01  # the smallest C above really clipped everything


def test_a_gradient_whose_norm_is_not_finite_gets_factor_zero() -> None:
    norms = torch.tensor([float("nan"), float("inf"), 0.5, 4.0, 0.0])
    factors = clip_factors(norms, 2.0)
    assert factors[:2].tolist() == [0.0, 0.0]
    torch.testing.assert_close(factors[2:], torch.tensor([1.0, 0.5, 1.0]), rtol=1e-5, atol=0)


def test_a_record_with_huge_finite_features_never_makes_the_step_nan() -> None:
    """Features of 1e20 overflow the float32 sum of squared inputs (||a||^2 = inf) behind the
    MLP's first-layer norm; the saturated tanh makes that layer's gradient exactly 0. The fast
    engine gives the exact, finite clipped sum of the reference engine (inf * 0 was NaN)."""
    model = build_model("mlp", (64,), 10)
    x, y = _batch((64,), n=12)
    x[5] = 1e20
    fast = GhostClipEngine(model).clipped_sum(x, y, 1.0)
    reference = VmapEngine(model).clipped_sum(x, y, 1.0)
    assert bool(torch.isfinite(fast.flat_sum).all()) and math.isfinite(fast.per_example_norms[5])
    torch.testing.assert_close(fast.flat_sum, reference.flat_sum, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast.per_example_norms, reference.per_example_norms, rtol=1e-4,
                               atol=1e-6)


@pytest.mark.parametrize("engine", ["ghost", "vmap"])
def test_an_example_whose_norm_is_not_finite_contributes_exactly_nothing(engine: str) -> None:
    """An input the loaders would refuse (NaN) reaches the engine anyway: its norm is NaN, its
    factor 0, its rows are zeroed (0 * NaN would be NaN), and the clipped sum is exactly the
    other examples' sum: each example still contributes a vector of norm <= C."""
    model = build_model("mlp", (64,), 10)
    x, y = _batch((64,), n=12)
    step = make_engine(model, engine)
    keep = torch.arange(12) != 5
    without = step.clipped_sum(x[keep], y[keep], 1.0)
    # NaN; and +inf, whose first layer saturates the tanh (that layer's b_i is exactly 0 while
    # its a_i holds inf: b_i a_i^T is NaN, not 0)
    for bad in (float("nan"), float("inf")):
        poisoned = x.clone()
        poisoned[5, 3] = bad
        with_bad = step.clipped_sum(poisoned, y, 1.0)
        assert not math.isfinite(float(with_bad.per_example_norms[5]))
        assert bool(torch.isfinite(with_bad.flat_sum).all())
        torch.testing.assert_close(with_bad.flat_sum, without.flat_sum, rtol=1e-5, atol=1e-6)


def test_a_huge_record_no_longer_stops_a_real_trainer() -> None:
    """The reviewer's case: one MLP record of finite 1e20 features, in every batch (q = 1),
    made the step NaN, and the trainer refused the update after 20 steps. Now it trains on."""
    x, y = _batch((64,), n=40, seed=1)
    x[7] = 1e20
    train = Dataset(x.numpy(), y.numpy(), 10, "huge")
    cfg = TrainerConfig(model="mlp", local_steps=10, noise_multiplier=1.0, batch_size=40,
                        share="delta")
    trainer = LocalTrainer(cfg, train, train.subset([0, 1]))
    for _ in range(3):
        update = trainer.train_round()
        assert np.isfinite(update.values).all() and update.values.size > 0
    params = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
    assert bool(torch.isfinite(params).all()) and trainer.ledger.steps == 30


def test_clipped_sum_bounded_by_batch_times_c() -> None:
    model = build_model("mlp", (64,), 10)
    x, y = _batch((64,), n=20)
    result = make_engine(model).clipped_sum(x * 50, y, 0.3)
    assert float(result.flat_sum.norm()) <= 20 * 0.3 * (1 + 1e-5)


def test_noise_scale_matches_sigma_c_over_batch() -> None:
    model = build_model("cnn", (1, 28, 28), 10)
    sigma, c, expected_batch = 1.3, 0.8, 16.0
    dp = DPSGDStep.build(model, noise_multiplier=sigma, max_grad_norm=c,
                         expected_batch_size=expected_batch)
    empty_x, empty_y = torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long)
    samples = torch.cat([dp.private_gradient(empty_x, empty_y) for _ in range(3)])
    expected_std = sigma * c / expected_batch
    assert abs(float(samples.std()) / expected_std - 1) < 0.02  # 140 K samples: ~0.2 % s.e.
    assert abs(float(samples.mean())) < 0.02 * expected_std


def test_step_writes_private_grad_and_no_noise_without_sigma() -> None:
    model = build_model("mlp", (64,), 10)
    x, y = _batch((64,), n=8)
    dp = DPSGDStep.build(model, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=8)
    dp.step(x, y)
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    reference = VmapEngine(model).clipped_sum(x, y, 1.0).flat_sum / 8
    torch.testing.assert_close(flat, reference, rtol=1e-4, atol=1e-6)


def test_secure_gaussian_moments_and_freshness() -> None:
    source = SecureGaussian()
    assert source.secure
    z = source.sample(400_001).double()
    assert z.shape == (400_001,)
    assert abs(float(z.mean())) < 0.01
    assert abs(float(z.std()) - 1) < 0.01
    assert abs(float((z**4).mean()) - 3) < 0.1  # Gaussian kurtosis
    assert abs(float((z.abs() > 2).double().mean()) - 0.0455) < 0.003
    assert not torch.equal(source.sample(100), source.sample(100))  # never repeats
    assert source.sample(0).shape == (0,)


class ScriptedWords:
    """A ``draw_words`` stand-in: returns the given top-53-bit values in turn, logs requests."""

    def __init__(self, tops: list[int]) -> None:
        self.tops = list(tops)
        self.requests: list[int] = []

    def __call__(self, count: int) -> torch.Tensor:
        self.requests.append(count)
        top = self.tops.pop(0) if self.tops else 0
        return torch.full((count,), top << 11, dtype=torch.int64)  # top 53 bits = top


def _words(*tops: int) -> torch.Tensor:
    """int64 words whose top 53 bits are ``tops`` (-1: every bit set), low 11 bits zero."""
    unsigned = [2**64 - 1 if t == -1 else t << 11 for t in tops]
    return torch.tensor([u - 2**64 if u >= 2**63 else u for u in unsigned], dtype=torch.int64)


def test_uniforms_are_refined_below_2_pow_minus_53_not_cut_off() -> None:
    """Exact: a word whose top 53 bits are zero is refined with fresh words, down to 2^-1007.

    Stopping at 2^-53 (one word per uniform) would cap every noise coordinate at 8.57 sigma
    and leave a tail of 2^-53 per pair out of the accounted Gaussian (docs/privacy.md).
    """
    grid = 2.0**-53
    all_zero = ScriptedWords([])
    uniforms = open_unit_uniforms(_words(0, -1, 1, 2**52), all_zero)
    assert uniforms.tolist() == [SMALLEST_UNIFORM, 1.0, 2 * grid, (2**52 + 1) * grid]
    assert SMALLEST_UNIFORM == 2.0**-1007 and all_zero.requests == [1] * (MAX_UNIFORM_WORDS - 1)
    # One refinement deep: the exact uniform is in (2^-53 * 2^-53, 2 * 2^-53 * 2^-53].
    one_deeper = ScriptedWords([1])
    assert open_unit_uniforms(_words(0), one_deeper).tolist() == [2 * grid * grid]
    assert one_deeper.requests == [1]
    # Nothing is drawn when no word needs refining.
    untouched = ScriptedWords([])
    open_unit_uniforms(_words(5, 7), untouched)
    assert untouched.requests == []


def test_box_muller_reaches_far_beyond_nine_sigma_in_both_directions() -> None:
    deepest = open_unit_uniforms(_words(0, 0), ScriptedWords([]))
    one_deeper = open_unit_uniforms(_words(0), ScriptedWords([1]))
    uniforms = torch.cat([deepest, one_deeper])
    # Angle words: 0 (theta = 0), -2^31 (theta = -pi), 2^30 (theta = pi / 2).
    angles = torch.tensor([0, -(2**31), 2**30], dtype=torch.int32)
    values = box_muller(uniforms, angles)
    assert math.isclose(LARGEST_RADIUS, math.sqrt(2 * 1007 * math.log(2)), rel_tol=1e-12)
    cosines, sines = values[:3].double(), values[3:].double()
    assert cosines[0] == pytest.approx(LARGEST_RADIUS, rel=1e-6)  # 37.4 sigma
    assert cosines[1] == pytest.approx(-LARGEST_RADIUS, rel=1e-6)
    assert cosines[2] == pytest.approx(0.0, abs=1e-5)
    assert sines[2] == pytest.approx(math.sqrt(2 * 105 * math.log(2)), rel=1e-6)  # 12.1 sigma
    assert min(float(cosines[0]), -float(cosines[1]), float(sines[2])) > 9.0
    assert box_muller(torch.ones(2, dtype=torch.float64),
                      torch.zeros(2, dtype=torch.int32)).tolist() == [0.0] * 4  # u = 1: r = 0


def test_uniform_construction_rejects_malformed_input() -> None:
    with pytest.raises(ValueError, match="int64"):
        open_unit_uniforms(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="draw_words"):
        open_unit_uniforms(_words(0), lambda count: torch.zeros(count + 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="equal length"):
        box_muller(torch.ones(2, dtype=torch.float64), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="float64"):
        box_muller(torch.ones(2), torch.zeros(2, dtype=torch.int32))
    assert open_unit_uniforms(torch.zeros(0, dtype=torch.int64)).shape == (0,)


def test_secure_gaussian_and_its_uniforms_pass_kolmogorov_smirnov() -> None:
    z = SecureGaussian().sample(300_000).double().numpy()
    assert stats.kstest(z, "norm").pvalue > 1e-6
    # Both halves (cosine and sine branches) on their own, and the pair radius r^2 ~ Exp(1/2).
    cosines, sines = z[:150_000], z[150_000:]
    assert stats.kstest(cosines, "norm").pvalue > 1e-6
    assert stats.kstest(sines, "norm").pvalue > 1e-6
    assert stats.kstest(cosines**2 + sines**2, "expon", args=(0, 2)).pvalue > 1e-6
    uniforms = open_unit_uniforms(os_random_words(200_000)).numpy()
    assert stats.kstest(uniforms, "uniform").pvalue > 1e-6
    # The statistic has the power to see a wrong scale: 5 % too wide moves the KS distance to
    # about 0.012, against 0.0049 at p = 1e-6 for n = 300 000 (2 % sat on that line).
    assert stats.kstest(z * 1.05, "norm").pvalue < 1e-12


def test_insecure_source_is_named_and_seeded() -> None:
    a, b = InsecureFastGaussian(5), InsecureFastGaussian(5)
    assert not a.secure
    assert torch.equal(a.sample(10), b.sample(10))


def test_sampling_rate_is_rounded_down_never_above_the_accounted_q() -> None:
    """Each draw is True with probability threshold / 2^32 <= q (epsilon grows with q);
    0.0475 * 2^32 = 204 010 946.56 would round up to nearest."""
    assert bernoulli_threshold(0.0475) == 204_010_946
    rng = np.random.default_rng(0)
    for q in [*rng.random(1000).tolist(), 64 / 1078, 0.5, 2.0**-33, 1 - 2.0**-40]:
        threshold = bernoulli_threshold(q)
        assert threshold / 2**32 <= q < (threshold + 1) / 2**32
    assert bernoulli_threshold(1.0) == 2**32 and bernoulli_threshold(0.0) == 0
    assert bool(secure_bernoulli_mask(1000, 1.0).all())
    assert not bool(secure_bernoulli_mask(100_000, 0.9 * 2.0**-32).any())  # threshold 0
    with pytest.raises(ValueError, match="probability"):
        secure_bernoulli_mask(10, 1.5)


def test_a_replaced_noise_source_voids_the_reported_epsilon(caplog) -> None:
    """A trainer built with ``noise=`` reports epsilon inf (status and updates), though its
    ledger still counts the steps; with insecure_fast_noise the seeded sampling is named."""

    class ZeroNoise:
        secure = False

        def sample(self, n: int) -> torch.Tensor:
            return torch.zeros(n)

    x, y = _batch((64,), n=40, seed=2)
    train = Dataset(x.numpy(), y.numpy(), 10, "t")
    cfg = TrainerConfig(model="mlp", local_steps=2, noise_multiplier=1.0, batch_size=8,
                        share="delta", insecure_fast_noise=True)
    with caplog.at_level(logging.WARNING, logger="peer.training.privacy.noise"):
        twin = LocalTrainer(cfg, train, train.subset([0, 1]), noise=ZeroNoise())
    warnings = " | ".join(r.getMessage() for r in caplog.records)
    assert "seeded batch sampling" in warnings and "ZeroNoise is not secure" in warnings
    update = twin.train_round()
    assert twin.epsilon == math.inf and update.epsilon == math.inf
    assert 0 < twin.ledger.epsilon < math.inf and twin.ledger.steps == 2
    normal = LocalTrainer(cfg, train, train.subset([0, 1]))
    assert 0 < normal.train_round().epsilon == normal.epsilon < math.inf


def test_poisson_sampling_rate() -> None:
    assert abs(float(secure_bernoulli_mask(200_000, 0.05).double().mean()) - 0.05) < 0.003
    batch = poisson_batch(10_000, 0.02)
    assert 120 < len(batch) < 280 and len(set(batch.tolist())) == len(batch)
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(poisson_batch(100, 0.3, gen_a), poisson_batch(100, 0.3, gen_b))


def test_unsupported_layers_fall_back_to_vmap() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModelError):
        GhostClipEngine(model)
    assert isinstance(make_engine(model), VmapEngine)


@pytest.mark.parametrize("name", ["pld", "rdp"])
def test_accountant_monotone_and_sigma_for_target(name: str) -> None:
    eps_small = epsilon(100, 1.0, 0.01, 1e-5, accountant=name)
    eps_large = epsilon(1000, 1.0, 0.01, 1e-5, accountant=name)
    assert 0 < eps_small < eps_large
    assert epsilon(0, 1.0, 0.01, 1e-5, accountant=name) == 0.0
    sigma = sigma_for(3.0, 1e-5, 0.01, 1000, accountant=name)
    reached = epsilon(1000, sigma, 0.01, 1e-5, accountant=name)
    assert reached <= 3.0 and reached > 2.9
    assert math.isclose(
        epsilon_of_segments([(sigma, 0.01, 400), (sigma, 0.01, 600)], 1e-5, name), reached,
        rel_tol=1e-3,
    )
    with pytest.raises(AccountingError):
        epsilon(10, 1.0, 1.5, 1e-5, accountant=name)
    with pytest.raises(AccountingError):
        sigma_for(-1, 1e-5, 0.01, 10, accountant=name)


def test_accountant_agrees_with_opacus_rdp_accountant() -> None:
    from opacus.accountants import RDPAccountant

    from peer.training.privacy import rdp

    reference = RDPAccountant()
    reference.history = [(1.1, 0.02, 300), (0.8, 0.05, 120)]
    ours = epsilon_of_segments([(1.1, 0.02, 300), (0.8, 0.05, 120)], 1e-5, "rdp")
    assert ours == rdp.epsilon_of_segments([(1.1, 0.02, 300), (0.8, 0.05, 120)], 1e-5)
    # Same orders as ours (Opacus' defaults stop at 63; ours extend them to 1024).
    expected = reference.get_epsilon(delta=1e-5, alphas=list(rdp.ORDERS))
    assert math.isclose(ours, expected, rel_tol=1e-9)
    # More orders can only tighten the bound: never above Opacus' default-order figure.
    assert ours <= reference.get_epsilon(delta=1e-5) + 1e-12


def test_rdp_sigma_for_matches_opacus_noise_search() -> None:
    from opacus.accountants.utils import get_noise_multiplier

    from peer.training.privacy import rdp

    ours = sigma_for(3.0, 1e-5, 0.02, 500, accountant="rdp")
    expected = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.02,
                                    steps=500, accountant="rdp", alphas=list(rdp.ORDERS))
    assert math.isclose(ours, expected, rel_tol=1e-12)
