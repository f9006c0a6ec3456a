"""Simulation scenarios: every option of a `murmur-sim` run, its default and its checks.

`Scenario` holds the options of one run; building one (defaults, `dataclasses.replace`, or
`sim.scenario_io.load_scenario` from a TOML file) checks types, ranges and cross-option
consistency in `validate_scenario`, and a bad value raises `ScenarioError` naming the key and
the problem. Reading scenarios from TOML and the command line, and writing them back, is
`sim.scenario_io`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from peer import tomlcheck
from peer.config import MAX_VIEW_SIZE, SessionConfig
from peer.network.session.kinds import DEFAULT_SESSION_KIND, kind_class
from peer.training.config import NOISE_MODES, TrainerConfig
from peer.training.import_path import ImportPathError, check_import_path, is_user_model
from protocol.limits import ID_PATTERN, MAX_MEMBERS, MIN_GROUP_SIZE, is_valid_id
from sim.partition import PARTITION_SCHEMES

HOSTILE_KINDS = ("garbage", "replay", "huge_norm")
MODES = ("inprocess", "processes", "reference")
BROKER_KINDS = ("embedded", "mosquitto")
BROKER_URL_SCHEMES = ("mqtt", "mqtts")
DATASET_NAMES = ("digits", "fashion-mnist")
DATASET_PREFIXES = ("fashion-mnist:", "csv:", "npz:", "python:")
MODEL_CHOICES = ("mlp", "cnn", "scatter", "auto")


class ScenarioError(ValueError):
    """A scenario option is unknown, of the wrong type, or out of range.

    `key` names the offending option (None for file-level problems such as bad TOML).
    """

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None) -> None:
        self.key = key
        self.source = source
        self.detail = message  # without the source / option prefix
        where = f"{source}: " if source else ""
        what = f"option '{key}': " if key else ""
        super().__init__(f"{where}{what}{message}")


@dataclass(frozen=True)
class Scenario:
    """All options of one simulation run. Defaults: the README's first command.

    The defaults (8 peers on digits, 30 local rounds of 5 DP-SGD steps, the last 5 of them
    averaging-only, groups of 5, 150 s cap) are sized to finish in under 3 minutes on 2 shared
    cores; docs/results.md has the measurements behind them.
    """

    # -- peers and data ----------------------------------------------------------------------
    peers: int = 8
    # "digits" | "fashion-mnist[:ROOT]" | "csv:PATH" | "npz:PATH" | "python:MODULE:LOADER"
    dataset: str = "digits"
    # "mlp" | "cnn" | "scatter" | "auto" (cnn for 28x28 images, mlp otherwise) | a user's
    # factory "package.module:function"
    model: str = "auto"
    partition: str = "dirichlet"  # "iid" | "dirichlet" | "shards"
    alpha: float = 1.0  # Dirichlet concentration; smaller = more skewed
    shards_per_peer: int = 2
    min_partition_size: int = 10  # every peer gets at least this many training examples
    holdout_fraction: float = 0.2  # part of each peer's shard kept for its local accuracy
    # -- privacy -----------------------------------------------------------------------------
    dp: bool = True
    target_epsilon: float | None = 3.0  # per peer, over the planned rounds * local_steps
    noise_multiplier: float | None = None  # set instead of target_epsilon to fix sigma
    delta: float = TrainerConfig.delta
    max_grad_norm: float = TrainerConfig.max_grad_norm  # C (adaptive clipping: the start)
    # Adaptive clipping (docs/privacy.md): None is the trainer's rule (on for a user model)
    clip_adaptive: bool | None = TrainerConfig.clip_adaptive
    clip_target_quantile: float = TrainerConfig.clip_target_quantile
    clip_learning_rate: float = TrainerConfig.clip_learning_rate
    clip_count_stddev: float | None = TrainerConfig.clip_count_stddev
    # "local": every peer adds all of its noise; "group": each group release carries one
    # Gaussian whose shares h honest members add (docs/privacy.md, "Group noise"; every
    # engine: a network peer's private step is then one session's release)
    noise: str = TrainerConfig.noise
    honest_min: int = TrainerConfig.honest_min  # h: honest contributors assumed per release
    # -- training ----------------------------------------------------------------------------
    rounds: int = 30  # local rounds per peer (each: local_steps steps, then share)
    duration_s: float = 150.0  # wall-clock cap; the run ends at rounds or duration, first hit
    local_steps: int = 5
    batch_size: int = TrainerConfig.batch_size
    lr: float = TrainerConfig.lr
    momentum: float = TrainerConfig.momentum  # heavy-ball momentum of the local optimizer
    # The last rounds (this fraction of them) take no private step and only re-share the
    # model, so the peers' DP noise keeps averaging out at no privacy cost.
    averaging_fraction: float = 1 / 6
    # top-k of those rounds (None: topk_fraction)
    averaging_topk_fraction: float | None = TrainerConfig.averaging_topk_fraction
    topk_fraction: float = TrainerConfig.topk_fraction
    # -- aggregation: larger groups than a daemon's default (NodeConfig), measured better for
    # 8 peers (docs/results.md) ---------------------------------------------------------------
    group_size: int = 5
    threshold: int = 3
    # c: colluding members each peer's privacy must survive (docs/sessions.md section 3.3)
    max_colluders: int = SessionConfig.max_colluders
    # "shamir" (the library default) or "masked" (one masked vector per member)
    session_kind: str = DEFAULT_SESSION_KIND
    # 0: every peer follows every announcement (the library default); > 0: a bounded view of
    # about that many peers (docs/design/partial-view.md)
    view_size: int = 0
    # -- faults ------------------------------------------------------------------------------
    churn_rate: float = 0.0  # expected leave events per peer per minute
    churn_downtime_s: float = 5.0  # how long a churned peer stays away before rejoining
    delay_ms: float = 0.0  # added delay on every message a peer sends
    loss_rate: float = 0.0  # probability that a sent message is dropped
    hostile_peers: tuple[str, ...] = ()  # extra adversarial peers: "garbage"|"replay"|"huge_norm"
    # -- broker and execution ----------------------------------------------------------------
    broker: str = "embedded"  # "embedded" | "mosquitto" | "mqtt://host:port" | "mqtts://..."
    broker_username: str | None = None
    broker_password: str | None = None
    broker_ca_file: Path | None = None
    # "inprocess" (tasks of one loop) | "processes" (one per peer) | "reference" (network-free
    # engine: the same trainers and merge rule, sessions on a seeded schedule; sim/reference.py)
    mode: str = "inprocess"
    network: str = "sim"
    seed: int = 0  # for data split, sampling and faults; never for cryptographic randomness
    out_dir: Path = Path("runs")

    def __post_init__(self) -> None:
        validate_scenario(self)

    @property
    def planned_steps(self) -> int:
        """Local steps each peer plans over the run (the private ones are fewer: the runner's
        averaging tail takes none, and target_epsilon is spread over the private ones)."""
        return self.rounds * self.local_steps

    @property
    def broker_is_url(self) -> bool:
        return self.broker not in BROKER_KINDS


def resolve_model(model: str, input_shape: tuple[int, ...]) -> str:
    """The model name to build: "auto" picks "cnn" for 28x28 images and "mlp" otherwise
    (never "scatter": it is chosen explicitly); any other name is returned as it is."""
    if model != "auto":
        return model
    image_28 = tuple(input_shape[-2:]) == (28, 28) and len(input_shape) in (2, 3)
    return "cnn" if image_28 else "mlp"


SCENARIO_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Scenario))
_FIELD_TYPES: dict[str, Any] = typing.get_type_hints(Scenario)


# -- type checking -------------------------------------------------------------------------------


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return value converted to field type tp (peer.tomlcheck), or ScenarioError naming key."""
    if typing.get_origin(tp) is tuple and isinstance(value, str):
        value = [value]  # a single kind given as a string
    try:
        return tomlcheck.check_value(value, tp, key)
    except tomlcheck.TomlValueError as exc:
        raise ScenarioError(exc.detail, key=key) from None


# -- range checks --------------------------------------------------------------------------------


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ScenarioError(message, key=key)


def _check_types(s: Scenario) -> None:
    for key in SCENARIO_KEYS:
        # Normalises as it checks (an int for a float option, a list for a tuple); the
        # dataclass is frozen, so the normalised value is written with object.__setattr__.
        object.__setattr__(s, key, _coerce(key, getattr(s, key), _FIELD_TYPES[key]))


def validate_scenario(s: Scenario) -> None:
    """Check types, ranges and cross-option consistency; ScenarioError names the bad key."""
    _check_types(s)
    _check_data(s)
    _check_privacy(s)
    _check_training(s)
    _check_aggregation(s)
    _check_faults(s)
    _check_broker(s)
    _check_run(s)


def _check_data(s: Scenario) -> None:
    _require(1 <= s.peers <= 512, "peers", f"must be between 1 and 512, got {s.peers}")
    _require(
        s.dataset in DATASET_NAMES
        or any(s.dataset.startswith(p) and len(s.dataset) > len(p) for p in DATASET_PREFIXES),
        "dataset",
        f"expected 'digits', 'fashion-mnist[:ROOT]', 'csv:PATH', 'npz:PATH' or "
        f"'python:MODULE:LOADER', got {s.dataset!r}",
    )
    _require(s.model in MODEL_CHOICES or is_user_model(s.model), "model",
             f"expected one of {MODEL_CHOICES} or a factory 'package.module:function', "
             f"got {s.model!r}")
    if is_user_model(s.model):
        try:
            check_import_path(s.model, "model")
        except ImportPathError as exc:
            raise ScenarioError(str(exc), key="model") from None
    _require(
        s.partition in PARTITION_SCHEMES,
        "partition",
        f"expected one of {PARTITION_SCHEMES}, got {s.partition!r}",
    )
    _require(s.alpha > 0, "alpha", f"must be > 0, got {s.alpha}")
    _require(s.shards_per_peer >= 1, "shards_per_peer", f"must be >= 1, got {s.shards_per_peer}")
    _require(
        s.min_partition_size >= 1,
        "min_partition_size",
        f"must be >= 1, got {s.min_partition_size}",
    )
    _require(
        0.0 < s.holdout_fraction < 1.0,
        "holdout_fraction",
        f"must be strictly between 0 and 1, got {s.holdout_fraction}",
    )


def _check_privacy(s: Scenario) -> None:
    if s.dp:
        _require(
            (s.target_epsilon is None) != (s.noise_multiplier is None),
            "noise_multiplier" if s.noise_multiplier is not None else "target_epsilon",
            "with dp = true set exactly one of target_epsilon and noise_multiplier",
        )
    if s.target_epsilon is not None:
        _require(
            0 < s.target_epsilon <= 100,
            "target_epsilon",
            f"must be in (0, 100], got {s.target_epsilon}",
        )
    if s.noise_multiplier is not None:
        _require(
            0 < s.noise_multiplier <= 100,
            "noise_multiplier",
            f"must be in (0, 100], got {s.noise_multiplier}",
        )
    _require(0 < s.delta < 1, "delta", f"must be strictly between 0 and 1, got {s.delta}")
    _require(s.noise in NOISE_MODES, "noise", f"expected one of {NOISE_MODES}, got {s.noise!r}")
    if s.noise == "group":
        _require(s.dp, "noise", "group noise needs dp = true")
        _require(s.honest_min >= 2, "honest_min", f"must be >= 2, got {s.honest_min}")
        _require(s.group_size >= s.honest_min + s.max_colluders, "honest_min",
                 f"a release needs honest_min + max_colluders = "
                 f"{s.honest_min + s.max_colluders} contributors, more than group_size "
                 f"{s.group_size}")
    _require(s.max_grad_norm > 0, "max_grad_norm", f"must be > 0, got {s.max_grad_norm}")
    _require(not (s.clip_adaptive and s.noise == "group"), "clip_adaptive",
             "adaptive clipping is refused with group noise (docs/privacy.md)")
    _require(0 < s.clip_target_quantile < 1, "clip_target_quantile",
             f"must be in (0, 1), got {s.clip_target_quantile}")
    _require(s.clip_learning_rate > 0, "clip_learning_rate",
             f"must be > 0, got {s.clip_learning_rate}")
    _require(s.clip_count_stddev is None or s.clip_count_stddev > 0, "clip_count_stddev",
             f"must be > 0, got {s.clip_count_stddev}")


def _check_training(s: Scenario) -> None:
    _require(1 <= s.rounds <= 1_000_000, "rounds", f"must be >= 1, got {s.rounds}")
    _require(s.duration_s > 0, "duration_s", f"must be > 0 seconds, got {s.duration_s}")
    _require(s.local_steps >= 1, "local_steps", f"must be >= 1, got {s.local_steps}")
    _require(
        1 <= s.batch_size <= 65536, "batch_size", f"must be in 1..65536, got {s.batch_size}"
    )
    _require(0 < s.lr <= 10, "lr", f"must be in (0, 10], got {s.lr}")
    _require(0 <= s.momentum < 1, "momentum", f"must be in [0, 1), got {s.momentum}")


def _check_aggregation(s: Scenario) -> None:
    _require(0 <= s.averaging_fraction < 1, "averaging_fraction",
             f"must be in [0, 1), got {s.averaging_fraction}")
    _require(
        0.001 <= s.topk_fraction <= 1.0,
        "topk_fraction",
        f"must be in [0.001, 1], got {s.topk_fraction}",
    )
    tail_topk = s.averaging_topk_fraction
    _require(tail_topk is None or 0.001 <= tail_topk <= 1.0, "averaging_topk_fraction",
             f"must be in [0.001, 1], got {tail_topk}")
    _require(
        MIN_GROUP_SIZE <= s.group_size <= MAX_MEMBERS,
        "group_size",
        f"must be in {MIN_GROUP_SIZE}..{MAX_MEMBERS} (a group of two would reveal each member's "
        f"vector to the other), got {s.group_size}",
    )
    _require(
        2 <= s.threshold <= s.group_size,
        "threshold",
        f"must be in 2..group_size ({s.group_size}), got {s.threshold}",
    )
    _require(s.max_colluders >= 1 and s.group_size >= max(3, s.max_colluders + 2)
             and s.threshold > s.max_colluders, "max_colluders",
             f"must be >= 1 with group_size >= max_colluders + 2 and threshold > max_colluders "
             f"(group_size {s.group_size}, threshold {s.threshold}), got {s.max_colluders}")
    try:
        kind_class(s.session_kind)  # the session registry judges the kind
    except ValueError as exc:
        raise ScenarioError(str(exc), key="session_kind") from None
    _require(0 <= s.view_size <= MAX_VIEW_SIZE, "view_size",
             f"must be 0 (every peer) or a view of 1 to {MAX_VIEW_SIZE} peers, got {s.view_size}")


def _check_faults(s: Scenario) -> None:
    _require(s.churn_rate >= 0, "churn_rate", f"must be >= 0, got {s.churn_rate}")
    _require(
        s.churn_downtime_s >= 0, "churn_downtime_s", f"must be >= 0, got {s.churn_downtime_s}"
    )
    _require(0 <= s.delay_ms <= 60_000, "delay_ms", f"must be in 0..60000, got {s.delay_ms}")
    _require(0 <= s.loss_rate < 1, "loss_rate", f"must be in [0, 1), got {s.loss_rate}")
    for kind in s.hostile_peers:
        _require(
            kind in HOSTILE_KINDS,
            "hostile_peers",
            f"unknown hostile kind {kind!r}; expected some of {HOSTILE_KINDS}",
        )


def _check_run(s: Scenario) -> None:
    _require(s.mode in MODES, "mode", f"expected one of {MODES}, got {s.mode!r}")
    _require(is_valid_id(s.network), "network", f"must match {ID_PATTERN}, got {s.network!r}")
    _require(0 <= s.seed < 2**63, "seed", f"must be in 0..2**63-1, got {s.seed}")


def _check_broker(s: Scenario) -> None:
    if s.broker in BROKER_KINDS:
        credentials = ("broker_username", "broker_password", "broker_ca_file")
        for key in credentials:
            _require(
                getattr(s, key) is None,
                key,
                f"only applies to an external broker URL, not broker = {s.broker!r}",
            )
        return
    parts = urlsplit(s.broker)
    _require(
        parts.scheme in BROKER_URL_SCHEMES,
        "broker",
        f"expected 'embedded', 'mosquitto' or an mqtt:// / mqtts:// URL, got {s.broker!r}",
    )
    try:
        port = parts.port
    except ValueError as exc:
        raise ScenarioError(f"bad port in {s.broker!r}: {exc}", key="broker") from exc
    _require(bool(parts.hostname), "broker", f"URL has no host: {s.broker!r}")
    _require(port is None or port > 0, "broker", f"URL has port 0: {s.broker!r}")
    _require(
        parts.username is None and parts.password is None,
        "broker",
        "put credentials in broker_username / broker_password, not in the URL",
    )
    _require(
        (s.broker_password is None) or (s.broker_username is not None),
        "broker_password",
        "given without broker_username",
    )
    if s.broker_ca_file is not None:
        _require(
            parts.scheme == "mqtts",
            "broker_ca_file",
            "only applies to an mqtts:// broker URL",
        )

