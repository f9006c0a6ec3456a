"""Atomic, private file writes and bounded reads for key material.

Why: a key file must never be observed half-written (a crash mid-write would leave a truncated
key) and must never be readable by other local users, even for a moment. The file is created
with mode 0600 by ``tempfile.mkstemp`` in the destination directory, fully written and fsynced,
then moved into place in one atomic step; the directory is fsynced so the rename survives a
power cut.

This is crypto's own writer, for key files only: ``crypto/`` imports nothing above it, so it
cannot use ``peer.files``, and nothing outside ``crypto/`` imports this private module (peer/
and sim/ write through ``peer.files.atomic_write_bytes``). Both writers follow the same rules.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from crypto.errors import KeyFileError

#: Key files are tiny; anything bigger is certainly not one of ours.
MAX_KEY_FILE_BYTES = 64 * 1024


#: errno values with which a file system says it cannot fsync a directory at all.
_NO_DIR_FSYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable; the same rule as ``peer.files`` (one behaviour for both).

    A file system that does not support fsync on a directory (EINVAL / ENOTSUP: some network
    and FUSE mounts) is accepted: the rename is as durable as it can make it, and refusing
    would make key files impossible to write there. Any other failure (EIO, ...) raises: a key
    the caller believes saved could vanish at the next power cut.
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


def write_private_file(
    path: Path, data: bytes, *, overwrite: bool = False, mode: int = 0o600
) -> None:
    """Write ``data`` to ``path`` atomically with permissions ``mode`` (0600 by default).

    Raises ``FileExistsError`` if ``path`` exists and ``overwrite`` is false. Without overwrite
    the final step is ``os.link``, which fails atomically if another writer created the file in
    the meantime, so an existing key is never clobbered by a race. The permissions are set on
    the temporary file before any byte is written, so a secret is never readable by others.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not overwrite and path.exists():
        raise FileExistsError(f"{path}: exists; refusing to overwrite it")
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(
                    f"{path}: exists; refusing to overwrite it"
                ) from None
            except OSError:
                # File system without hard links: fall back to check-then-rename.
                if path.exists():
                    raise FileExistsError(
                        f"{path}: exists; refusing to overwrite it"
                    ) from None
                os.replace(tmp, path)
        _fsync_directory(directory)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def read_key_file(path: Path) -> bytes:
    """Read a key file, mapping every OS-level failure to :class:`KeyFileError`."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: key file does not exist") from None
    except IsADirectoryError:
        raise KeyFileError(f"{path}: is a directory, not a key file") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file ({exc.strerror})") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path}: too large to be a key file")
    return data
