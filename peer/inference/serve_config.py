"""``[serve]``: the settings of ``murmur-peer serve`` in the peer config, flags over them.

    [serve]
    owner = "a"               # = --owner a: the model owner whose snapshots to accept
    standalone = false        # = --standalone: announce this peer itself
    max_clients = 1024        # = --max-clients: client accounts per snapshot
    rows_per_minute = 60000   # = --rows-per-minute: rows answered per client per minute

:class:`ServeConfig` holds the defaults once; the serve flags default to None ("not given")
and :meth:`ServeConfig.with_flags` lays the given ones over the table. ``owner`` must come
from one of the two. A bad value is a :class:`ConfigError` naming the file and the key
(``peer.toml: serve.max_clients: must be in 1..1000000, got 0``); a bad flag names the flag.
``murmur-peer run`` accepts a config with a ``[serve]`` table and ignores it
(``peer.config._TABLES``); only ``serve`` reads it (docs/inference.md, docs/peer.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from peer.config import ConfigError, PeerConfig, build_dataclass, load_config, read_config_document
from peer.errors import PeerError
from peer.inference.serving import ServeLimits
from protocol.limits import ID_PATTERN, is_valid_id

# Upper bounds against a typo (a limit this large is no limit).
MAX_CLIENTS = 1_000_000
MAX_ROWS_PER_MINUTE = 100_000_000


class ServeFlagError(PeerError, ValueError):
    """A serve flag's value is bad; the message names the flag."""


@dataclass(frozen=True)
class ServeConfig:
    """``[serve]`` as written (absent keys: these defaults, which are also the flags')."""

    owner: str | None = None
    standalone: bool = False
    max_clients: int = ServeLimits.max_clients
    rows_per_minute: int = ServeLimits.rows_per_minute

    def __post_init__(self) -> None:
        if self.owner is not None and not is_valid_id(self.owner):
            raise ValueError(f"owner: {self.owner!r} must be a peer id matching {ID_PATTERN} "
                             "(lower-case letters, digits, '_' and '-', at most 64)")
        if not 1 <= self.max_clients <= MAX_CLIENTS:
            raise ValueError(f"max_clients: must be in 1..{MAX_CLIENTS}, got {self.max_clients}")
        if not 1 <= self.rows_per_minute <= MAX_ROWS_PER_MINUTE:
            raise ValueError(f"rows_per_minute: must be in 1..{MAX_ROWS_PER_MINUTE}, "
                             f"got {self.rows_per_minute}")

    def with_flags(self, *, owner: str | None = None, standalone: bool | None = None,
                   max_clients: int | None = None, rows_per_minute: int | None = None
                   ) -> ServeConfig:
        """These settings with every given flag (not None) over its key; ServeFlagError naming
        the flag if a flag's value is bad or no owner is given by either."""
        given = {key: value for key, value in (
            ("owner", owner), ("standalone", standalone), ("max_clients", max_clients),
            ("rows_per_minute", rows_per_minute)) if value is not None}
        try:
            merged = dataclasses.replace(self, **given)
        except ValueError as exc:
            key, _, detail = str(exc).partition(": ")
            raise ServeFlagError(f"--{key.replace('_', '-')}: {detail}") from None
        if merged.owner is None:
            raise ServeFlagError("serve needs the model owner: --owner NAME, or owner = "
                                 "\"NAME\" under [serve] in the config")
        return merged

    def limits(self) -> ServeLimits:
        """The serving peer's bounds (ServeLimits' own snapshot count)."""
        return ServeLimits(max_clients=self.max_clients, rows_per_minute=self.rows_per_minute)


def load_serve_config(path: Path) -> tuple[PeerConfig, ServeConfig]:
    """The peer config and its ``[serve]`` table (defaults when absent); ConfigError (one line,
    file and key) on any fault in either."""
    path = Path(path)
    document = read_config_document(path)
    table = document.get("serve", {})
    try:
        if not isinstance(table, dict):
            raise ConfigError("'serve' must be a table ([serve])")
        serve = build_dataclass(ServeConfig, table, "serve")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return load_config(path, document), serve
