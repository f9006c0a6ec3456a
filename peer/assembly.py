"""Building a peer: the one place where settings become a trainer and a node.

Three callers build peers (``murmur-peer run``, the in-process simulation and the
one-process-per-peer simulation) and all of them come through here, so a peer is assembled the
same way everywhere and each default lives in one class:

* :func:`peer_from_config` is the daemon path: it checks the credentials and the data of a
  :class:`peer.config.PeerConfig`, builds the trainer (which resumes from ``state_dir``) and the
  node;
* :func:`build_peer` joins an already built trainer to a node; the simulation calls it with
  its own keys and data. It takes the merge rule from the trainer's sharing strategy, so a
  node can never merge with a rule that does not pair with what its trainer shares.

Imports of the training half (torch) stay inside the functions that need them, so that
``murmur-peer`` commands that only touch key files start without loading torch.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crypto.admission import Certificate, verify_certificate
from crypto.errors import CertificateError, CryptoError
from crypto.field import FixedPoint
from crypto.identity import Identity
from peer.config import ConfigError, PeerConfig, SessionConfig
from peer.device import apply_process_settings
from peer.files import FileTooLargeError, read_bounded
from peer.group_steps import GroupSteps
from peer.network.node import EventCallback, NodeConfig, Peer
from peer.network.pacing import PacingConfig, private_round_interval
from peer.network.session.shamir import SessionTimeouts
from peer.network.transport import BrokerSettings

if TYPE_CHECKING:
    from peer.training.audit_hook import AuditHook
    from peer.training.blocks import BlockSource
    from peer.training.data import Dataset
    from peer.training.trainer import LocalTrainer

#: Certificates are a few hundred bytes; anything larger is not one.
MAX_CERTIFICATE_BYTES = 4096

#: ``data = "blocks:DIR"``: a directory that grows with .npz files (peer/training/blocks.py).
BLOCKS_PREFIX = "blocks:"

#: Completed sessions of earlier runs, in the state directory (for the status line's totals).
TOTALS_FILE = "totals.json"


def load_credentials(cfg: PeerConfig, now: float | None = None) -> tuple[Identity, Certificate]:
    """Load the identity and certificate and check they belong together and to this network.

    ConfigError when the key file is unusable, the certificate is for another peer or key,
    another network, not signed by the admission key, or outside its validity (with
    ``clock_skew_s``), so a misconfigured peer stops at start-up with one line instead of being
    silently ignored by every other peer.
    """
    try:
        identity = Identity.load(cfg.identity_file)
    except CryptoError as exc:
        raise ConfigError(f"identity_file: {exc}") from None
    if identity.peer_id != cfg.peer_id:
        raise ConfigError(f"identity_file: {cfg.identity_file} is the identity of "
                          f"{identity.peer_id!r}, but peer_id is {cfg.peer_id!r}")
    try:
        raw = read_bounded(cfg.certificate_file, MAX_CERTIFICATE_BYTES)
    except (OSError, FileTooLargeError) as exc:
        raise ConfigError(f"certificate_file: {exc}") from None
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


def load_local_data(cfg: PeerConfig) -> tuple[Dataset, Dataset]:
    """(train, hold-out): the configured source's training part split in two, or, with
    ``evaluate`` set, all of it for training and the test split of ``evaluate`` as hold-out
    (public data: measuring on it spends no privacy and reveals nothing of the peer's own)."""
    from peer.training.data import load_source, load_train_source, split_holdout_consuming

    try:
        # Only the training part: a device never evaluates on the source's test split, so
        # loading it would only cost memory (and, for IDX data, reading the test files).
        source = load_train_source(cfg.data, cfg.table)
        if cfg.evaluate is None:
            return split_holdout_consuming(source, cfg.holdout_fraction, cfg.training.seed)
    except Exception as exc:
        # DataError, OSError, ValueError...: all mean the configured data is unusable.
        raise ConfigError(f"data: cannot load {cfg.data!r}: {exc}") from None
    try:
        _train, holdout = load_source(cfg.evaluate, cfg.table)
    except Exception as exc:
        raise ConfigError(f"evaluate: cannot load {cfg.evaluate!r}: {exc}") from None
    if (holdout.num_classes, holdout.input_shape) != (source.num_classes, source.input_shape):
        raise ConfigError(
            f"evaluate: {cfg.evaluate!r} has {holdout.num_classes} classes of shape "
            f"{holdout.input_shape}, but data {cfg.data!r} has {source.num_classes} of shape "
            f"{source.input_shape}")
    return source, holdout


def build_trainer(training: Any, train: Dataset, holdout: Dataset,
                  state_dir: Path | None, source: BlockSource | None = None,
                  audit: AuditHook | None = None) -> LocalTrainer:
    """The real trainer for ``training`` (a TrainerConfig); resumes from ``state_dir``.

    With ``source`` (a growing directory, ``data = "blocks:DIR"``) the records come in blocks,
    each with its own budget (peer/training/blocks.py); ``train`` then only gives the shape.
    ``audit`` is for a privacy audit only (peer/training/audit_hook.py): no configuration
    passes one.
    """
    from peer.training.trainer import LocalTrainer

    return LocalTrainer(training, train, holdout, state_dir, source=source, audit=audit)


def load_block_data(cfg: PeerConfig) -> tuple[Dataset, Dataset, BlockSource]:
    """(shape template, hold-out, source) for ``data = "blocks:DIR"``.

    ``evaluate`` is required: its test split measures the model and fixes the input shape and
    the classes before the first block has arrived.
    """
    from peer.training.blocks import open_block_source, template_dataset
    from peer.training.data import load_source

    directory = Path(cfg.data.partition(":")[2])
    if cfg.evaluate is None:
        raise ConfigError("data: 'blocks:DIR' needs evaluate = SOURCE (its test split is the "
                          "hold-out and fixes the input shape and classes)")
    try:
        _train, holdout = load_source(cfg.evaluate, cfg.table)
    except Exception as exc:
        raise ConfigError(f"evaluate: cannot load {cfg.evaluate!r}: {exc}") from None
    try:
        source = open_block_source(directory, cfg.training.min_block_records)
    except Exception as exc:
        raise ConfigError(f"data: cannot open {directory}: {exc}") from None
    return template_dataset(holdout.input_shape, holdout.num_classes), holdout, source


def node_config(session: SessionConfig, **changes: Any) -> NodeConfig:
    """The node settings a ``[session]`` table describes, with ``changes`` on top."""
    timeouts = SessionTimeouts(
        invite_s=session.invite_timeout_s,
        start_s=session.start_timeout_s,
        share_s=session.share_timeout_s,
        partial_s=session.partial_timeout_s,
    )
    base = NodeConfig(
        group_size=session.group_size,
        threshold=session.threshold,
        max_colluders=session.max_colluders,
        timeouts=timeouts,
        fixed_point=FixedPoint(frac_bits=session.frac_bits),
        cooldown_s=session.cooldown_s,
        session_kind=session.kind,
        max_message_bytes=session.max_message_bytes,
    )
    return dataclasses.replace(base, **changes)


def build_peer(
    *,
    identity: Identity,
    certificate: Certificate,
    admission_public_key: bytes,
    network_id: str,
    trainer: Any,
    broker: BrokerSettings,
    node: NodeConfig,
    on_event: EventCallback | None = None,
    totals_path: Path | None = None,
) -> Peer:
    """A node around ``trainer``, merging with the rule its sharing strategy pairs with; a
    group-noise trainer (``noise = "group"``) gets its steps driven by the node's sessions
    (peer/group_steps.py) instead."""
    sharing = trainer.sharing
    return Peer(
        group_steps=GroupSteps.for_trainer(trainer, node),
        identity=identity,
        certificate=certificate,
        admission_public_key=admission_public_key,
        network_id=network_id,
        trainer=trainer,
        broker=broker,
        config=dataclasses.replace(node, merge=sharing.merge),
        sharing=sharing,
        on_event=on_event,
        totals_path=totals_path,
    )


def pacing_config(cfg: PeerConfig) -> PacingConfig:
    """The daemon's pacing: the budget's planned private rounds spread over budget_hours."""
    training = cfg.training
    private_rounds = max(1, training.planned_rounds - training.averaging_rounds)
    return PacingConfig(
        private_round_interval_s=private_round_interval(cfg.pace.budget_hours, private_rounds),
        averaging_interval_s=cfg.pace.averaging_interval_s,
        train_only_when_grouped=cfg.pace.train_only_when_grouped,
    )


def check_group_noise(cfg: PeerConfig) -> None:
    """ConfigError unless a ``noise = "group"`` peer's groups can hold a release: h + c
    contributors (docs/privacy.md, "Group noise")."""
    training, session = cfg.training, cfg.session
    if training.noise != "group":
        return
    least = training.honest_min + session.max_colluders
    if session.group_size < least:
        raise ConfigError(f"training.noise = 'group' releases only sums of honest_min + "
                          f"max_colluders = {least} contributors; session.group_size is "
                          f"{session.group_size}")


def peer_from_config(cfg: PeerConfig, *, on_event: EventCallback | None = None) -> Peer:
    """The daemon's peer: credentials, data, trainer (resumed) and node from one config.

    The device profile's process settings (allocator, torch threads) apply first, so the data
    is loaded under them."""
    identity, certificate = load_credentials(cfg)
    check_group_noise(cfg)
    apply_process_settings(cfg.device)
    source: BlockSource | None = None
    if cfg.data.startswith(BLOCKS_PREFIX):
        train, holdout, source = load_block_data(cfg)
    else:
        train, holdout = load_local_data(cfg)
    try:
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"state_dir: cannot create {cfg.state_dir}: {exc.strerror}") from None
    trainer = build_trainer(cfg.training, train, holdout, cfg.state_dir, source)
    node = node_config(
        cfg.session,
        announce_interval_s=cfg.announce_interval_s,
        silence_expiry_s=cfg.silence_expiry_s,
        clock_skew_s=cfg.clock_skew_s,
        checkpoint_interval_s=cfg.checkpoint_interval_s,
        pacing=pacing_config(cfg),
        view=dataclasses.replace(NodeConfig().view, view_size=cfg.view_size),
    )
    return build_peer(
        identity=identity,
        certificate=certificate,
        admission_public_key=cfg.admission_public_key,
        network_id=cfg.network_id,
        trainer=trainer,
        broker=cfg.broker,
        node=node,
        on_event=on_event,
        totals_path=cfg.state_dir / TOTALS_FILE,
    )
