"""The sensor example's data loader: windows of a synthetic three-axis vibration signal.

The example ships no data: :func:`load` generates it, the same every time (a fixed seed), as a
device would read its own recordings. Each record is one window of ``WINDOW`` samples on
three channels; its label is the machine state that produced it:

* ``idle``: sensor noise only;
* ``balanced``: the shaft's rotation frequency on the x and y channels in quadrature;
* ``unbalanced``: the rotation frequency, strong on one radial channel;
* ``bearing``: the rotation frequency plus short bursts at a higher frequency on z;
* ``loose``: the rotation frequency plus its second and third harmonics.

Speeds, phases and gains vary from window to window and every window has sensor noise, so
telling the states apart takes the shape of the signal, not one number.

The loader declares the class list and the standardisation (the generator's known signal
scale), as the public-constants rule asks (docs/privacy.md): nothing is computed from the
windows. ``python -m sim --model examples.sensor.model:build
--dataset python:examples.sensor.data:load`` trains on it (the simulation splits it among its
peers); a daemon uses :func:`load_device`, its own machine's recordings.
"""

from __future__ import annotations

import os

import numpy as np

from peer import Dataset

CLASSES = ("idle", "balanced", "unbalanced", "bearing", "loose")
CHANNELS = 3
WINDOW = 64
RECORDS = 6000
SAMPLE_RATE_HZ = 400.0
NOISE_STD = 0.8
#: The declared standardisation: the signals are zero-mean and of about this scale.
SIGNAL_SCALE = 1.5
SEED = 20240601
#: Records one device has recorded (``load_device``).
DEVICE_RECORDS = 600
#: Which device this is, for ``load_device``: the environment variable's value, 0, 1, 2...
DEVICE_VARIABLE = "SENSOR_DEVICE"


def _window(kind: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(WINDOW) / SAMPLE_RATE_HZ
    speed = rng.uniform(15.0, 35.0)  # shaft rotation, Hz
    phase = rng.uniform(0, 2 * np.pi)
    gain = rng.uniform(0.6, 1.4)
    x = rng.normal(0.0, NOISE_STD, size=(CHANNELS, WINDOW))
    rotation = np.sin(2 * np.pi * speed * t + phase)
    quadrature = np.cos(2 * np.pi * speed * t + phase)
    if kind == 1:
        x[0] += 0.8 * gain * rotation
        x[1] += 0.8 * gain * quadrature
    elif kind == 2:
        x[int(rng.integers(0, 2))] += 1.6 * gain * rotation
    elif kind == 3:
        x[0] += 0.6 * gain * rotation
        bursts = (np.sin(2 * np.pi * speed * t) > 0.7).astype(float)
        x[2] += 1.4 * gain * bursts * np.sin(2 * np.pi * 150.0 * t + phase)
    elif kind == 4:
        for harmonic, weight in ((1, 0.6), (2, 0.6), (3, 0.5)):
            x[0] += weight * gain * np.sin(2 * np.pi * harmonic * speed * t + harmonic * phase)
    return x


def generate(records: int = RECORDS, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """(windows [records, CHANNELS, WINDOW] float32, labels [records] class names)."""
    rng = np.random.default_rng(seed)
    kinds = rng.integers(0, len(CLASSES), size=records)
    windows = np.stack([_window(int(k), rng) for k in kinds]).astype(np.float32)
    return windows, np.array([CLASSES[k] for k in kinds])


def load() -> Dataset:
    """Every window and its state name, with the declared class list and standardisation."""
    windows, labels = generate()
    return Dataset(features=windows, labels=labels, classes=CLASSES,
                   feature_mean=0.0, feature_scale=SIGNAL_SCALE)


def load_device() -> Dataset:
    """This device's own windows: ``DEVICE_RECORDS`` of them, different on every device
    (seeded by ``$SENSOR_DEVICE``), with the same declared constants as :func:`load`."""
    device = int(os.environ.get(DEVICE_VARIABLE, "0"))
    windows, labels = generate(DEVICE_RECORDS, SEED + 1 + device)
    return Dataset(features=windows, labels=labels, classes=CLASSES,
                   feature_mean=0.0, feature_scale=SIGNAL_SCALE)
