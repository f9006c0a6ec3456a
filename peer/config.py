"""A peer's TOML configuration: typed dataclasses and a loader with one-line, precise errors.

Every problem becomes a :class:`ConfigError` that names the file, the key and what is wrong
(unknown key, wrong type, out of range, missing file), so a typo never silently falls back to a
default. Relative paths are resolved against the directory of the config file, so a config and
its key files can move together.

Secrets: the config holds *paths* to the identity key and (optionally) the broker password
file; the broker password may also be inline (``broker.password``), in which case the config
file itself is a secret and should be mode 0600. docs/peer.md is the reference;
docs/peer.example.toml a commented example.

Size: about 475 lines, past the 450-line guide: every table of the file is parsed and checked
here so each error names its key the same way; the parts are small functions, and splitting
the path and broker helpers off would need ConfigError in a third module for 15 lines.
"""

from __future__ import annotations

import dataclasses
import ssl
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peer.tomlcheck as tomlcheck
from crypto.field import FixedPoint
from peer.device import DeviceConfig, with_profile
from peer.errors import PeerError
from peer.files import FileReadError, read_small_file
from peer.network.broker_settings import BrokerSettings
from peer.network.node import NodeConfig
from peer.network.pacing import PacingConfig
from peer.network.session.common import check_colluders
from peer.network.session.kinds import kind_class
from peer.network.session.shamir import SessionTimeouts
from peer.training.config import TrainerConfig
from peer.training.import_path import ImportPathError, check_import_path
from peer.training.tables import TableConfig
from protocol.chunks import check_max_message_bytes
from protocol.limits import ID_PATTERN, MAX_MEMBERS, MIN_GROUP_SIZE, MIN_THRESHOLD, is_valid_id

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_HEX_KEY_CHARS = 64  # a 32-byte Ed25519 public key in hex
# Largest partial view (docs/design/partial-view.md): beyond 64 x view_size peers one bucket
# holds more than a view, so a larger value would only ever mean "every bucket".
MAX_VIEW_SIZE = 4096

# Largest file read as a small text value (admission public key, broker password).
_MAX_SMALL_FILE = 4096
# Largest config file: a real one is a few kB; anything this big is not one.
_MAX_CONFIG_FILE = 1024 * 1024


class ConfigError(PeerError):
    """The configuration cannot be used; the message names the file, key and problem."""


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


# ------------------------------------------------------------------------------ type checking
def build_dataclass(cls: type, table: dict[str, Any], where: str) -> Any:
    """Build ``cls`` from a TOML table (peer.tomlcheck.build_dataclass); ConfigError if bad."""
    try:
        return tomlcheck.build_dataclass(cls, table, where)
    except tomlcheck.TomlValueError as exc:
        raise ConfigError(str(exc)) from None


# ----------------------------------------------------------------------------------- helpers
def _section(document: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    value = document.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {name!r} must be a table ([{name}])")
    return value


def _existing_file(base: Path, raw: Path, key: str) -> Path:
    path = raw if raw.is_absolute() else base / raw
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ConfigError(f"{key}: file {path} {what}")
    return path


def _read_small_text(path: Path, key: str, what: str) -> str:
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


def _admission_key(value: str, base: Path) -> bytes:
    key = parse_public_key_hex(value)
    if key is not None:
        return key
    path = _existing_file(base, Path(value), "admission_public_key")
    key = parse_public_key_hex(_read_small_text(path, "admission_public_key", "public key file"))
    if key is None:
        raise ConfigError(f"admission_public_key: {path} does not hold a 64-character hex key")
    return key


def _data_spec(value: str, base: Path) -> str:
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
        path = _existing_file(base, Path(path_text), "data")
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


def _table(document: dict[str, Any], label: str, data: str, evaluate: str | None
           ) -> TableConfig | None:
    """``[table]``: only meaningful when ``data`` or ``evaluate`` is a CSV / .npz table."""
    if "table" not in document:
        return None
    if not any(spec is not None and spec.partition(":")[0] in ("csv", "npz")
               for spec in (data, evaluate)):
        raise ConfigError("table: [table] applies to csv: and npz: sources only, and neither "
                          "data nor evaluate is one")
    return build_dataclass(TableConfig, _section(document, "table", label), "table")


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


def _broker(table: dict[str, Any], base: Path) -> BrokerSettings:
    keys: BrokerKeys = build_dataclass(BrokerKeys, table, "broker")
    password = keys.password
    if password is not None and keys.password_file is not None:
        raise ConfigError("broker: give password or password_file, not both")
    if keys.password_file is not None:
        password = _read_small_text(
            _existing_file(base, keys.password_file, "broker.password_file"),
            "broker.password_file", "password file")
    files: dict[str, Path | None] = {}
    for key in ("ca_file", "client_cert", "client_key"):
        raw = getattr(keys, key)
        files[key] = None if raw is None else _existing_file(base, raw, f"broker.{key}")
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


# ------------------------------------------------------------------------------------ loader
#: The tables of a config file; every other key is a field of TopLevelKeys.
_TABLES = ("broker", "training", "session", "pace", "table", "device", "serve")
_TOP_LEVEL_KEYS = {f.name for f in dataclasses.fields(TopLevelKeys)} | set(_TABLES)


def parse_config(document: dict[str, Any], base: Path, source: Path | None = None) -> PeerConfig:
    """Build a PeerConfig from a parsed TOML document; relative paths resolve against base."""
    unknown = sorted(set(document) - _TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} "
                          f"(known: {', '.join(sorted(_TOP_LEVEL_KEYS))})")
    label = str(source) if source is not None else "config"
    device: DeviceConfig = build_dataclass(DeviceConfig, _section(document, "device", label),
                                           "device")
    profile = device.settings
    top = with_profile(profile.top_level,
                       {key: value for key, value in document.items() if key not in _TABLES})
    keys: TopLevelKeys = build_dataclass(TopLevelKeys, top, "")
    identity_file = _existing_file(base, keys.identity_file, "identity_file")
    certificate_file = _existing_file(base, keys.certificate_file, "certificate_file")
    admission = _admission_key(keys.admission_public_key, base)
    state_raw = Path("state") / keys.peer_id if keys.state_dir is None else keys.state_dir
    state_dir = state_raw if state_raw.is_absolute() else base / state_raw
    if state_dir.exists() and not state_dir.is_dir():
        raise ConfigError(f"state_dir: {state_dir} exists and is not a directory")
    data = _data_spec(keys.data, base)
    evaluate = keys.evaluate
    if evaluate is not None:
        try:
            evaluate = _data_spec(evaluate, base)
        except ConfigError as exc:
            raise ConfigError(f"evaluate: {str(exc).removeprefix('data: ')}") from None

    broker = _broker(_section(document, "broker", label), base)
    session = build_dataclass(SessionConfig, with_profile(
        profile.session, _section(document, "session", label)), "session")
    training = build_dataclass(TrainerConfig, with_profile(
        profile.training, _section(document, "training", label)), "training")
    pace = build_dataclass(PaceConfig, with_profile(
        profile.pace, _section(document, "pace", label)), "pace")
    table = _table(document, label, data, evaluate)
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
