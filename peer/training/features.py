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

Computing the features once: the transform costs 4-7 ms per 28x28 image on a CPU core, far more
than the linear model trained on it, and it never changes. :func:`cached_features` keeps a
process-wide cache (:class:`FeatureCache`, one per distinct frozen prefix and input shape)
keyed by a digest of each input row, so a trainer featurises its data once at construction and
every peer of a simulation that evaluates on the same test set (or on a copied shard of it)
reuses the rows already computed. See :func:`configure_feature_cache` for its memory bound.

Computing them once per machine: :func:`warm_cache` featurises a whole data set (with all the
cores) and keeps the result on disk, in ``features-<key>.npy`` under :func:`default_cache_dir`
(``$MURMUR_CACHE_DIR`` or ``~/.cache/murmur/features``), keyed by the prefix's configuration and
the data's bytes. A later process loads the file instead (seconds, not minutes) and fills the
in-memory cache from it, so every trainer built on rows of that data set hits.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

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
    row depends only on its own input row. The filters (18 small buffers, ~80 KB) are part of
    ``state_dict``, so a model's checkpoint carries them.
    """

    #: Marks a fixed, per-example feature extractor (see peer.training.models.split_frozen).
    frozen_features = True

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


# --------------------------------------------------------------------------- feature cache
#: Default bound of each feature cache, in rows: Fashion-MNIST's 60 000 + 10 000 images. At
#: 3969 float32 features per 28x28 image that is 70 000 x 15.9 KB ~ 1.1 GB (plus ~0.3 KB of
#: bookkeeping per row); set a smaller bound with :func:`configure_feature_cache`.
DEFAULT_CACHE_ROWS = 70_000
#: Rows computed per forward pass of the prefix (bounds the transform's peak memory).
DEFAULT_CACHE_CHUNK = 256
_DIGEST_BYTES = 16
#: Rows per forward pass without a cache (the small device profile): the scattering of 256
#: images holds about 26 MB of transform buffers, of 64 about a quarter of that.
DIRECT_CHUNK = 64


def row_digests(x: np.ndarray) -> list[bytes]:
    """BLAKE2b-128 of each row's float32 bytes: equal rows in any copy get equal keys."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), math.prod(x.shape[1:]))
    return [hashlib.blake2b(row.tobytes(), digest_size=_DIGEST_BYTES).digest() for row in flat]


def _prefix_key(prefix: nn.Module, row_shape: tuple[int, ...]) -> bytes:
    """Identifies what the prefix computes: its structure, its buffers and the input shape."""
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    h.update(repr(prefix).encode())
    h.update(repr(tuple(row_shape)).encode())
    for name, tensor in sorted(prefix.state_dict().items()):
        h.update(name.encode())
        h.update(repr((tuple(tensor.shape), str(tensor.dtype))).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.digest()


class FeatureCache:
    """Features of a frozen, per-example prefix, computed once per distinct input row.

    Rows are keyed by :func:`row_digests` (so a subset or copy of a data set hits), kept in
    least-recently-used order and bounded by ``max_rows`` (the oldest are dropped first; a
    request larger than the bound is still answered in full). Thread-safe: a row another
    thread is computing is waited for, never computed twice at the same time. The prefix must
    act on each example alone (its output row depends only on its input row).
    """

    def __init__(self, max_rows: int = DEFAULT_CACHE_ROWS, chunk: int = DEFAULT_CACHE_CHUNK
                 ) -> None:
        if max_rows < 0 or chunk < 1:
            raise ValueError(f"need max_rows >= 0 and chunk >= 1, got {max_rows}, {chunk}")
        self.max_rows = max_rows
        self.chunk = chunk
        self._rows: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._pending: dict[bytes, threading.Event] = {}
        self._lock = threading.Lock()
        #: Rows computed by the prefix / answered from the cache (diagnostics and tests).
        self.computed = 0
        self.hits = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._rows)

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()

    def insert(self, keys: list[bytes], rows: torch.Tensor) -> None:
        """Store precomputed rows (``rows[i]`` for ``keys[i]``), most recent last, bounded."""
        if len(keys) != len(rows):
            raise ValueError(f"{len(keys)} keys for {len(rows)} rows")
        with self._lock:
            if self.max_rows == 0:
                return
            for key, row in zip(keys, rows, strict=True):
                self._rows[key] = row
                self._rows.move_to_end(key)
            while len(self._rows) > self.max_rows:
                self._rows.popitem(last=False)

    def features(self, prefix: nn.Module, x: np.ndarray) -> torch.Tensor:
        """[N, F] float32 features of the rows of ``x`` (a new tensor; N may be 0)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if len(x) == 0:
            with torch.no_grad():
                probe = prefix(torch.zeros(1, *x.shape[1:], dtype=torch.float32))
            return torch.empty(0, probe[0].numel(), dtype=torch.float32)
        keys = row_digests(x)
        found: dict[bytes, torch.Tensor] = {}
        while True:
            claimed, waiting = self._lookup(keys, found)
            if claimed:
                self._compute(prefix, x, keys, claimed, found)
            for event in waiting.values():
                event.wait()
            if not waiting:
                break
            # The rows waited for are in the cache now (or their computation failed, or they
            # were already evicted): look again, computing whatever is still missing.
        return torch.stack([found[key] for key in keys])

    def _lookup(self, keys: list[bytes], found: dict[bytes, torch.Tensor]
                ) -> tuple[dict[bytes, int], dict[bytes, threading.Event]]:
        """Collect cached rows into ``found``; claim missing ones; list those in flight."""
        claimed: dict[bytes, int] = {}  # key -> first row of x with it
        waiting: dict[bytes, threading.Event] = {}
        with self._lock:
            for i, key in enumerate(keys):
                if key in found or key in claimed or key in waiting:
                    continue
                row = self._rows.get(key)
                if row is not None:
                    self._rows.move_to_end(key)
                    found[key] = row
                    self.hits += 1
                elif key in self._pending:
                    waiting[key] = self._pending[key]
                else:
                    self._pending[key] = threading.Event()
                    claimed[key] = i
        return claimed, waiting

    def _compute(self, prefix: nn.Module, x: np.ndarray, keys: list[bytes],
                 claimed: dict[bytes, int], found: dict[bytes, torch.Tensor]) -> None:
        todo = list(claimed.items())
        try:
            for start in range(0, len(todo), self.chunk):
                part = todo[start : start + self.chunk]
                index = np.fromiter((i for _key, i in part), dtype=np.int64, count=len(part))
                with torch.no_grad():
                    out = prefix(torch.from_numpy(x[index])).reshape(len(part), -1)
                rows = [row.clone() for row in out.to(torch.float32)]
                with self._lock:
                    for (key, _i), row in zip(part, rows, strict=True):
                        found[key] = row
                        self.computed += 1
                        if self.max_rows > 0:
                            self._rows[key] = row
                        self._pending.pop(key).set()
                    while len(self._rows) > self.max_rows:
                        self._rows.popitem(last=False)
        finally:
            # On an error, release the claims still held so that waiters retry themselves.
            with self._lock:
                for key, _i in todo:
                    event = self._pending.pop(key, None)
                    if event is not None:
                        event.set()


_caches: dict[bytes, FeatureCache] = {}
_caches_lock = threading.Lock()
_cache_rows = DEFAULT_CACHE_ROWS


def feature_cache(prefix: nn.Module, row_shape: tuple[int, ...]) -> FeatureCache:
    """The process-wide cache for ``prefix`` on inputs of ``row_shape`` (created on demand)."""
    key = _prefix_key(prefix, tuple(row_shape))
    with _caches_lock:
        cache = _caches.get(key)
        if cache is None:
            cache = _caches[key] = FeatureCache(_cache_rows)
        return cache


def cached_features(prefix: nn.Module, x: np.ndarray, dtype: torch.dtype = torch.float32
                    ) -> torch.Tensor:
    """``prefix(x)`` flattened to [N, F], computing only rows this process has not seen.

    With the caches disabled (:func:`configure_feature_cache` ``(0)``) the features go
    straight into one tensor (:func:`direct_features`): no per-row copies, whose freed heap
    would stay resident. ``dtype``: how the result is stored (the features are computed in
    float32 and rounded once, row by row; ``torch.float16`` halves the memory). The cache
    itself always holds float32."""
    if _cache_rows == 0:
        return direct_features(prefix, x, chunk=DIRECT_CHUNK, dtype=dtype)
    features = feature_cache(prefix, tuple(x.shape[1:])).features(prefix, x)
    return features if dtype == torch.float32 else features.to(dtype)


def direct_features(prefix: nn.Module, x: np.ndarray, chunk: int = DEFAULT_CACHE_CHUNK,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``prefix(x)`` flattened to [N, F], ``chunk`` rows per forward pass (the transform's
    peak memory is bounded by the chunk, not the data set), stored as ``dtype`` (computed in
    float32, each chunk rounded as it is written)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    with torch.no_grad():
        first = prefix(torch.from_numpy(x[:chunk] if len(x) else np.zeros(
            (1, *x.shape[1:]), dtype=np.float32)))
        width = first[0].numel()
        out = torch.empty(len(x), width, dtype=dtype)
        for start in range(0, len(x), chunk):
            part = first if start == 0 else prefix(torch.from_numpy(x[start : start + chunk]))
            out[start : start + len(part)] = part.reshape(len(part), width)
    return out


def configure_feature_cache(max_rows: int = DEFAULT_CACHE_ROWS) -> None:
    """Bound every feature cache (existing and future) to ``max_rows`` rows; 0 disables."""
    global _cache_rows
    if max_rows < 0:
        raise ValueError(f"max_rows must be >= 0, got {max_rows}")
    with _caches_lock:
        _cache_rows = max_rows
        caches = list(_caches.values())
    for cache in caches:
        with cache._lock:
            cache.max_rows = max_rows
            while len(cache._rows) > max_rows:
                cache._rows.popitem(last=False)


def clear_feature_caches() -> None:
    """Drop every cached feature row (frees their memory once no trainer holds a copy)."""
    with _caches_lock:
        caches = list(_caches.values())
        _caches.clear()
    for cache in caches:
        cache.clear()


# --------------------------------------------------------------------------- disk store
#: Environment variable naming the directory of the on-disk feature store.
CACHE_DIR_ENV = "MURMUR_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$MURMUR_CACHE_DIR`` if set (and not empty), else ``~/.cache/murmur/features``."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "murmur" / "features"


def store_key(prefix: nn.Module, x: np.ndarray) -> str:
    """Hex key of the features of the whole array ``x``: prefix configuration, shape, bytes."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    h.update(_prefix_key(prefix, tuple(x.shape[1:])))
    h.update(repr(tuple(x.shape)).encode())
    h.update(memoryview(x).cast("B"))
    return h.hexdigest()


def store_path(cache_dir: Path, prefix: nn.Module, x: np.ndarray) -> Path:
    return Path(cache_dir) / f"features-{store_key(prefix, x)}.npy"


def _all_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _load_store(path: Path, rows: int) -> torch.Tensor | None:
    """The stored [rows, F] float32 features, or None (missing; unreadable ones are removed)."""
    try:
        stored = np.load(path, mmap_mode="r", allow_pickle=False)
        if stored.dtype != np.float32 or stored.ndim != 2 or stored.shape[0] != rows \
                or stored.shape[1] < 1:
            raise ValueError(f"holds {stored.dtype} {stored.shape}, expected float32 ({rows}, F)")
        features = torch.from_numpy(np.array(stored))  # read it all now: a private copy
        del stored
        return features
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError) as exc:
        log.warning("feature store %s is unreadable (%s); removing it and recomputing",
                    path, exc)
        path.unlink(missing_ok=True)
        return None


def _save_store(path: Path, features: torch.Tensor) -> None:
    from peer.files import atomic_write_with

    array = features.numpy()
    try:
        atomic_write_with(path, lambda handle: np.save(handle, array, allow_pickle=False))
    except OSError as exc:  # a full or read-only disk: the run goes on without the store
        log.warning("cannot write feature store %s: %s", path, exc)
        return
    log.info("stored features in %s (%.0f MB)", path, path.stat().st_size / 1e6)


def warm_cache(prefix: nn.Module, x: np.ndarray, *, cache_dir: Path | None) -> torch.Tensor:
    """Put the features of every row of ``x`` in the process-wide cache; [N, F] float32.

    With ``cache_dir`` (usually :func:`default_cache_dir`), the features of the whole array
    are loaded from ``<cache_dir>/features-<key>.npy`` (:func:`store_key`) when it exists;
    otherwise they are computed, through the in-memory cache, with all available torch threads
    (the previous thread count is restored after), and written there atomically. A file that
    is corrupt, truncated or of the wrong shape is logged, removed and recomputed; a store
    that cannot be written is logged and skipped. ``cache_dir=None``: no disk store.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    cache = feature_cache(prefix, tuple(x.shape[1:]))
    started = time.perf_counter()
    path = store_path(cache_dir, prefix, x) if cache_dir is not None else None
    if path is not None:
        features = _load_store(path, len(x))
        if features is not None:
            cache.insert(row_digests(x), features)
            log.info("loaded features of %d rows from %s in %.1f s", len(x), path,
                     time.perf_counter() - started)
            return features
    previous = torch.get_num_threads()
    threads = _all_threads()
    torch.set_num_threads(threads)
    try:
        features = cache.features(prefix, x)
    finally:
        torch.set_num_threads(previous)
    log.info("computed features of %d rows in %.1f s (%d torch threads)", len(x),
             time.perf_counter() - started, threads)
    if path is not None:
        _save_store(path, features)
    return features
