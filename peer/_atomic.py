"""Atomic file replacement for everything the peer persists (ledger, checkpoints).

Write to a temporary file in the same directory, flush and fsync it, ``os.replace`` it over
the target, then fsync the directory. A crash (SIGKILL, power loss) at any point leaves either
the complete old file or the complete new one, never a torn mix.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: A temporary file this old cannot belong to a write in progress (writes take milliseconds).
STALE_TEMP_AGE_S = 300.0


def remove_stale_temps(path: Path, *, older_than_s: float = STALE_TEMP_AGE_S) -> int:
    """Delete temporary files a killed writer left beside ``path``; returns how many.

    Why: a SIGKILL or power cut between ``mkstemp`` and ``os.replace`` leaves a
    ``.NAME.*.tmp`` file behind. Each is as large as a checkpoint, so on a device that loses
    power often they would fill the disk. Only files older than ``older_than_s`` are removed,
    so a concurrent writer's temporary file is never touched.
    """
    removed = 0
    now = time.time()
    for candidate in Path(path).parent.glob(f".{Path(path).name}.*.tmp"):
        try:
            if now - candidate.stat().st_mtime < older_than_s:
                continue
            candidate.unlink()
        except FileNotFoundError:
            continue  # another cleaner got there first
        removed += 1
    return removed


@contextlib.contextmanager
def _temp_beside(path: Path) -> Iterator[tuple[BinaryIO, Path]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle, tmp
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    with _temp_beside(Path(path)) as (handle, _tmp):
        handle.write(data)


def atomic_write_with(path: Path, writer: Callable[[BinaryIO], None]) -> None:
    """Replace ``path`` with whatever ``writer`` writes to the open binary handle."""
    with _temp_beside(Path(path)) as (handle, _tmp):
        writer(handle)
