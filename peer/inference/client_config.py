"""A client's config (``client.toml``): a peer config plus the keys only ``murmur-query`` reads.

    owner = "NAME"       # the model owner whose signed snapshot descriptions to trust
    snapshot = "HEX"     # optional: pin one snapshot id (32 hex characters)

Both are top-level keys, and both are what the flags ``--owner`` / ``--snapshot`` give; a flag
overrides its key (docs/inference.md). ``murmur-peer provision --clients NAMES --owner NAME``
writes ``owner`` into every client's config. A bad value is a :class:`ConfigError` naming the
file and the key (``client.toml: owner: 'Bob!' must match ...``). The keys belong to the
client: ``murmur-peer run`` and ``serve`` do not read them (in a peer config they are unknown).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peer.config import ConfigError, PeerConfig, build_dataclass, load_config, read_config_document
from protocol.limits import ID_PATTERN, SESSION_ID_BYTES, is_valid_id

#: The top-level keys of client.toml that murmur-query reads and the peer config does not know.
QUERY_KEYS = ("owner", "snapshot")


@dataclass(frozen=True)
class QueryKeys:
    """``owner`` and ``snapshot`` as written in client.toml; absent is None."""

    owner: str | None = None
    snapshot: str | None = None  # hex of a snapshot id

    def __post_init__(self) -> None:
        if self.owner is not None and not is_valid_id(self.owner):
            raise ValueError(f"owner: {self.owner!r} must be a peer id matching {ID_PATTERN} "
                             "(lower-case letters, digits, '_' and '-', at most 64)")
        if self.snapshot is not None:
            snapshot_id_bytes(self.snapshot, "snapshot")


def snapshot_id_bytes(text: str, key: str) -> bytes:
    """A snapshot id from its hex (32 characters); ValueError naming ``key`` otherwise."""
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != SESSION_ID_BYTES:
        raise ValueError(f"{key}: {text!r} must be a snapshot id: {2 * SESSION_ID_BYTES} hex "
                         "characters, as publish-snapshot prints it")
    return value


@dataclass(frozen=True)
class ClientConfig:
    """A client's peer config (identity, broker) and its query keys."""

    peer: PeerConfig
    query: QueryKeys


def load_client_config(path: Path) -> ClientConfig:
    """Read client.toml; ConfigError (one line, file and key) on any fault in either part."""
    path = Path(path)
    document = read_config_document(path)
    query_table = {key: document.pop(key) for key in QUERY_KEYS if key in document}
    try:
        query = build_dataclass(QueryKeys, query_table, "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return ClientConfig(peer=load_config(path, document), query=query)
