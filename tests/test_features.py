"""Frozen features computed once: the process-wide cache and the scatter trainer built on it.

kymatio is a hard dependency (pyproject.toml): nothing here skips without it, so a broken
install fails these tests (FeatureError) instead of hiding them.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from peer.training.data import Dataset, load_source
from peer.training.features import (
    FeatureCache,
    ScatterFeatures,
    cached_features,
    clear_feature_caches,
    default_cache_dir,
    feature_cache,
    store_key,
    store_path,
    warm_cache,
)
from peer.training.models import build_model, split_frozen
from peer.training.trainer import LocalTrainer, TrainerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


class Counting(nn.Module):
    """Wraps a prefix; counts forward calls and the rows they computed."""

    def __init__(self, inner: nn.Module, gate: threading.Event | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.rows = 0
        self.gate = gate
        self.entered = threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += x.shape[0]
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(timeout=30), "test gate never opened"
        return self.inner(x)


def _scatter_prefix(shape: tuple[int, ...] = (28, 28)) -> nn.Module:
    prefix, _rest = split_frozen(build_model("scatter", shape, 10))
    assert prefix is not None
    return prefix


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 28, 28), dtype=np.float32)


def test_cache_matches_prefix_and_computes_each_row_once() -> None:
    prefix = _scatter_prefix()
    x = _images(12)
    x_dup = np.concatenate([x, x[[3, 0, 3]]])  # 15 rows, 12 distinct
    counting = Counting(prefix)
    cache = FeatureCache(max_rows=100, chunk=5)

    features = cache.features(counting, x_dup)
    with torch.no_grad():
        direct = prefix(torch.from_numpy(x_dup)).reshape(len(x_dup), -1)
    assert features.shape == (15, 81 * 7 * 7)
    torch.testing.assert_close(features, direct, rtol=1e-5, atol=1e-6)
    assert (counting.rows, counting.calls) == (12, 3)  # distinct rows, in chunks of 5
    assert (cache.computed, len(cache)) == (12, 12)

    # A copied subset (a peer's shard is a copy) hits: nothing is computed again.
    subset = x[[7, 2, 11]].copy()
    again = cache.features(counting, subset)
    assert counting.rows == 12 and cache.hits >= 3
    torch.testing.assert_close(again, direct[[7, 2, 11]], rtol=0, atol=0)

    # A new row is the only one computed.
    fresh = _images(1, seed=1)
    mixed = cache.features(counting, np.concatenate([fresh, x[:2]]))
    assert counting.rows == 13
    with torch.no_grad():
        torch.testing.assert_close(mixed[0], prefix(torch.from_numpy(fresh)).reshape(-1),
                                   rtol=1e-5, atol=1e-6)


def test_cache_is_bounded_and_clearable() -> None:
    counting = Counting(nn.Flatten())  # cheap stand-in: the cache is prefix-agnostic
    cache = FeatureCache(max_rows=4, chunk=3)
    x = _images(10)
    cache.features(counting, x)
    assert len(cache) == 4 and counting.rows == 10
    cache.features(counting, x[6:])  # the 4 most recent rows are kept
    assert counting.rows == 10
    cache.features(counting, x[:1])  # an evicted row is computed again
    assert counting.rows == 11 and len(cache) == 4
    cache.clear()
    assert len(cache) == 0
    out = cache.features(counting, x[:0])
    assert out.shape == (0, 28 * 28)


def test_concurrent_requests_compute_a_row_once() -> None:
    gate = threading.Event()
    counting = Counting(nn.Flatten(), gate=gate)
    cache = FeatureCache(max_rows=100, chunk=64)
    x = _images(20)
    results: dict[str, torch.Tensor] = {}

    def run(name: str, rows: np.ndarray) -> None:
        results[name] = cache.features(counting, rows)

    first = threading.Thread(target=run, args=("first", x))
    first.start()
    assert counting.entered.wait(timeout=30)  # the first thread holds the claim on all rows
    second = threading.Thread(target=run, args=("second", x[5:15].copy()))
    second.start()
    gate.set()
    first.join(timeout=30)
    second.join(timeout=30)
    assert not first.is_alive() and not second.is_alive()
    assert counting.rows == 20 and counting.calls == 1
    torch.testing.assert_close(results["first"], torch.from_numpy(x).reshape(20, -1))
    torch.testing.assert_close(results["second"], results["first"][5:15])


def test_process_wide_caches_are_per_configuration() -> None:
    clear_feature_caches()
    a, b = _scatter_prefix(), _scatter_prefix()
    assert feature_cache(a, (28, 28)) is feature_cache(b, (28, 28))  # same config: shared
    other = _scatter_prefix((1, 28, 28))
    assert feature_cache(other, (1, 28, 28)) is not feature_cache(a, (28, 28))
    x = _images(3)
    cached_features(a, x)
    cache = feature_cache(a, (28, 28))
    assert cache.computed == 3 and len(cache) == 3
    cached_features(b, x.copy())
    assert cache.computed == 3
    clear_feature_caches()
    assert len(cache) == 0


def test_split_frozen_of_scatter_shares_the_model() -> None:
    model = build_model("scatter", (28, 28), 10)
    prefix, rest = split_frozen(model)
    assert prefix is not None
    assert any(isinstance(m, ScatterFeatures) for m in prefix.modules())
    assert not any(True for _ in prefix.parameters())
    assert [id(p) for p in rest.parameters()] == [id(p) for p in model.parameters()]
    x = torch.from_numpy(_images(4))
    with torch.no_grad():
        torch.testing.assert_close(rest(prefix(x)), model(x), rtol=0, atol=0)


def _digits_28(n: int) -> Dataset:
    """Digits (8x8) upsampled x3 and padded to 28x28: a small image set for the trainer."""
    train, _test = load_source("digits")
    images = train.x[:n].reshape(n, 8, 8)
    big = np.pad(np.kron(images, np.ones((3, 3), dtype=np.float32)), ((0, 0), (2, 2), (2, 2)))
    return Dataset(x=big.astype(np.float32), y=train.y[:n].copy(), num_classes=10,
                   name="digits-28")


def test_scatter_trainer_trains_evaluates_and_resumes(tmp_path: Path) -> None:
    data = _digits_28(260)
    train, holdout = data.subset(np.arange(200)), data.subset(np.arange(200, 240))
    test = data.subset(np.arange(230, 260))  # overlaps the hold-out by 10 rows
    config = TrainerConfig(model="scatter", local_steps=3, batch_size=32, noise_multiplier=1.0,
                           max_grad_norm=0.1, lr=2.0, momentum=0.5, dp=True)
    clear_feature_caches()
    trainer = LocalTrainer(config, train, holdout, tmp_path)
    cache = feature_cache(trainer.frozen_prefix, (28, 28))
    assert cache.computed == 240  # train + hold-out, once, at construction
    assert trainer.param_count == 3969 * 10 + 10
    assert trainer.model_id.startswith("scatter-39700-")
    features = trainer.static_inputs  # the static block's inputs, featurised once
    assert features is not None and features.shape == (200, 3969)
    with torch.no_grad():  # the trainable head on cached features is the whole model
        torch.testing.assert_close(trainer.trainable(features[:5]),
                                   trainer.model(torch.from_numpy(train.x[:5])),
                                   rtol=1e-4, atol=1e-5)

    before = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
    update = trainer.train_round()
    after = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
    assert update.round == 1 and update.steps == 3 and update.epsilon > 0
    assert not torch.equal(before, after)
    assert int(update.indices.max()) < trainer.param_count

    holdout_accuracy = trainer.evaluate()
    assert 0.0 <= holdout_accuracy <= 1.0
    assert cache.computed == 240  # the hold-out was featurised at construction
    test_accuracy = trainer.evaluate(test)
    assert cache.computed == 260  # only the 20 test rows not in the hold-out
    assert trainer.evaluate(test) == test_accuracy and cache.computed == 260

    # The checkpoint holds the whole model, frozen filters included, and resumes.
    state = torch.load(trainer.checkpoint_path, weights_only=True)["model_state"]
    assert any(".scattering." in name for name in state)
    assert set(state) == set(trainer.model.state_dict())
    resumed = LocalTrainer(config, train, holdout, tmp_path)
    assert cache.computed == 260  # a rebuilt trainer hits the cache
    assert resumed.round == 1 and resumed.model_id == trainer.model_id
    for (name, a), (_n, b) in zip(trainer.model.state_dict().items(),
                                  resumed.model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert resumed.evaluate(test) == test_accuracy
    assert resumed.train_round().round == 2


# ------------------------------------------------------------------------ on-disk store
def _fresh_counting() -> Counting:
    """A counting scatter prefix; every instance has the same configuration (and cache)."""
    return Counting(_scatter_prefix())


def test_warm_cache_writes_then_loads_the_store_without_computing(tmp_path: Path) -> None:
    x = _images(30)
    clear_feature_caches()
    first = _fresh_counting()
    threads = torch.get_num_threads()
    computed = warm_cache(first, x, cache_dir=tmp_path)
    assert torch.get_num_threads() == threads  # restored after computing with every core
    assert first.rows == 30
    files = list(tmp_path.glob("features-*.npy"))
    assert files == [store_path(tmp_path, first, x)]
    assert np.load(files[0]).shape == (30, 3969)
    assert list(tmp_path.glob(".*.tmp")) == []
    with torch.no_grad():
        direct = first.inner(torch.from_numpy(x)).reshape(30, -1)
    torch.testing.assert_close(computed, direct, rtol=1e-5, atol=1e-6)

    clear_feature_caches()  # a new process: nothing in memory
    second = _fresh_counting()
    loaded = warm_cache(second, x, cache_dir=tmp_path)
    assert (second.calls, second.rows) == (0, 0)
    torch.testing.assert_close(loaded, computed, rtol=0, atol=0)
    # Every row is in the in-memory cache now: a shard (a copy) is answered without the prefix.
    shard = cached_features(second, x[[4, 29, 0]].copy())
    assert second.rows == 0
    assert feature_cache(second, (28, 28)).computed == 0
    torch.testing.assert_close(shard, computed[[4, 29, 0]], rtol=0, atol=0)


def test_warm_cache_keys_the_store_by_data_and_prefix(tmp_path: Path) -> None:
    x = _images(30)
    prefix = _scatter_prefix()
    other_rows = x.copy()
    other_rows[7, 3, 3] += 0.5
    keys = {store_key(prefix, x), store_key(prefix, x.copy()), store_key(prefix, other_rows),
            store_key(prefix, x[:29]), store_key(_scatter_prefix((1, 28, 28)), x[:, None])}
    assert len(keys) == 4  # equal data -> equal key; any other change -> another key


def test_warm_cache_replaces_a_truncated_store(tmp_path: Path) -> None:
    x = _images(30)
    clear_feature_caches()
    warm_cache(_fresh_counting(), x, cache_dir=tmp_path)
    path = store_path(tmp_path, _fresh_counting(), x)  # the wrapper is part of the key
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])

    clear_feature_caches()
    again = _fresh_counting()
    features = warm_cache(again, x, cache_dir=tmp_path)  # logged and recomputed, no error
    assert again.rows == 30
    assert features.shape == (30, 3969)
    assert path.read_bytes() == whole  # the store is whole again


def test_warm_cache_replaces_a_store_of_the_wrong_shape(tmp_path: Path) -> None:
    x = _images(30)
    clear_feature_caches()
    counting = _fresh_counting()
    path = store_path(tmp_path, counting, x)
    np.save(path, np.zeros((29, 3969), dtype=np.float32))
    features = warm_cache(counting, x, cache_dir=tmp_path)
    assert counting.rows == 30
    assert np.load(path).shape == (30, 3969)
    torch.testing.assert_close(torch.from_numpy(np.load(path)), features, rtol=0, atol=0)


def test_warm_cache_without_a_directory_writes_nothing(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MURMUR_CACHE_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    x = _images(30)
    clear_feature_caches()
    counting = _fresh_counting()
    features = warm_cache(counting, x, cache_dir=None)
    assert counting.rows == 30 and features.shape == (30, 3969)
    assert len(feature_cache(counting, (28, 28))) == 30
    assert list(tmp_path.rglob("*")) == []


def test_default_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    monkeypatch.setenv("MURMUR_CACHE_DIR", str(tmp_path / "store"))
    assert default_cache_dir() == tmp_path / "store"
    monkeypatch.delenv("MURMUR_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "murmur" / "features"


def test_disabled_cache_computes_straight_into_one_tensor_in_chunks() -> None:
    """configure_feature_cache(0) (the small device profile): the same features as the
    cache gives, computed chunk by chunk, nothing kept in any cache."""
    from peer.training.features import (
        DEFAULT_CACHE_ROWS,
        configure_feature_cache,
        direct_features,
    )

    clear_feature_caches()
    prefix = Counting(_scatter_prefix())
    x = _images(7)
    expected = cached_features(_scatter_prefix(), x)
    clear_feature_caches()
    configure_feature_cache(0)
    try:
        got = cached_features(prefix, x)
        chunked = direct_features(prefix, x, chunk=3)
        empty = direct_features(prefix, x[:0])
    finally:
        configure_feature_cache(DEFAULT_CACHE_ROWS)
    assert torch.equal(got, expected) and torch.equal(chunked, expected)
    assert prefix.rows == 7 + 7 + 1 and prefix.calls == 1 + 3 + 1  # chunks of 3: 3 + 3 + 1
    assert empty.shape == (0, expected.shape[1])
    assert len(feature_cache(prefix, (28, 28))) == 0


# ------------------------------------------------------------------ float16 feature storage
def test_float16_features_are_the_float32_features_rounded() -> None:
    """feature_dtype = "float16" (the small profile): the same features, each value rounded
    once to float16 (relative error at most 2^-11), with the cache on and off."""
    from peer.training.features import DEFAULT_CACHE_ROWS, configure_feature_cache

    clear_feature_caches()
    x = _images(9, seed=3)
    expected = cached_features(_scatter_prefix(), x)
    assert expected.dtype == torch.float32  # the default stays float32
    cached = cached_features(_scatter_prefix(), x, torch.float16)
    configure_feature_cache(0)
    try:
        direct = cached_features(_scatter_prefix(), x, torch.float16)
    finally:
        configure_feature_cache(DEFAULT_CACHE_ROWS)
        clear_feature_caches()
    for got in (cached, direct):
        assert got.dtype == torch.float16 and got.shape == expected.shape
        assert torch.equal(got, expected.to(torch.float16))
        error = (got.float() - expected).abs()
        assert bool((error <= expected.abs() * 2.0**-11 + 2.0**-25).all())


def test_float16_features_reach_the_model_as_float32(tmp_path: Path) -> None:
    data = _digits_28(120)
    train, holdout = data.subset(np.arange(100)), data.subset(np.arange(100, 120))
    seen: list[torch.dtype] = []

    def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        seen.append(inputs[0].dtype)

    for dtype in ("float32", "float16"):
        config = TrainerConfig(model="scatter", local_steps=2, batch_size=32, dp=True,
                               noise_multiplier=1.0, max_grad_norm=0.1, feature_dtype=dtype)
        trainer = LocalTrainer(config, train, holdout, tmp_path / dtype)
        assert trainer.static_inputs is not None
        assert trainer.static_inputs.dtype == getattr(torch, dtype)
        seen.clear()
        handle = trainer.trainable.register_forward_pre_hook(record)
        try:
            trainer.train_round()
            trainer.evaluate()
            trainer.evaluate(data.subset(np.arange(10)))
        finally:
            handle.remove()
        assert seen and set(seen) == {torch.float32}


def test_feature_dtype_defaults_to_float32_and_the_small_profile_picks_float16() -> None:
    from peer.device import PROFILES

    assert TrainerConfig().feature_dtype == "float32"
    assert PROFILES["small"].training["feature_dtype"] == "float16"
    assert "feature_dtype" not in PROFILES["default"].training
    with pytest.raises(ValueError, match="feature_dtype"):
        TrainerConfig(feature_dtype="bfloat16").validate()
