"""A serving peer's state without I/O (peer/inference/serving.py): per-client counters, quota,
rate and the bound on client accounts, each a counted drop with its reason."""

from __future__ import annotations

import numpy as np
import pytest

from crypto.field import field_to_bytes
from crypto.inference import SnapshotParams, encode_snapshot, share_snapshot
from peer.errors import DroppedError
from peer.inference.serving import ACCOUNT_BYTES, ServeLimits, ServingState
from protocol.inference import Query, ServedModel

SNAPSHOT = bytes(16)


def _state(limits: ServeLimits, max_rows: int = 100) -> ServingState:
    params = SnapshotParams.for_unit_variance(3, 8, max_rows_per_client=max_rows)
    rng = np.random.default_rng(0)
    snapshot = encode_snapshot(rng.normal(0, 0.1, (3, 8)), np.zeros(3), params)
    model = ServedModel(("s1", "s2", "s3"), 2, 3, 8, params.frac_w, params.frac_x,
                        params.feature_norm_bound, max_rows, snapshot.content_hash)
    state = ServingState("s2", limits)
    share = share_snapshot(snapshot, n=3, t=2)[1]
    state.install(SNAPSHOT, model, bytes(32) + field_to_bytes(share.values))
    return state


def _query(counter: int, rows: int = 1) -> Query:
    return Query("s2", b"cert", counter, rows, b"")


def _reason(state: ServingState, client: str, query: Query, now: float) -> str:
    with pytest.raises(DroppedError) as caught:
        state.admit(SNAPSHOT, client, query, now)
    return caught.value.reason


def _answer(state: ServingState, client: str, query: Query, now: float) -> None:
    snapshot, account = state.admit(SNAPSHOT, client, query, now)
    state.answer(snapshot, account, client, query, bytes(4 * 8 * query.rows))


def test_accounts_are_bounded_and_a_newcomer_is_refused_not_evicting_anyone():
    state = _state(ServeLimits(max_clients=2))
    before = state.held_bytes()
    _answer(state, "c1", _query(1), 0.0)
    _answer(state, "c2", _query(1), 0.0)
    assert _reason(state, "c3", _query(1), 0.0) == "clients_full"
    assert state.held_bytes() == before + 2 * ACCOUNT_BYTES
    _answer(state, "c1", _query(2), 0.0)  # the existing clients keep their accounts


def test_rate_quota_and_counter_each_refuse_with_their_reason():
    state = _state(ServeLimits(rows_per_minute=10), max_rows=25)
    _answer(state, "c", _query(1, rows=8), 0.0)
    assert _reason(state, "c", _query(2, rows=8), 1.0) == "rate"
    _answer(state, "c", _query(2, rows=8), 60.0)  # tokens refilled after a minute
    assert _reason(state, "c", _query(2, rows=1), 120.0) == "stale_counter"
    _answer(state, "c", _query(3, rows=8), 120.0)
    assert _reason(state, "c", _query(4, rows=8), 240.0) == "quota"  # 24 + 8 > 25
    assert state.rows_served == 24


def test_an_unknown_snapshot_and_a_malformed_share_are_refused():
    state = _state(ServeLimits())
    with pytest.raises(DroppedError) as caught:
        state.admit(b"x" * 16, "c", _query(1), 0.0)
    assert caught.value.reason == "unknown_snapshot"
    snapshot, account = state.admit(SNAPSHOT, "c", _query(1), 0.0)
    with pytest.raises(DroppedError) as caught:
        state.answer(snapshot, account, "c", _query(1), bytes(4 * 7))
    assert caught.value.reason == "bad_shares"
    assert account.rows_answered == 0  # a refused answer charges nothing


def test_a_snapshot_is_installed_once_so_a_replay_cannot_reset_counters_or_quota():
    state = _state(ServeLimits(max_snapshots=1), max_rows=2)
    held = state.snapshots[SNAPSHOT]
    share = bytes(32) + field_to_bytes(held.weights.values)
    _answer(state, "c", _query(7, rows=2), 0.0)
    with pytest.raises(DroppedError) as caught:
        state.install(SNAPSHOT, held.model, share)
    assert caught.value.reason == "snapshot_known"
    assert _reason(state, "c", _query(7), 0.0) == "stale_counter"  # the account is kept
    assert _reason(state, "c", _query(8), 0.0) == "quota"
    state.install(bytes([1]) * 16, held.model, share)  # forgets SNAPSHOT (max_snapshots=1)
    with pytest.raises(DroppedError) as caught:
        state.install(SNAPSHOT, held.model, share)  # nor once it has been forgotten
    assert caught.value.reason == "snapshot_known"


def test_a_description_signed_by_another_key_or_altered_after_signing_is_refused():
    """The owner's signature over the snapshot description (endpoint.signed_description):
    only the owner's key, over the exact bytes, for this network and snapshot id."""
    import dataclasses
    import time

    from crypto.admission import AdmissionKey
    from peer.inference.local import make_endpoint
    from protocol.inference import SnapshotDescription, decode_description, encode_description

    admission = AdmissionKey.generate("serve")
    owner, mallory, client = (make_endpoint(admission, n) for n in ("owner", "mallory", "client"))
    model = ServedModel(("s1", "s2", "s3"), 2, 3, 8, 12, 8, 100, 100, bytes(32))
    description = SnapshotDescription("serve", "owner", SNAPSHOT, time.time_ns() // 1000, model)
    raw, signature = owner.sign_description(description)

    def reason(cert: bytes, raw: bytes, signature: bytes, snapshot_id: bytes = SNAPSHOT) -> str:
        with pytest.raises(DroppedError) as caught:
            client.signed_description(cert, decode_description(raw), raw, signature, snapshot_id)
        return caught.value.reason

    assert client.signed_description(owner.certificate, description, raw,
                                     signature, SNAPSHOT).peer_id == "owner"
    # signed by another key: mallory's signature over the owner's description
    _, forged = mallory.sign_description(description)
    assert reason(owner.certificate, raw, forged) == "bad_description_signature"
    # mallory's certificate presented as the owner's
    assert reason(mallory.certificate, raw, signature) == "sender_mismatch"
    # altered after signing: another server list, or another threshold, under the signature
    for changed in (dataclasses.replace(model, servers=("s1", "s2", "mallory")),
                    dataclasses.replace(model, max_rows_per_client=10_000)):
        altered = encode_description(dataclasses.replace(description, model=changed))
        assert reason(owner.certificate, altered, signature) == "bad_description_signature"
    # a genuine description replayed under another snapshot id
    assert reason(owner.certificate, raw, signature, bytes(range(16))) == "bad_description"
