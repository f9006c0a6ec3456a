"""The one atomic file writer and the one bounded file reader of ``peer/`` and ``sim/``.

Everything the peer and the simulation persist (ledger, checkpoints, provisioned keys'
companion files, certificates, run reports) goes through :func:`atomic_write_bytes` or
:func:`atomic_write_with`: write to a temporary file in the same directory, flush and fsync it,
``os.replace`` it over the target (or ``os.link`` it, to never overwrite), then fsync the
directory. A crash (SIGKILL, power loss) at any point leaves either the complete old file or
the complete new one, never a torn mix. Small files that must stay small (certificates, public
keys, passwords) are read with :func:`read_bounded`.

``crypto/`` keeps its own writer for key files (crypto/_atomic.py), because it may import
nothing from ``peer/``; the two follow the same rules, including :func:`_fsync_dir`'s.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from peer.errors import PeerError

#: errno values with which a file system says it cannot fsync a directory at all.
_NO_DIR_FSYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable.

    The same rule as crypto/_atomic.py: a file system that does not support fsync on a
    directory (EINVAL / ENOTSUP: some network and FUSE mounts) is accepted silently, since the
    rename is then as durable as that file system can make it and refusing would make it
    unusable. Any other failure (EIO, ...) raises: the new file may not survive a power cut,
    and a caller such as the privacy ledger must not go on as if it would.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIR_FSYNC:
            raise


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


def _link_new(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` only if ``path`` does not exist, even against a racing writer."""
    try:
        # link() fails if another writer created the file meanwhile: never clobbered.
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path}: exists; refusing to overwrite it") from None
    except OSError:
        # A file system without hard links: fall back to check-then-rename.
        if path.exists():
            raise FileExistsError(f"{path}: exists; refusing to overwrite it") from None
        os.replace(tmp, path)
        return
    tmp.unlink()


@contextlib.contextmanager
def _temp_beside(path: Path, mode: int, overwrite: bool) -> Iterator[BinaryIO]:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path}: exists; refusing to overwrite it")
    remove_stale_temps(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            # Permissions before the first byte: a secret is never readable by others.
            os.fchmod(handle.fileno(), mode)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o600,
                       overwrite: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically and durably, with permissions ``mode``.

    ``overwrite=False`` raises FileExistsError instead of replacing an existing file, even
    one another writer creates while this one writes.
    """
    with _temp_beside(Path(path), mode, overwrite) as handle:
        handle.write(data)


def atomic_write_with(path: Path, writer: Callable[[BinaryIO], None], *,
                      mode: int = 0o600) -> None:
    """Replace ``path`` with whatever ``writer`` writes to the open binary handle."""
    with _temp_beside(Path(path), mode, True) as handle:
        writer(handle)


class FileTooLargeError(PeerError, ValueError):
    """A file that should be small is larger than its limit (it is not what we expect)."""


class FileReadError(PeerError):
    """A small file could not be read; the message names the path, what it is and why."""


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of ``path``, at most ``limit`` of them; FileTooLargeError beyond.

    Reads ``limit + 1`` bytes at most, so a huge or endless file (a FIFO, /dev/zero) costs no
    more memory than the limit. OSError passes through unchanged.
    """
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise FileTooLargeError(f"{path} is too large ({limit} bytes at most)")
    return data


def read_small_file(path: Path, limit: int, what: str) -> bytes:
    """:func:`read_bounded`, with every failure one :class:`FileReadError` naming ``what``.

    ``what`` says what the file should be ("certificate file"), so the one-line message tells
    the user which of their files is wrong: "PATH: WHAT does not exist", "PATH: is a directory,
    not a WHAT", "PATH: cannot read WHAT (REASON)", "PATH: too large to be a WHAT (...)".
    Callers turn it into their own error type.
    """
    try:
        return read_bounded(path, limit)
    except FileNotFoundError:
        raise FileReadError(f"{path}: {what} does not exist") from None
    except IsADirectoryError:
        raise FileReadError(f"{path}: is a directory, not a {what}") from None
    except FileTooLargeError:
        raise FileReadError(f"{path}: too large to be a {what} ({limit} bytes at most)") from None
    except OSError as exc:
        raise FileReadError(f"{path}: cannot read {what} ({exc.strerror})") from None
