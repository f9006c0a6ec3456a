"""A peer's TOML configuration: typed dataclasses and a loader with one-line, precise errors.

Every problem becomes a :class:`ConfigError` that names the file, the key and what is wrong
(unknown key, wrong type, out of range, missing file), so a typo never silently falls back to a
default. Relative paths are resolved against the directory of the config file, so a config and
its key files can move together.

Secrets: the config holds *paths* to the identity key and (optionally) the broker password
file; the broker password may also be inline (``broker.password``), in which case the config
file itself is a secret and should be mode 0600. docs/peer.md is the reference;
docs/peer.example.toml a commented example.
"""

from __future__ import annotations

import dataclasses
import math
import re
import ssl
import time
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from peer.transport import BrokerSettings

PEER_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_HEX_KEY_CHARS = 64  # a 32-byte Ed25519 public key in hex

# Largest file read as a small text value (admission public key, broker password).
_MAX_SMALL_FILE = 4096


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file, key and problem."""


@dataclass(frozen=True)
class SessionConfig:
    """Aggregation sessions (see peer/session.py): group size g, Shamir threshold t, timeouts.

    ``cooldown_s`` is the pause after a session (done or aborted) before this peer initiates
    another, so that a peer does not flood the network with invitations.
    """

    group_size: int = 3
    threshold: int = 2
    invite_timeout_s: float = 2.0
    start_timeout_s: float = 4.0
    share_timeout_s: float = 5.0
    partial_timeout_s: float = 5.0
    cooldown_s: float = 1.0
    frac_bits: int = 16

    def __post_init__(self) -> None:
        if not 3 <= self.group_size <= 16:
            raise ValueError(f"group_size must be in 3..16 (got {self.group_size}); with two "
                             "members each would learn the other's update")
        if not 2 <= self.threshold <= self.group_size:
            raise ValueError(f"threshold must be in 2..group_size={self.group_size} "
                             f"(got {self.threshold})")
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

    def to_timeouts(self) -> Any:
        """The :class:`peer.session.SessionTimeouts` these settings describe."""
        from peer.session import SessionTimeouts

        return SessionTimeouts(
            invite_s=self.invite_timeout_s,
            start_s=self.start_timeout_s,
            share_s=self.share_timeout_s,
            partial_s=self.partial_timeout_s,
        )


@dataclass
class PeerConfig:
    """Everything ``murmur-peer run`` needs. Paths are absolute after loading.

    ``admission_public_key`` is the network's 32-byte admission (CA) public key: the one value a
    peer must obtain out of band and trust; every certificate is checked against it.
    ``data`` is a source spec for peer.data.load_train_source: "digits",
    "fashion-mnist[:ROOT]", "mnist:ROOT", "csv:PATH[#LABEL]" or "npz:PATH" (the peer loads only
    the source's training part). ``training`` is a peer.trainer.TrainerConfig.
    """

    peer_id: str
    network_id: str
    identity_file: Path
    certificate_file: Path
    admission_public_key: bytes
    broker: BrokerSettings
    training: Any
    state_dir: Path
    data: str = "digits"
    holdout_fraction: float = 0.2
    session: SessionConfig = field(default_factory=SessionConfig)
    announce_interval_s: float = 30.0
    silence_expiry_s: float = 120.0
    clock_skew_s: float = 300.0
    status_interval_s: float = 1.0
    checkpoint_interval_s: float = 60.0
    log_level: str = "INFO"
    source_path: Path | None = None


# ------------------------------------------------------------------------------ type checking
def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check a TOML value against a dataclass field annotation; ConfigError if it does not fit."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        errors = []
        for option in options:
            if option is type(None):
                continue  # TOML has no null: an absent key means None (the default)
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if errors else ConfigError(f"{where}: unsupported value")
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{where}: must be one of {', '.join(map(repr, allowed))}, "
                              f"got {value!r}")
        return value
    if origin in (tuple, list):
        args = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        item_type = args[0] if args else Any
        items = [_coerce(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be finite, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if annotation is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a path string, got {value!r}")
        return Path(value)
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return build_dataclass(annotation, value, where)
    # A type this loader does not know: hand the TOML value through and let the
    # dataclass' own validation judge it.
    return value


def build_dataclass(cls: type, table: dict[str, Any], where: str) -> Any:
    """Build ``cls`` from a TOML table: unknown keys, missing keys, types and range errors.

    ``cls.__post_init__`` raising ValueError becomes a ConfigError naming the section.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} "
                          f"(known: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    for name, spec in fields.items():
        if name in table:
            kwargs[name] = _coerce(table[name], hints.get(name, Any), f"{where}.{name}")
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {name!r}")
    try:
        instance = cls(**kwargs)
        # Some config classes (peer.trainer.TrainerConfig) check ranges in validate().
        validate = getattr(instance, "validate", None)
        if callable(validate):
            validate()
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return instance


# ----------------------------------------------------------------------------------- helpers
def _section(document: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    value = document.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {name!r} must be a table ([{name}])")
    return value


def _take(table: dict[str, Any], key: str, annotation: Any, where: str, default: Any) -> Any:
    if key not in table:
        if default is dataclasses.MISSING:
            prefix = f"{where}: " if where else ""
            raise ConfigError(f"{prefix}missing required key {key!r}")
        return default
    return _coerce(table.pop(key), annotation, f"{where}.{key}" if where else key)


def _existing_file(base: Path, raw: Path, key: str) -> Path:
    path = raw if raw.is_absolute() else base / raw
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ConfigError(f"{key}: file {path} {what}")
    return path


def _read_small_text(path: Path, key: str) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read(_MAX_SMALL_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
    if len(data) > _MAX_SMALL_FILE:
        raise ConfigError(f"{key}: {path} is too large ({_MAX_SMALL_FILE} bytes at most)")
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
    key = parse_public_key_hex(_read_small_text(path, "admission_public_key"))
    if key is None:
        raise ConfigError(f"admission_public_key: {path} does not hold a 64-character hex key")
    return key


def _check_id(value: str, key: str) -> str:
    if re.fullmatch(PEER_ID_PATTERN, value) is None:
        raise ConfigError(f"{key}: {value!r} must match {PEER_ID_PATTERN} "
                          "(lower-case letters, digits, '_' and '-', at most 64)")
    return value


def _data_spec(value: str, base: Path) -> str:
    """Check a data source spec and make its path absolute (see peer.data.load_train_source)."""
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
    if kind in ("csv", "npz") and sep and rest:
        path_text, hash_sign, label = rest.partition("#")
        path = _existing_file(base, Path(path_text), "data")
        return f"{kind}:{path}{hash_sign}{label}"
    raise ConfigError(f"data: {value!r} is not a data source; use 'digits', "
                      "'fashion-mnist[:DIR]', 'mnist:DIR', 'csv:PATH[#LABEL]' or 'npz:PATH'")


def _positive(value: float, key: str, upper: float = 86_400.0) -> float:
    if not 0 < value <= upper:
        raise ConfigError(f"{key}: must be in (0, {upper:g}] seconds, got {value:g}")
    return value


def _broker(table: dict[str, Any], base: Path) -> BrokerSettings:
    table = dict(table)
    where = "broker"
    password = _take(table, "password", str | None, where, None)
    password_file = _take(table, "password_file", Path | None, where, None)
    if password is not None and password_file is not None:
        raise ConfigError("broker: give password or password_file, not both")
    if password_file is not None:
        password = _read_small_text(_existing_file(base, password_file, "broker.password_file"),
                                    "broker.password_file")
    files: dict[str, Path | None] = {}
    for key in ("ca_file", "client_cert", "client_key"):
        raw = _take(table, key, Path | None, where, None)
        files[key] = None if raw is None else _existing_file(base, raw, f"broker.{key}")
    known = {"url", "username", "keepalive_s", "mqtt_version"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"broker: unknown key {unknown[0]!r} (known: ca_file, client_cert, "
                          "client_key, keepalive_s, mqtt_version, password, password_file, "
                          "url, username)")
    try:
        settings = BrokerSettings(
            url=_take(table, "url", str, where, BrokerSettings.url),
            username=_take(table, "username", str | None, where, None),
            password=password,
            keepalive_s=_take(table, "keepalive_s", int, where, BrokerSettings.keepalive_s),
            mqtt_version=_take(table, "mqtt_version", str, where, BrokerSettings.mqtt_version),
            **files,
        )
    except ValueError as exc:
        raise ConfigError(f"broker: {exc}") from None
    try:
        # Load the CA and client certificate now: a bad PEM file is a config error, not
        # something to discover at every reconnect.
        settings.tls_context()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"broker: cannot use the TLS files: {exc}") from None
    return settings


def _trainer_config_class() -> type:
    try:
        from peer.trainer import TrainerConfig
    except ImportError as exc:  # the training half is missing from this install
        raise ConfigError(f"training: cannot import peer.trainer ({exc})") from None
    return TrainerConfig


# ------------------------------------------------------------------------------------ loader
#: ``[training] share`` when the config does not set it (see peer.merge.GOSSIP_AVERAGING).
DEFAULT_SHARE_MODE = "model"
#: ``[training] topk_fraction`` when unset: averaging needs many coordinates per session to
#: average the peers' DP noise away (the simulation's measured default, docs/results.md).
DEFAULT_TOPK_FRACTION = 0.25

_TOP_LEVEL_KEYS = {
    "peer_id", "network_id", "identity_file", "certificate_file", "admission_public_key",
    "data", "holdout_fraction", "state_dir", "announce_interval_s", "silence_expiry_s",
    "clock_skew_s", "status_interval_s", "checkpoint_interval_s", "log_level", "broker",
    "training", "session",
}


def parse_config(document: dict[str, Any], base: Path, source: Path | None = None) -> PeerConfig:
    """Build a PeerConfig from a parsed TOML document; relative paths resolve against base."""
    unknown = sorted(set(document) - _TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} "
                          f"(known: {', '.join(sorted(_TOP_LEVEL_KEYS))})")
    top = dict(document)
    for table in ("broker", "training", "session"):
        top.pop(table, None)
    label = str(source) if source is not None else "config"
    peer_id = _check_id(_take(top, "peer_id", str, "", dataclasses.MISSING), "peer_id")
    network_id = _check_id(_take(top, "network_id", str, "", dataclasses.MISSING), "network_id")
    identity_file = _existing_file(
        base, _take(top, "identity_file", Path, "", dataclasses.MISSING), "identity_file")
    certificate_file = _existing_file(
        base, _take(top, "certificate_file", Path, "", dataclasses.MISSING), "certificate_file")
    admission = _admission_key(
        _take(top, "admission_public_key", str, "", dataclasses.MISSING), base)
    state_raw = _take(top, "state_dir", Path, "", Path("state") / peer_id)
    state_dir = state_raw if state_raw.is_absolute() else base / state_raw
    if state_dir.exists() and not state_dir.is_dir():
        raise ConfigError(f"state_dir: {state_dir} exists and is not a directory")
    data = _data_spec(_take(top, "data", str, "", "digits"), base)
    holdout = _take(top, "holdout_fraction", float, "", 0.2)
    if not 0 < holdout < 1:
        raise ConfigError(f"holdout_fraction: must be in (0, 1), got {holdout:g}")
    announce = _positive(_take(top, "announce_interval_s", float, "", 30.0),
                         "announce_interval_s")
    silence = _positive(_take(top, "silence_expiry_s", float, "", 120.0), "silence_expiry_s")
    if silence <= announce:
        raise ConfigError(f"silence_expiry_s: must exceed announce_interval_s ({announce:g}), "
                          f"got {silence:g}; peers would expire between announcements")
    skew = _take(top, "clock_skew_s", float, "", 300.0)
    if not 0 <= skew <= 86_400:
        raise ConfigError(f"clock_skew_s: must be in [0, 86400] seconds, got {skew:g}")
    status_interval = _positive(_take(top, "status_interval_s", float, "", 1.0),
                                "status_interval_s", 3600.0)
    checkpoint_interval = _positive(_take(top, "checkpoint_interval_s", float, "", 60.0),
                                    "checkpoint_interval_s")
    log_level = _take(top, "log_level", str, "", "INFO").upper()
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level: must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")

    broker = _broker(_section(document, "broker", label), base)
    session = build_dataclass(SessionConfig, _section(document, "session", label), "session")
    # A daemon shares its model's displacement and averages with its group unless the config
    # says otherwise: measured far better than adding deltas (docs/results.md).
    training_table = {"share": DEFAULT_SHARE_MODE, "topk_fraction": DEFAULT_TOPK_FRACTION,
                      **_section(document, "training", label)}
    training = build_dataclass(_trainer_config_class(), training_table, "training")
    return PeerConfig(
        peer_id=peer_id,
        network_id=network_id,
        identity_file=identity_file,
        certificate_file=certificate_file,
        admission_public_key=admission,
        broker=broker,
        training=training,
        state_dir=state_dir,
        data=data,
        holdout_fraction=holdout,
        session=session,
        announce_interval_s=announce,
        silence_expiry_s=silence,
        clock_skew_s=skew,
        status_interval_s=status_interval,
        checkpoint_interval_s=checkpoint_interval,
        log_level=log_level,
        source_path=source,
    )


def load_config(path: Path) -> PeerConfig:
    """Read and check a peer config file; ConfigError (one line, names file + key) on any fault."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return parse_config(document, path.resolve().parent, path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


# ------------------------------------------------------------------------- building a peer
def load_credentials(cfg: PeerConfig, now: float | None = None) -> tuple[Any, Any]:
    """Load the identity and certificate and check they belong together and to this network.

    Returns (Identity, Certificate). ConfigError when the key file is unusable, the certificate
    is for another peer or key, another network, not signed by the admission key, or outside
    its validity (with clock_skew_s) — so a misconfigured peer stops at start-up with one line
    instead of being silently ignored by every other peer.
    """
    from crypto.admission import Certificate, verify_certificate
    from crypto.errors import CertificateError, CryptoError
    from crypto.identity import Identity

    try:
        identity = Identity.load(cfg.identity_file)
    except CryptoError as exc:
        raise ConfigError(f"identity_file: {exc}") from None
    if identity.peer_id != cfg.peer_id:
        raise ConfigError(f"identity_file: {cfg.identity_file} is the identity of "
                          f"{identity.peer_id!r}, but peer_id is {cfg.peer_id!r}")
    try:
        with open(cfg.certificate_file, "rb") as handle:
            raw = handle.read(_MAX_SMALL_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"certificate_file: cannot read {cfg.certificate_file}: "
                          f"{exc.strerror}") from None
    try:
        certificate = Certificate.from_bytes(raw)
        verify_certificate(
            certificate,
            network_id=cfg.network_id,
            admission_public_key=cfg.admission_public_key,
            now=time.time() if now is None else now,
            clock_skew_s=cfg.clock_skew_s,
        )
    except (CertificateError, ValueError) as exc:
        raise ConfigError(f"certificate_file: {cfg.certificate_file}: {exc}") from None
    if certificate.public != identity.public:
        raise ConfigError(f"certificate_file: {cfg.certificate_file} certifies other keys than "
                          f"{cfg.identity_file} holds (enroll this identity's .pub file)")
    return identity, certificate


def build_peer_parts(cfg: PeerConfig) -> dict[str, Any]:
    """Keyword arguments for ``peer.node.Peer(...)`` built from a config (the daemon path).

    Loads and checks the credentials, the data (only the source's training part, split into
    train / local hold-out; nothing else stays referenced) and the trainer (which resumes from
    ``state_dir`` if a checkpoint exists). Imports the training half lazily: it pulls in torch.
    """
    from crypto.field import FixedPoint
    from peer.data import load_train_source, split_holdout
    from peer.merge import merge_config_for
    from peer.node import NodeConfig
    from peer.trainer import LocalTrainer

    identity, certificate = load_credentials(cfg)
    seed = int(getattr(cfg.training, "seed", 0) or 0)
    try:
        # Only the training part: a device never evaluates on the source's test split, so
        # loading it would only cost memory (and, for IDX data, reading the test files).
        train_source = load_train_source(cfg.data)
        train, holdout = split_holdout(train_source, cfg.holdout_fraction, seed)
    except Exception as exc:
        # DataError, OSError, ValueError...: all mean the configured data is unusable.
        raise ConfigError(f"data: cannot load {cfg.data!r}: {exc}") from None
    # split_holdout copied the records: drop the unsplit set before the trainer (the model,
    # DP-SGD buffers) is built, so the two never share the process's memory peak.
    del train_source
    try:
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"state_dir: cannot create {cfg.state_dir}: {exc.strerror}") from None
    trainer = LocalTrainer(cfg.training, train, holdout, cfg.state_dir)
    node_config = NodeConfig(
        group_size=cfg.session.group_size,
        threshold=cfg.session.threshold,
        timeouts=cfg.session.to_timeouts(),
        fixed_point=FixedPoint(frac_bits=cfg.session.frac_bits),
        announce_interval_s=cfg.announce_interval_s,
        silence_expiry_s=cfg.silence_expiry_s,
        clock_skew_s=cfg.clock_skew_s,
        checkpoint_interval_s=cfg.checkpoint_interval_s,
        cooldown_s=cfg.session.cooldown_s,
        merge=merge_config_for(cfg.training.share),
    )
    return {
        "identity": identity,
        "certificate": certificate,
        "admission_public_key": cfg.admission_public_key,
        "network_id": cfg.network_id,
        "trainer": trainer,
        "broker": cfg.broker,
        "config": node_config,
    }
