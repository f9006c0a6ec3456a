"""MNIST-format IDX files (Fashion-MNIST, MNIST): checked and decoded without holding them twice.

Every problem with a file (missing, truncated, wrong magic, bad labels) raises
:class:`~peer.training.tables.DataError` naming the path. Images are decoded in chunks straight
into one float32 array scaled by the public constant 1/255 (:mod:`peer.training.data` wraps
them in a ``Dataset``).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from peer.training.tables import DataError

IDX_IMAGE_MAGIC = 0x00000803
IDX_LABEL_MAGIC = 0x00000801


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except (OSError, EOFError) as exc:  # BadGzipFile is an OSError; EOFError = truncated gzip
        raise DataError(f"{path}: cannot read ({exc})") from exc


def _parse_idx(path: Path, expected_magic: int, dims: int) -> np.ndarray:
    data = _read_bytes(path)
    header = 4 + 4 * dims
    if len(data) >= 4:
        (magic,) = struct.unpack(">I", data[:4])
        if magic != expected_magic:
            raise DataError(
                f"{path}: IDX magic {magic:#010x}, expected {expected_magic:#010x}"
            )
    if len(data) < header:
        raise DataError(f"{path}: {len(data)} bytes is too short for an IDX header")
    shape = struct.unpack(f">{dims}I", data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise DataError(
            f"{path}: IDX header promises {expected} bytes of data, file has {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


#: Image rows decoded per read when streaming an IDX image file (bounds the loading copy).
IDX_CHUNK_ROWS = 4096


def _open_idx(path: Path) -> BinaryIO:
    try:
        return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc


def _stream_idx_images(path: Path) -> np.ndarray:
    """An IDX image file as float32 [N, 1, H, W] in [0, 1], decoded in chunks straight into
    the result: the file's bytes are never held whole beside it (Fashion-MNIST: a 47 MB
    bytes object less at the loading peak). Values as ``astype(float32) / 255`` of the whole."""
    try:
        with _open_idx(path) as handle:
            header = handle.read(16)
            if len(header) >= 4 and struct.unpack(">I", header[:4])[0] != IDX_IMAGE_MAGIC:
                raise DataError(f"{path}: IDX magic {struct.unpack('>I', header[:4])[0]:#010x}, "
                                f"expected {IDX_IMAGE_MAGIC:#010x}")
            if len(header) < 16:
                raise DataError(f"{path}: {len(header)} bytes is too short for an IDX header")
            count, height, width = struct.unpack(">3I", header[4:])
            x = np.empty((count, 1, height, width), dtype=np.float32)
            row_bytes = height * width
            for start in range(0, count, IDX_CHUNK_ROWS):
                rows = min(IDX_CHUNK_ROWS, count - start)
                chunk = handle.read(rows * row_bytes)
                if len(chunk) != rows * row_bytes:
                    raise DataError(f"{path}: IDX header promises {count * row_bytes} bytes of "
                                    f"data, file has {start * row_bytes + len(chunk)}")
                part = np.frombuffer(chunk, dtype=np.uint8).astype(np.float32)
                part /= np.float32(255.0)
                x[start : start + rows, 0] = part.reshape(rows, height, width)
            extra = len(handle.read())
            if extra:
                raise DataError(f"{path}: IDX header promises {count * row_bytes} bytes of "
                                f"data, file has {count * row_bytes + extra}")
    except (OSError, EOFError) as exc:  # BadGzipFile is an OSError; EOFError = truncated gzip
        raise DataError(f"{path}: cannot read ({exc})") from exc
    return x


def read_idx(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [N, 1, H, W] in [0, 1], uint8 [N] labels 0..9) of an IDX image + label pair."""
    targets = _parse_idx(labels, IDX_LABEL_MAGIC, 1)
    x = _stream_idx_images(images)
    if len(x) != len(targets):
        raise DataError(f"{images}: {len(x)} images but {labels} has {len(targets)} labels")
    if len(targets) and int(targets.max()) > 9:
        raise DataError(f"{labels}: label {int(targets.max())} outside 0..9")
    return x, targets


def idx_file(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.exists():
            return candidate
    raise DataError(f"{root / stem}[.gz]: file not found")
