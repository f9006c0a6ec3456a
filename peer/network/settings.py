"""The node's settings and interfaces: its config, the trainer it drives, the events it emits.

Kept apart from peer/network/node.py so that the node module holds behaviour only;
``peer.network.node`` re-exports every name here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from crypto.field import FixedPoint
from peer.network.pacing import PacingConfig
from peer.network.session.common import Contribution, GroupResult, SecretTap, SessionTimeouts
from peer.network.session.masked_messages import MaskedTimeouts
from peer.network.view.partial import ViewConfig
from peer.sharing.merge import GOSSIP_AVERAGING, MergeConfig
from protocol.limits import DEFAULT_MAX_MESSAGE_BYTES


class Trainer(Protocol):
    """What the node needs from the training half (peer.training.trainer.LocalTrainer satisfies it).

    The trainer must be thread-safe: ``train_round`` runs in a worker thread while the event
    loop calls ``apply_update`` (LocalTrainer queues merges that arrive mid-round).

    ``train_round`` raises :class:`peer.errors.BudgetExhaustedError` once the privacy budget is
    spent (before touching the model). The residual fill is not the trainer's business but its
    sharing strategy's, which the node is given on its own (``Peer(sharing=...)``).

    Optional members, read with defaults when absent (benchmark and test stand-ins):
    ``round`` (rounds since the peer was created), ``epsilon`` / ``budget_epsilon`` (from the
    ledger; None without DP / without a budget), ``clip_norm`` (adaptive clipping's current
    C; None when C is fixed), ``can_average`` and ``averaging_round()`` (a
    round that re-shares the model without a private step).
    """

    param_count: int
    model_id: str

    def train_round(self) -> Any: ...  # LocalUpdate(indices, values, steps, epsilon, round)
    def apply_update(self, indices: np.ndarray, values: np.ndarray) -> None: ...
    def evaluate(self) -> float: ...
    def save_checkpoint(self) -> None: ...


@dataclass(frozen=True)
class NodeConfig:
    """Timing and policy of the node loops: the one place that holds their defaults.

    The defaults are what ``murmur-peer run`` runs; ``peer.config.SessionConfig`` reads its
    defaults from here and the simulation states only what it changes (sim/setup.py).
    """

    group_size: int = 3  # at most g members per session (g - 1 invited)
    threshold: int = 2  # Shamir threshold t: t colluding members learn nothing more
    # c: colluding members (the initiator may be one) this peer's privacy must survive; every
    # sum it reveals holds >= max(3, c + 2) contributions (docs/sessions.md section 3.3).
    max_colluders: int = 1
    timeouts: SessionTimeouts = field(default_factory=SessionTimeouts)
    fixed_point: FixedPoint = field(default_factory=FixedPoint)
    merge: MergeConfig = GOSSIP_AVERAGING  # build_peer takes it from the sharing strategy
    announce_interval_s: float = 30.0
    silence_expiry_s: float = 120.0
    clock_skew_s: float = 300.0
    checkpoint_interval_s: float = 60.0
    start_jitter_s: float = 0.3  # random delay before inviting (desynchronises neighbours)
    cooldown_s: float = 1.0  # pause after a session before this peer initiates another
    over_invite: int = 1  # invite this many peers beyond g - 1; the first g - 1 to accept join
    tick_s: float = 0.05  # session timeout resolution
    round_pause_s: float = 0.0  # pause between training rounds (0: train back to back)
    # When rounds run (peer/network/pacing.py); the daemon derives the private round interval
    # from [pace] budget_hours.
    pacing: PacingConfig = field(default_factory=PacingConfig)
    evaluate_every: int = 1  # evaluate on the hold-out every N rounds (0: never)
    train: bool = True  # False: serve sessions with externally supplied updates (benchmarks)
    auto_start: bool = True  # False: only try_start_session() starts sessions (benchmarks)
    # Which session a peer runs (peer/network/session/kinds.py): "shamir" (Shamir shares,
    # peer/network/session/shamir.py) or "masked" (one masked vector per member,
    # peer/network/session/masked.py). Peers of different kinds never group: the kind is part
    # of the model id a peer announces and samples by.
    session_kind: str = "shamir"
    # The masked session's per-phase timeouts; None: derived from ``timeouts``
    # (peer.network.session.kinds.masked_timeouts_from).
    masked_timeouts: MaskedTimeouts | None = None
    # Largest payload this peer publishes: a session message above it goes out as
    # signed CHUNKs that each fit (protocol/chunks.py). 16 KiB..8 MiB; the default 256 KiB
    # suits EMQX, RabbitMQ and most cloud brokers. Receivers accept either form.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # The membership view (docs/design/partial-view.md): view_size 0 follows every
    # peer's announcement (the full view); > 0 follows a few announcement buckets, aiming at
    # about view_size peers, and looks up senders outside them (peer/network/view/loop.py).
    view: ViewConfig = field(default_factory=lambda: ViewConfig(view_size=0))
    # Audit read-out of every session secret this peer draws (session_common.SecretTap): for
    # confidentiality tests and reviews only; None in every peer the daemon builds.
    secret_tap: SecretTap | None = None


@dataclass(frozen=True)
class PeerEvent:
    """Something the simulation / tests may record. ``data`` holds plain values and arrays."""

    # "connected", "disconnected", "round", "session_done", "session_aborted",
    # "merge_rejected", "budget_milestone", "budget_exhausted", "training_failed"
    kind: str
    peer_id: str
    time: float
    data: dict[str, Any]


EventCallback = Callable[[PeerEvent], None]


def session_done_data(result: GroupResult, contribution: Contribution | None, staleness: int,
                      merged: Any, started_at: float, duration: float) -> dict[str, Any]:
    """The data of a ``session_done`` event (what the simulation and the tests record).

    ``merged`` is the merge rule's result (``indices``, ``values``, ``clipped``) or None when
    the merge was rejected.
    """
    return {
        "session_id": result.session_id,
        "role": result.role.value,
        "members": result.members,
        "contributors": result.contributors,
        "threshold": result.threshold,
        "coordinates": result.coordinates,
        "group_sum": result.group_sum,
        "field_sum": result.field_sum,  # group noise: the rebuilt field sum (else None)
        "own_indices": None if contribution is None else contribution.indices,
        "own_values": None if contribution is None else contribution.values,
        "contributed": result.own_values,  # dense on the coordinates, incl. residual fill
        "filled_indices": result.filled_indices,
        "filled_values": result.filled_values,
        "staleness": staleness,
        "merged_norm": None if merged is None else float(np.linalg.norm(merged.values)),
        "clipped": None if merged is None else merged.clipped,
        "started_at": started_at,
        "duration_s": duration,
    }
