"""The tables of a peer config file (``[session]``, ``[pace]``, ``[broker]``, ``[table]``).

Every table goes the same way: :func:`section` takes it from the parsed document (a value that
is not a table is refused), :func:`build_dataclass` checks its keys and types against a
dataclass, and the dataclass checks its ranges. Each problem is one :class:`ConfigError` that
names the table and the key.
``[training]`` is :class:`~peer.training.config.TrainerConfig` and ``[device]``
:class:`~peer.device.DeviceConfig`, checked the same way by :func:`peer.config.parse_config`.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peer.tomlcheck as tomlcheck
from crypto.field import FixedPoint
from peer.config_paths import existing_file, read_small_text
from peer.errors import ConfigError
from peer.network.broker_settings import BrokerSettings
from peer.network.node import NodeConfig
from peer.network.pacing import PacingConfig
from peer.network.session.common import check_colluders
from peer.network.session.kinds import kind_class
from peer.network.session.shamir import SessionTimeouts
from peer.training.tables import TableConfig
from protocol.chunks import check_max_message_bytes
from protocol.limits import MAX_MEMBERS, MIN_GROUP_SIZE, MIN_THRESHOLD

__all__ = [
    "BrokerKeys",
    "PaceConfig",
    "SessionConfig",
    "build_dataclass",
    "parse_broker",
    "parse_table",
    "section",
]


@dataclass(frozen=True)
class SessionConfig:
    """Aggregation sessions (peer/network/session/shamir.py): group size g, threshold t, timeouts.

    ``cooldown_s`` is the pause after a session (done or aborted) before this peer initiates
    another, so that a peer does not flood the network with invitations. ``kind`` is the
    session a peer runs: "shamir" (default) or "masked" (peer/network/session/masked.py);
    peers of different kinds never group. ``max_message_bytes`` is the largest payload the peer
    publishes; a larger session message goes out as signed chunks (protocol/chunks.py).
    """

    group_size: int = NodeConfig.group_size
    threshold: int = NodeConfig.threshold
    max_colluders: int = NodeConfig.max_colluders  # c: see docs/sessions.md section 3.3
    invite_timeout_s: float = SessionTimeouts.invite_s
    start_timeout_s: float = SessionTimeouts.start_s
    share_timeout_s: float = SessionTimeouts.share_s
    partial_timeout_s: float = SessionTimeouts.partial_s
    cooldown_s: float = NodeConfig.cooldown_s
    frac_bits: int = FixedPoint.frac_bits
    kind: str = NodeConfig.session_kind  # "shamir" or "masked" (peer/network/session/kinds.py)
    max_message_bytes: int = NodeConfig.max_message_bytes  # 16 KiB..8 MiB; larger: chunked

    def __post_init__(self) -> None:
        kind_class(self.kind)  # the session registry judges the kind (ValueError)
        if not MIN_GROUP_SIZE <= self.group_size <= MAX_MEMBERS:
            raise ValueError(f"group_size must be in {MIN_GROUP_SIZE}..{MAX_MEMBERS} "
                             f"(got {self.group_size}); with two members each would learn "
                             "the other's update")
        if not MIN_THRESHOLD <= self.threshold <= self.group_size:
            raise ValueError(f"threshold must be in {MIN_THRESHOLD}..group_size="
                             f"{self.group_size} (got {self.threshold})")
        check_colluders(self.max_colluders, self.group_size, self.threshold)
        for name in ("invite_timeout_s", "start_timeout_s", "share_timeout_s",
                     "partial_timeout_s"):
            value = getattr(self, name)
            if not 0 < value <= 600:
                raise ValueError(f"{name} must be in (0, 600] seconds (got {value})")
        if not 0 <= self.cooldown_s <= 3600:
            raise ValueError(f"cooldown_s must be in [0, 3600] seconds (got {self.cooldown_s})")
        # The field is 31 bits wide: 24 fractional bits leave |x| < 4 for a sum of 16 values,
        # already tight for model updates (crypto.field.FixedPoint.max_abs).
        if not 8 <= self.frac_bits <= 24:
            raise ValueError(f"frac_bits must be in 8..24 (got {self.frac_bits})")
        check_max_message_bytes(self.max_message_bytes)


@dataclass(frozen=True)
class PaceConfig:
    """When the peer trains (``[pace]``; peer/network/pacing.py).

    ``budget_hours``: the planned private rounds (``planned_rounds - averaging_rounds``) are
    spread over this many hours, so the privacy budget lasts that long; after that the peer
    keeps averaging its model with its neighbours, which costs no epsilon. ``train_only_when_
    grouped``: take private steps only while connected with >= 2 other eligible peers (a
    peer cut off from the network spends nothing). ``averaging_interval_s``: least time
    between two averaging rounds (free re-shares of the model).
    """

    budget_hours: float = 24.0
    train_only_when_grouped: bool = PacingConfig.train_only_when_grouped
    averaging_interval_s: float = PacingConfig.averaging_interval_s

    def __post_init__(self) -> None:
        if not 0 < self.budget_hours <= 24 * 365 * 10:
            raise ValueError(f"budget_hours must be in (0, 87600], got {self.budget_hours}")
        if not 0 <= self.averaging_interval_s <= 86_400:
            raise ValueError(f"averaging_interval_s must be in [0, 86400] seconds, "
                             f"got {self.averaging_interval_s}")


# ------------------------------------------------------------------------------ type checking
def build_dataclass(cls: type, table: dict[str, Any], where: str) -> Any:
    """Build ``cls`` from a TOML table (peer.tomlcheck.build_dataclass); ConfigError if bad."""
    try:
        return tomlcheck.build_dataclass(cls, table, where)
    except tomlcheck.TomlValueError as exc:
        raise ConfigError(str(exc)) from None


def section(document: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    """The table ``[name]`` of ``document`` (empty when absent); ConfigError if not a table."""
    value = document.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {name!r} must be a table ([{name}])")
    return value


# ------------------------------------------------------------------------------------ tables
def parse_table(document: dict[str, Any], label: str, data: str, evaluate: str | None
                ) -> TableConfig | None:
    """``[table]``: only meaningful when ``data`` or ``evaluate`` is a CSV / .npz table."""
    if "table" not in document:
        return None
    if not any(spec is not None and spec.partition(":")[0] in ("csv", "npz")
               for spec in (data, evaluate)):
        raise ConfigError("table: [table] applies to csv: and npz: sources only, and neither "
                          "data nor evaluate is one")
    return build_dataclass(TableConfig, section(document, "table", label), "table")


@dataclass(frozen=True)
class BrokerKeys:
    """``[broker]`` as written: BrokerSettings' keys, paths not yet resolved, and
    ``password_file`` (read into the password)."""

    url: str = BrokerSettings.url
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    keepalive_s: int = BrokerSettings.keepalive_s
    mqtt_version: str = BrokerSettings.mqtt_version


def parse_broker(table: dict[str, Any], base: Path) -> BrokerSettings:
    """``[broker]``: its files resolved against ``base`` and read, its TLS files loaded."""
    keys: BrokerKeys = build_dataclass(BrokerKeys, table, "broker")
    password = keys.password
    if password is not None and keys.password_file is not None:
        raise ConfigError("broker: give password or password_file, not both")
    if keys.password_file is not None:
        password = read_small_text(
            existing_file(base, keys.password_file, "broker.password_file"),
            "broker.password_file", "password file")
    files: dict[str, Path | None] = {}
    for key in ("ca_file", "client_cert", "client_key"):
        raw = getattr(keys, key)
        files[key] = None if raw is None else existing_file(base, raw, f"broker.{key}")
    try:
        settings = BrokerSettings(url=keys.url, username=keys.username, password=password,
                                  keepalive_s=keys.keepalive_s, mqtt_version=keys.mqtt_version,
                                  **files)
    except ValueError as exc:
        raise ConfigError(f"broker: {exc}") from None
    try:
        # Load the CA and client certificate now: a bad PEM file is a config error, not
        # something to discover at every reconnect.
        settings.tls_context()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"broker: cannot use the TLS files: {exc}") from None
    return settings
