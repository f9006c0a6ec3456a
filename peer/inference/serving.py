"""A serving peer's state, without I/O: the snapshot shares it holds and, per client, the
counter and the quota it enforces (docs/inference.md).

Security properties:

* It holds only shares: a snapshot share (one point of the weights' polynomials) and, for a
  moment, one point of a client's feature rows. Nothing it stores or logs is a weight or a
  feature value; fewer than t serving peers learn neither.
* Each client's counter strictly increases per snapshot, so the zero-constant mask
  (``crypto.inference.zero_mask``) of a (client, counter) is used at most once at this point.
  A snapshot id is installed at most once per process (``snapshot_known`` otherwise): a
  replayed SNAPSHOT_SHARE must not start the clients' counters and quotas again.
* The per-client quota (``max_rows_per_client``, fixed by the owner in the snapshot) and rate
  (``rows_per_minute``) bound what one certificate can extract through this peer; over either
  is a counted drop. Memory held for others is bounded: at most ``max_snapshots`` snapshots
  and ``max_clients`` accounts of fixed size per snapshot; a client beyond that is refused
  (``clients_full``) rather than evicting another, which would reset its quota.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from crypto.field import FIELD_BYTES, field_from_bytes
from crypto.inference import SnapshotParams, product_share, zero_mask
from crypto.masking import SEED_BYTES
from crypto.shamir import Share
from peer.errors import DroppedError
from protocol.inference import Query, ServedModel

#: Bytes one client account costs at most (counter, two numbers, dict entry, id string).
ACCOUNT_BYTES = 256
#: Snapshot ids remembered as installed (16 bytes each), so none is installed twice.
MAX_REMEMBERED_SNAPSHOTS = 4096


@dataclass(frozen=True)
class ServeLimits:
    """Bounds of a serving peer: snapshots held, client accounts per snapshot, and rate."""

    max_snapshots: int = 4
    max_clients: int = 1024
    rows_per_minute: int = 60_000

    def __post_init__(self) -> None:
        if self.max_snapshots < 1 or self.max_clients < 1 or self.rows_per_minute < 1:
            raise ValueError("max_snapshots, max_clients and rows_per_minute must be >= 1")


@dataclass
class ClientAccount:
    """One client's use of one snapshot at this serving peer."""

    last_counter: int = -1
    rows_answered: int = 0
    tokens: float = 0.0
    refilled_at: float = 0.0


@dataclass
class ServedSnapshot:
    """One snapshot share this peer serves, at its point ``point`` (1-based)."""

    snapshot_id: bytes
    model: ServedModel
    params: SnapshotParams
    point: int
    weights: Share
    mask_seed: bytes
    accounts: dict[str, ClientAccount] = field(default_factory=dict)
    #: What the SERVE re-announces: the owner's certificate, signed description and signature.
    announcement: tuple[bytes, bytes, bytes] | None = None

    def held_bytes(self) -> int:
        return int(self.weights.values.nbytes) + ACCOUNT_BYTES * len(self.accounts)


def params_of(model: ServedModel) -> SnapshotParams:
    return SnapshotParams(classes=model.classes, features=model.features, frac_w=model.frac_w,
                          frac_x=model.frac_x, feature_norm_bound=model.feature_norm_bound,
                          max_rows_per_client=model.max_rows_per_client)


class ServingState:
    """The snapshots a serving peer holds and the clients' accounts (no I/O, no clock)."""

    def __init__(self, me: str, limits: ServeLimits | None = None) -> None:
        self.me = me
        self.limits = limits or ServeLimits()
        self.snapshots: OrderedDict[bytes, ServedSnapshot] = OrderedDict()
        #: Ids installed before (held or forgotten), most recent last: never installed again,
        #: because a fresh install would start every client's counter and quota from zero.
        self.installed: OrderedDict[bytes, None] = OrderedDict()
        self.rows_served = 0

    def held_bytes(self) -> int:
        """Bytes held for others: snapshot shares and client accounts."""
        return sum(s.held_bytes() for s in self.snapshots.values())

    def install(self, snapshot_id: bytes, model: ServedModel, plaintext: bytes) -> ServedSnapshot:
        """Hold the opened SNAPSHOT_SHARE payload (mask seed, then W and b at our point)."""
        if self.me not in model.servers:
            raise DroppedError("not_a_server", "the snapshot does not name this peer")
        if snapshot_id in self.installed:
            raise DroppedError("snapshot_known", snapshot_id.hex())
        params = params_of(model)
        expected = SEED_BYTES + FIELD_BYTES * params.weight_elements
        if len(plaintext) != expected:
            raise DroppedError("bad_share", f"{len(plaintext)} bytes, expected {expected}")
        try:
            values = field_from_bytes(plaintext[SEED_BYTES:])
        except ValueError as exc:
            raise DroppedError("bad_share", str(exc)) from None
        point = model.servers.index(self.me) + 1
        snapshot = ServedSnapshot(snapshot_id, model, params, point,
                                  Share(x=point, values=values.copy()), plaintext[:SEED_BYTES])
        self.snapshots[snapshot_id] = snapshot
        self.installed[snapshot_id] = None
        while len(self.snapshots) > self.limits.max_snapshots:
            self.snapshots.popitem(last=False)
        while len(self.installed) > MAX_REMEMBERED_SNAPSHOTS:
            self.installed.popitem(last=False)
        return snapshot

    def admit(self, snapshot_id: bytes, client: str, query: Query,
              now: float) -> tuple[ServedSnapshot, ClientAccount]:
        """Every check of a query before its seal is opened; DroppedError with the reason."""
        snapshot = self.snapshots.get(snapshot_id)
        if snapshot is None:
            raise DroppedError("unknown_snapshot", f"{client}: {snapshot_id.hex()}")
        account = snapshot.accounts.get(client)
        if account is None:
            if len(snapshot.accounts) >= self.limits.max_clients:
                raise DroppedError("clients_full", client)
            account = ClientAccount(tokens=float(self.limits.rows_per_minute), refilled_at=now)
            snapshot.accounts[client] = account
        if query.counter <= account.last_counter:
            raise DroppedError("stale_counter", f"{client}: {query.counter}")
        if account.rows_answered + query.rows > snapshot.params.max_rows_per_client:
            raise DroppedError("quota", f"{client}: {account.rows_answered} rows answered")
        per_second = self.limits.rows_per_minute / 60.0
        account.tokens = min(float(self.limits.rows_per_minute),
                             account.tokens + (now - account.refilled_at) * per_second)
        account.refilled_at = now
        if account.tokens < query.rows:
            raise DroppedError("rate", f"{client}: {query.rows} rows")
        return snapshot, account

    def answer(self, snapshot: ServedSnapshot, account: ClientAccount, client: str,
               query: Query, plaintext: bytes) -> np.ndarray:
        """This peer's product share (rows x C) of an admitted query's opened feature shares;
        charges the account only when the answer is made."""
        features = snapshot.params.features
        if len(plaintext) != FIELD_BYTES * query.rows * features:
            raise DroppedError("bad_shares", f"{client}: not {query.rows} rows of {features}")
        try:
            values = field_from_bytes(plaintext)
        except ValueError as exc:
            raise DroppedError("bad_shares", f"{client}: {exc}") from None
        mask = zero_mask(snapshot.mask_seed, snapshot.snapshot_id, client, query.counter,
                         rows=query.rows, classes=snapshot.params.classes,
                         t=snapshot.model.threshold, point=snapshot.point)
        product = product_share(snapshot.weights, Share(x=snapshot.point, values=values),
                                snapshot.params, mask=mask)
        account.last_counter = query.counter
        account.rows_answered += query.rows
        account.tokens -= query.rows
        self.rows_served += query.rows
        return product.values
