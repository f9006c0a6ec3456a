"""What a peer config's paths point at: key files, small secrets, the admission key, data specs.

A relative path in a config file is resolved against the file's directory (``base``), so a
config and its key files can move together. Every function here raises :class:`ConfigError`
with the key first (``"identity_file: file /x/id.key does not exist"``); :func:`peer.config.
load_config` puts the file's name in front.
"""

from __future__ import annotations

from pathlib import Path

from peer.errors import ConfigError
from peer.files import FileReadError, read_small_file
from peer.training.import_path import ImportPathError, check_import_path

__all__ = [
    "admission_key",
    "data_spec",
    "existing_file",
    "parse_public_key_hex",
    "read_small_text",
]

_HEX_KEY_CHARS = 64  # a 32-byte Ed25519 public key in hex
# Largest file read as a small text value (admission public key, broker password).
_MAX_SMALL_FILE = 4096


def existing_file(base: Path, raw: Path, key: str) -> Path:
    """``raw`` resolved against ``base``; ConfigError unless it is an existing file."""
    path = raw if raw.is_absolute() else base / raw
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ConfigError(f"{key}: file {path} {what}")
    return path


def read_small_text(path: Path, key: str, what: str) -> str:
    """The stripped UTF-8 text of a small file (a key, a password); ConfigError if not."""
    try:
        data = read_small_file(path, _MAX_SMALL_FILE, what)
    except FileReadError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not UTF-8 text") from None


def parse_public_key_hex(text: str) -> bytes | None:
    """32 bytes from 64 hex characters, else None."""
    text = text.strip()
    if len(text) != _HEX_KEY_CHARS:
        return None
    try:
        return bytes.fromhex(text)
    except ValueError:
        return None


def admission_key(value: str, base: Path) -> bytes:
    """``admission_public_key``: 64 hex characters, or a file that holds them."""
    key = parse_public_key_hex(value)
    if key is not None:
        return key
    path = existing_file(base, Path(value), "admission_public_key")
    key = parse_public_key_hex(read_small_text(path, "admission_public_key", "public key file"))
    if key is None:
        raise ConfigError(f"admission_public_key: {path} does not hold a 64-character hex key")
    return key


def data_spec(value: str, base: Path) -> str:
    """Check a data source spec and make its path absolute (peer.training.data)."""
    kind, sep, rest = value.partition(":")
    if kind == "digits" and not sep:
        return value
    if kind in ("fashion-mnist", "mnist"):
        if (sep or kind == "mnist") and not rest:
            raise ConfigError(f"data: '{kind}:' needs a directory after the colon")
        if rest:
            root = Path(rest) if Path(rest).is_absolute() else base / rest
            if not root.is_dir():
                raise ConfigError(f"data: directory {root} does not exist")
            return f"{kind}:{root}"
        return value
    if kind == "blocks" and sep and rest:
        # A growing directory of .npz files, one privacy budget per block of arrivals.
        root = Path(rest) if Path(rest).is_absolute() else base / rest
        if not root.is_dir():
            raise ConfigError(f"data: block directory {root} does not exist")
        return f"blocks:{root}"
    if kind in ("csv", "npz") and sep and rest:
        path_text, hash_sign, label = rest.partition("#")
        path = existing_file(base, Path(path_text), "data")
        return f"{kind}:{path}{hash_sign}{label}"
    if kind == "python" and sep:
        # A user's loader (peer/training/user_data.py): the path is checked here, the
        # module imported only when the data loads.
        try:
            check_import_path(rest, "data")
        except ImportPathError as exc:
            raise ConfigError(f"data: 'python:' needs a loader: {exc}") from None
        return value
    raise ConfigError(f"data: {value!r} is not a data source; use 'digits', "
                      "'fashion-mnist[:DIR]', 'mnist:DIR', 'csv:PATH[#LABEL]', 'npz:PATH' or "
                      "'blocks:DIR'")
