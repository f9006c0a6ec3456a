"""A peer's TOML configuration: typed dataclasses and a loader with one-line, precise errors.

Every problem becomes a :class:`ConfigError` that names the file, the key and what is wrong
(unknown key, wrong type, out of range, missing file), so a typo never silently falls back to a
default. Relative paths are resolved against the directory of the config file, so a config and
its key files can move together.

Secrets: the config holds *paths* to the identity key and (optionally) the broker password
file; the broker password may also be inline (``broker.password``), in which case the config
file itself is a secret and should be mode 0600. docs/peer.md is the reference;
docs/peer.example.toml a commented example.

This module holds :class:`PeerConfig`, the top-level keys and the loader; the tables
(``[session]``, ``[pace]``, ``[broker]``, ``[table]``) are parsed and checked in
peer/config_tables.py, the paths a config names (key files, the admission key, data specs)
in peer/config_paths.py, and :class:`ConfigError` lives in peer/errors.py. Their public names
are re-exported here, so ``from peer.config import ...`` is the one import a caller needs.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peer.config_paths import admission_key, data_spec, existing_file, parse_public_key_hex
from peer.config_tables import (
    BrokerKeys,
    PaceConfig,
    SessionConfig,
    build_dataclass,
    parse_broker,
    parse_table,
    section,
)
from peer.device import DeviceConfig, with_profile
from peer.errors import ConfigError
from peer.files import FileReadError, read_small_file
from peer.network.broker_settings import BrokerSettings
from peer.network.node import NodeConfig
from peer.training.config import TrainerConfig
from peer.training.tables import TableConfig
from protocol.limits import ID_PATTERN, is_valid_id

__all__ = [
    "LOG_LEVELS",
    "MAX_VIEW_SIZE",
    "BrokerKeys",
    "ConfigError",
    "PaceConfig",
    "PeerConfig",
    "SessionConfig",
    "TopLevelKeys",
    "build_dataclass",
    "load_config",
    "parse_config",
    "parse_public_key_hex",
    "read_config_document",
]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Largest partial view (docs/design/partial-view.md): beyond 64 x view_size peers one bucket
# holds more than a view, so a larger value would only ever mean "every bucket".
MAX_VIEW_SIZE = 4096

# Largest config file: a real one is a few kB; anything this big is not one.
_MAX_CONFIG_FILE = 1024 * 1024


@dataclass
class PeerConfig:
    """Everything ``murmur-peer run`` needs. Paths are absolute after loading.

    ``admission_public_key`` is the network's 32-byte admission (CA) public key: the one value a
    peer must obtain out of band and trust; every certificate is checked against it.
    ``data`` is a source spec for peer.training.data.load_train_source: "digits",
    "fashion-mnist[:ROOT]", "mnist:ROOT", "csv:PATH[#LABEL]" or "npz:PATH" (the peer loads only
    the source's training part). ``evaluate``, if set, is a source spec whose *test* split is
    the hold-out (the whole training part of ``data`` trains): a peer on a skewed shard of a
    public data set is measured on that set's common test split instead of its own skew. The
    test split is public data, so evaluating on it spends no privacy. ``training``: TrainerConfig.
    ``table`` (``[table]``): the public constants of a CSV / .npz source (class list, feature
    mean and scale, clip bound; peer/training/tables.py), over the file's own metadata.
    """

    peer_id: str
    network_id: str
    identity_file: Path
    certificate_file: Path
    admission_public_key: bytes
    broker: BrokerSettings
    training: TrainerConfig
    state_dir: Path
    data: str = "digits"
    evaluate: str | None = None
    holdout_fraction: float = 0.2
    session: SessionConfig = field(default_factory=SessionConfig)
    pace: PaceConfig = field(default_factory=PaceConfig)
    table: TableConfig | None = None
    announce_interval_s: float = NodeConfig.announce_interval_s
    silence_expiry_s: float = NodeConfig.silence_expiry_s
    clock_skew_s: float = NodeConfig.clock_skew_s
    view_size: int = 0  # 0: follow every peer; > 0: a partial view of about that many peers
    status_interval_s: float = 1.0
    checkpoint_interval_s: float = NodeConfig.checkpoint_interval_s
    log_level: str = "INFO"
    source_path: Path | None = None
    device: DeviceConfig = field(default_factory=DeviceConfig)  # [device]: peer/device.py


def _check_seconds(value: float, key: str, upper: float = 86_400.0) -> None:
    if not 0 < value <= upper:
        raise ValueError(f"{key}: must be in (0, {upper:g}] seconds, got {value:g}")


def _check_id(value: str, key: str) -> None:
    if not is_valid_id(value):
        raise ValueError(f"{key}: {value!r} must match {ID_PATTERN} "
                         "(lower-case letters, digits, '_' and '-', at most 64)")


@dataclass(frozen=True)
class TopLevelKeys:
    """The top-level keys of a config file as written, checked for type and range.

    :func:`parse_config` builds it with :func:`build_dataclass`, the same path as every table,
    then resolves what needs the config's directory (key and certificate files, data paths,
    the admission key, ``state_dir``) into a :class:`PeerConfig`. Defaults are PeerConfig's.
    Range errors name the key first (``"holdout_fraction: must be in (0, 1), ..."``).
    """

    peer_id: str
    network_id: str
    identity_file: Path
    certificate_file: Path
    admission_public_key: str  # 64 hex characters, or a file that holds them
    state_dir: Path | None = None  # None: state/<peer_id>
    data: str = PeerConfig.data
    evaluate: str | None = PeerConfig.evaluate
    holdout_fraction: float = PeerConfig.holdout_fraction
    announce_interval_s: float = PeerConfig.announce_interval_s
    silence_expiry_s: float = PeerConfig.silence_expiry_s
    clock_skew_s: float = PeerConfig.clock_skew_s
    view_size: int = PeerConfig.view_size
    status_interval_s: float = PeerConfig.status_interval_s
    checkpoint_interval_s: float = PeerConfig.checkpoint_interval_s
    log_level: str = PeerConfig.log_level  # any case; PeerConfig holds it upper-case

    def __post_init__(self) -> None:
        _check_id(self.peer_id, "peer_id")
        _check_id(self.network_id, "network_id")
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction: must be in (0, 1), "
                             f"got {self.holdout_fraction:g}")
        _check_seconds(self.announce_interval_s, "announce_interval_s")
        _check_seconds(self.silence_expiry_s, "silence_expiry_s")
        if self.silence_expiry_s <= self.announce_interval_s:
            raise ValueError(f"silence_expiry_s: must exceed announce_interval_s "
                             f"({self.announce_interval_s:g}), got {self.silence_expiry_s:g}; "
                             "peers would expire between announcements")
        if not 0 <= self.clock_skew_s <= 86_400:
            raise ValueError(f"clock_skew_s: must be in [0, 86400] seconds, "
                             f"got {self.clock_skew_s:g}")
        if not 0 <= self.view_size <= MAX_VIEW_SIZE:
            raise ValueError(f"view_size: must be 0 (follow every peer) or a view of 1 to "
                             f"{MAX_VIEW_SIZE} peers, got {self.view_size}")
        _check_seconds(self.status_interval_s, "status_interval_s", 3600.0)
        _check_seconds(self.checkpoint_interval_s, "checkpoint_interval_s")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level: must be one of {', '.join(LOG_LEVELS)}, "
                             f"got {self.log_level.upper()!r}")


# ------------------------------------------------------------------------------------ loader
#: The tables of a config file; every other key is a field of TopLevelKeys.
_TABLES = ("broker", "training", "session", "pace", "table", "device", "serve")
_TOP_LEVEL_KEYS = {f.name for f in dataclasses.fields(TopLevelKeys)} | set(_TABLES)


def _state_dir(keys: TopLevelKeys, base: Path) -> Path:
    """``state_dir`` resolved against ``base`` (default state/<peer_id>); it may not exist
    yet, but if it does it must be a directory."""
    state_raw = Path("state") / keys.peer_id if keys.state_dir is None else keys.state_dir
    state_dir = state_raw if state_raw.is_absolute() else base / state_raw
    if state_dir.exists() and not state_dir.is_dir():
        raise ConfigError(f"state_dir: {state_dir} exists and is not a directory")
    return state_dir


def _evaluate_spec(value: str, base: Path) -> str:
    """``evaluate``: a data source spec like ``data``, its errors named for its own key."""
    try:
        return data_spec(value, base)
    except ConfigError as exc:
        raise ConfigError(f"evaluate: {str(exc).removeprefix('data: ')}") from None


def parse_config(document: dict[str, Any], base: Path, source: Path | None = None) -> PeerConfig:
    """Build a PeerConfig from a parsed TOML document; relative paths resolve against base."""
    unknown = sorted(set(document) - _TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} "
                          f"(known: {', '.join(sorted(_TOP_LEVEL_KEYS))})")
    label = str(source) if source is not None else "config"
    device: DeviceConfig = build_dataclass(DeviceConfig, section(document, "device", label),
                                           "device")
    profile = device.settings
    top = with_profile(profile.top_level,
                       {key: value for key, value in document.items() if key not in _TABLES})
    keys: TopLevelKeys = build_dataclass(TopLevelKeys, top, "")
    identity_file = existing_file(base, keys.identity_file, "identity_file")
    certificate_file = existing_file(base, keys.certificate_file, "certificate_file")
    admission = admission_key(keys.admission_public_key, base)
    state_dir = _state_dir(keys, base)
    data = data_spec(keys.data, base)
    evaluate = None if keys.evaluate is None else _evaluate_spec(keys.evaluate, base)

    broker = parse_broker(section(document, "broker", label), base)
    session = build_dataclass(SessionConfig, with_profile(
        profile.session, section(document, "session", label)), "session")
    training = build_dataclass(TrainerConfig, with_profile(
        profile.training, section(document, "training", label)), "training")
    pace = build_dataclass(PaceConfig, with_profile(
        profile.pace, section(document, "pace", label)), "pace")
    table = parse_table(document, label, data, evaluate)
    return PeerConfig(
        peer_id=keys.peer_id,
        network_id=keys.network_id,
        identity_file=identity_file,
        certificate_file=certificate_file,
        admission_public_key=admission,
        broker=broker,
        training=training,
        state_dir=state_dir,
        data=data,
        evaluate=evaluate,
        holdout_fraction=keys.holdout_fraction,
        session=session,
        pace=pace,
        table=table,
        announce_interval_s=keys.announce_interval_s,
        silence_expiry_s=keys.silence_expiry_s,
        clock_skew_s=keys.clock_skew_s,
        view_size=keys.view_size,
        status_interval_s=keys.status_interval_s,
        checkpoint_interval_s=keys.checkpoint_interval_s,
        log_level=keys.log_level.upper(),
        source_path=source,
        device=device,
    )


def read_config_document(path: Path) -> dict[str, Any]:
    """The parsed TOML of a config file, size-capped; ConfigError naming the file if unreadable."""
    try:
        return tomllib.loads(read_small_file(path, _MAX_CONFIG_FILE, "config file").decode())
    except FileReadError as exc:
        raise ConfigError(str(exc)) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_config(path: Path, document: dict[str, Any] | None = None) -> PeerConfig:
    """Read and check a peer config file; ConfigError (one line, names file + key) on any fault.
    ``document``: the file's TOML already read (less keys a caller reads itself)."""
    path = Path(path)
    if document is None:
        document = read_config_document(path)
    try:
        return parse_config(document, path.resolve().parent, path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
