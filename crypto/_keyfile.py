"""The self-describing key file format shared by identities and admission keys.

A key file is a small UTF-8 JSON object::

    {"format": "murmur-key", "version": 1, "kind": "identity", ...hex-encoded fields...}

The ``format`` tag recognises a foreign file, ``kind`` a file of the wrong kind (e.g. an
admission key passed where a peer identity is expected), and ``version`` a future layout. Every
problem becomes a :class:`KeyFileError` naming the path and what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from crypto._atomic import read_key_file, write_private_file
from crypto.errors import KeyFileError

KEY_FILE_FORMAT = "murmur-key"
KEY_FILE_VERSION = 1


def save_key_file(path: Path, kind: str, fields: dict[str, str], *, overwrite: bool) -> None:
    """Atomically write a key file of ``kind`` with mode 0600 (see ``write_private_file``)."""
    document = {"format": KEY_FILE_FORMAT, "version": KEY_FILE_VERSION, "kind": kind, **fields}
    data = (json.dumps(document, indent=1, sort_keys=True) + "\n").encode("utf-8")
    write_private_file(Path(path), data, overwrite=overwrite)


def load_key_file(path: Path, kind: str) -> dict[str, object]:
    """Read and check the envelope of a key file; returns the whole JSON object."""
    data = read_key_file(path)
    if not data:
        raise KeyFileError(f"{path}: empty file (truncated), not a murmur key file")
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KeyFileError(
            f"{path}: not a murmur key file (truncated or foreign: not valid JSON)"
        ) from None
    if not isinstance(document, dict) or document.get("format") != KEY_FILE_FORMAT:
        raise KeyFileError(f"{path}: not a murmur key file (missing format tag)")
    version = document.get("version")
    if type(version) is not int or version != KEY_FILE_VERSION:
        raise KeyFileError(
            f"{path}: unsupported key file version {version!r}"
        )
    found_kind = document.get("kind")
    if found_kind != kind:
        raise KeyFileError(f"{path}: is a {found_kind!r} key file, expected a {kind!r} key file")
    return document


def hex_field(path: Path, document: dict[str, object], name: str, length: int) -> bytes:
    """Return the hex field ``name`` decoded to exactly ``length`` bytes, or KeyFileError."""
    value = document.get(name)
    if not isinstance(value, str):
        raise KeyFileError(f"{path}: field {name!r} is missing or not a string")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise KeyFileError(f"{path}: field {name!r} is not hex") from None
    if len(raw) != length:
        raise KeyFileError(f"{path}: field {name!r} has {len(raw)} bytes, expected {length}")
    return raw


def str_field(path: Path, document: dict[str, object], name: str) -> str:
    """Return the string field ``name`` or raise KeyFileError."""
    value = document.get(name)
    if not isinstance(value, str):
        raise KeyFileError(f"{path}: field {name!r} is missing or not a string")
    return value


def name_field(
    path: Path, document: dict[str, object], name: str, check: Callable[[str], object]
) -> str:
    """Return the string field ``name`` after ``check`` (which raises ValueError) accepts it;
    KeyFileError naming the path otherwise."""
    value = str_field(path, document, name)
    try:
        check(value)
    except ValueError as exc:
        raise KeyFileError(f"{path}: {exc}") from None
    return value

