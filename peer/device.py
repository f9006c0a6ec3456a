"""Device profiles (``[device] profile``): the lean settings for a small device, picked together.

A profile changes *defaults*, never an operator's choice: its values go under the config
file's own ``[training]``, ``[session]``, ``[pace]`` and top-level keys, so a key set in the
file wins. It also sets things of the process itself before the peer is built: torch's
intra-op threads, glibc's allocator and the feature cache. ``"default"`` changes nothing.

``"small"`` (a Raspberry Pi 3 / Zero 2 W class device; measured in
docs/deploy/raspberry-pi.md and ``bench/resource_bench.py``):

* accountant figures from an epsilon table (``epsilon_table``): the same exact PLD epsilon
  without dp-accounting and scipy resident (-62 MB on the CNN shard);
* evaluation in batches of 128 (a 1024-image CNN batch held +27 MB at its peak);
* one torch thread (the broker, the sessions' crypto and the OS keep the other cores), and
  torch's own convolution kernels instead of oneDNN's (-16 MB on the CNN shard, the same CPU
  per round measured here);
* glibc: allocations of 64 KiB and more are their own mappings, returned to the system when
  freed, one malloc arena, trim at 64 KiB (the data set's load-time copy and a round's
  per-example buffers no longer stay resident as freed heap);
* no process-wide feature cache (the scatter model's trainer keeps its own features; the
  cache held a second copy, 15.9 KB per image);
* the scatter model's features stored as float16 (``feature_dtype``; 7.9 KB per image instead
  of 15.9, each batch converted back to float32 for the model; the same accuracy measured);
* groups of 3 (threshold 2) with masked sessions: about a third of the bytes per member of a
  Shamir session at g = 3 (docs/results.md);
* after the budget, an averaging session at most every 5 minutes (``[pace]``; the default
  5 s would let a small MLP peer send about 10 MB an hour);
* a checkpoint every 10 minutes, not after every round (SD-card writes; the ledger is still
  written before any update leaves, so no privacy cost is ever lost).

The model stays the trainer's default (``"mlp"``); ``"cnn"`` on 28x28 images fits the profile
too (measured), and so does ``"scatter"`` on a shard with float16 features (319 MB measured).
"""

from __future__ import annotations

import ctypes
import logging
import platform
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


@dataclass(frozen=True)
class AllocatorSettings:
    """glibc malloc tuning applied with ``mallopt`` (no effect with another libc)."""

    mmap_threshold_bytes: int
    trim_threshold_bytes: int
    arena_max: int | None = None  # None: glibc's own (8 per core)


@dataclass(frozen=True)
class DeviceProfile:
    """The defaults one profile changes (read-only mappings of field name to value)."""

    training: MappingProxyType[str, Any] = field(
        default_factory=lambda: MappingProxyType({}))
    session: MappingProxyType[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    top_level: MappingProxyType[str, Any] = field(
        default_factory=lambda: MappingProxyType({}))
    pace: MappingProxyType[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    torch_threads: int | None = None  # None: torch's own choice (one per core)
    # False: torch's own convolution kernels instead of oneDNN's (mkldnn), whose scratch and
    # code pages cost the CNN about 16 MB resident for no CPU measured here. None: torch's.
    torch_mkldnn: bool | None = None
    allocator: AllocatorSettings | None = None
    # Rows kept by the process-wide feature cache (peer/training/features.py; None: its
    # default). A daemon's trainer keeps its own features, so its cache only duplicates them.
    feature_cache_rows: int | None = None


PROFILES: MappingProxyType[str, DeviceProfile] = MappingProxyType({
    "default": DeviceProfile(),
    "small": DeviceProfile(
        training=MappingProxyType({"epsilon_table": True, "eval_batch_size": 128,
                                   "feature_dtype": "float16"}),
        session=MappingProxyType({"group_size": 3, "threshold": 2, "kind": "masked"}),
        top_level=MappingProxyType({"checkpoint_interval_s": 600.0}),
        pace=MappingProxyType({"averaging_interval_s": 300.0}),
        torch_threads=1,
        torch_mkldnn=False,
        feature_cache_rows=0,
        allocator=AllocatorSettings(mmap_threshold_bytes=64 * 1024,
                                    trim_threshold_bytes=64 * 1024, arena_max=1),
    ),
})


@dataclass(frozen=True)
class DeviceConfig:
    """``[device]``: which profile's defaults and process settings the peer uses."""

    profile: str = "default"

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {tuple(PROFILES)}, got {self.profile!r}")

    @property
    def settings(self) -> DeviceProfile:
        return PROFILES[self.profile]


def with_profile(defaults: MappingProxyType[str, Any], table: dict[str, Any]) -> dict[str, Any]:
    """A config table with a profile's defaults under it (the file's own keys win)."""
    return {**defaults, **table}


def apply_allocator(settings: AllocatorSettings) -> bool:
    """Tune glibc's malloc for this process; False (logged) where it is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        log.info("not glibc: allocator settings of the device profile not applied")
        return False
    libc = ctypes.CDLL(None)
    applied = all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, settings.mmap_threshold_bytes),
        (_M_TRIM_THRESHOLD, settings.trim_threshold_bytes),
        (_M_ARENA_MAX, settings.arena_max)) if value is not None)
    if not applied:
        log.warning("glibc refused an allocator setting of the device profile: %s", settings)
    return applied


def apply_process_settings(device: DeviceConfig) -> None:
    """The profile's process-wide settings: allocator first (before data is loaded), then
    torch's threads. Call once, from the main thread, before the peer is built."""
    profile = device.settings
    if profile.allocator is not None:
        apply_allocator(profile.allocator)
    if profile.torch_threads is not None:
        from peer.training.models import configure_torch_threads  # imports torch

        configure_torch_threads(profile.torch_threads)
    if profile.torch_mkldnn is not None:
        import torch

        torch.backends.mkldnn.enabled = profile.torch_mkldnn
    if profile.feature_cache_rows is not None:
        from peer.training.features import configure_feature_cache

        configure_feature_cache(profile.feature_cache_rows)
