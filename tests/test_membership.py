"""peer.network.view.membership: admission checks on real signed announcements, expiry and
sampling."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from crypto.admission import AdmissionKey
from crypto.identity import Identity
from peer.errors import DroppedError
from peer.network.view.membership import MembershipView
from protocol.codec import decode_message, encode_message
from protocol.messages import PROTOCOL_VERSION, Announce, Header, Kind, Leave, SignedMessage

NET = "testnet"
NOW = 1_800_000_000.0
DAY = 86_400.0
_seq = itertools.count(1_000)


@pytest.fixture(scope="module")
def admission() -> AdmissionKey:
    return AdmissionKey.generate(NET)


def _view(admission: AdmissionKey, self_id: str = "me") -> MembershipView:
    return MembershipView(NET, admission.public_key, self_id, silence_expiry_s=60.0,
                          clock_skew_s=30.0)


CONNECTION_A = bytes(range(16))
CONNECTION_B = bytes(range(16, 32))


def _announce(
    identity: Identity,
    certificate: bytes,
    *,
    sender: str | None = None,
    network: str = NET,
    model_id: str = "mlp-digits",
    param_count: int = 1000,
    seq: int | None = None,
    signer: Identity | None = None,
    connection: bytes = CONNECTION_A,
) -> SignedMessage:
    header = Header(PROTOCOL_VERSION, network, Kind.ANNOUNCE, sender or identity.peer_id, b"",
                    next(_seq) if seq is None else seq)
    wire = encode_message(header, Announce(certificate, model_id, param_count, connection),
                          (signer or identity).sign)
    return decode_message(wire)  # exactly what a receiver gets off the wire


def _leave(signer: Identity, sender: str = "alice", *, connection: bytes = CONNECTION_A,
           seq: int | None = None) -> SignedMessage:
    header = Header(PROTOCOL_VERSION, NET, Kind.LEAVE, sender, b"",
                    next(_seq) if seq is None else seq)
    return decode_message(encode_message(header, Leave("bye", connection), signer.sign))


def _peer(admission: AdmissionKey, name: str, *, valid_for_s: float = DAY,
          issued: float = NOW) -> tuple[Identity, bytes]:
    identity = Identity.generate(name)
    cert = admission.issue(identity.public, valid_for_s=valid_for_s, now=issued)
    return identity, cert.to_bytes()


def _drop_reason(view: MembershipView, msg: SignedMessage, now: float = NOW) -> str:
    with pytest.raises(DroppedError) as info:
        view.on_announce(msg, now)
    return info.value.reason


def test_valid_announce_is_admitted(admission: AdmissionKey) -> None:
    view = _view(admission)
    alice, cert = _peer(admission, "alice")
    member = view.on_announce(_announce(alice, cert), NOW)
    assert member.public == alice.public
    assert (member.model_id, member.param_count, member.last_seen) == ("mlp-digits", 1000, NOW)
    assert member.expires_at == NOW + DAY
    assert view.get("alice") is member
    assert [m.peer_id for m in view.live(NOW)] == ["alice"]


def test_foreign_network_certificate_is_dropped(admission: AdmissionKey) -> None:
    other = AdmissionKey.generate("othernet")
    mallory = Identity.generate("mallory")
    foreign_cert = other.issue(mallory.public, valid_for_s=DAY, now=NOW).to_bytes()
    view = _view(admission)
    assert _drop_reason(view, _announce(mallory, foreign_cert)) == "foreign_network"
    # A message whose header names another network is foreign too, whatever it carries.
    bob, cert = _peer(admission, "bob")
    assert _drop_reason(view, _announce(bob, cert, network="othernet")) == "foreign_network"
    assert len(view) == 0


def test_certificate_from_another_key_of_the_same_network_id_is_dropped(
    admission: AdmissionKey,
) -> None:
    impostor_ca = AdmissionKey.generate(NET)  # same network name, different key
    mallory = Identity.generate("mallory")
    cert = impostor_ca.issue(mallory.public, valid_for_s=DAY, now=NOW).to_bytes()
    assert _drop_reason(_view(admission), _announce(mallory, cert)) == "bad_certificate"


def test_expired_and_not_yet_valid_certificates_are_dropped(admission: AdmissionKey) -> None:
    view = _view(admission)
    old, old_cert = _peer(admission, "old", valid_for_s=100.0, issued=NOW - 1000.0)
    assert _drop_reason(view, _announce(old, old_cert)) == "expired_certificate"
    future, future_cert = _peer(admission, "future", issued=NOW + 3600.0)
    assert _drop_reason(view, _announce(future, future_cert)) == "expired_certificate"
    # Within the clock skew (30 s) both sides are still accepted.
    late, late_cert = _peer(admission, "late", valid_for_s=100.0, issued=NOW - 120.0)
    assert view.on_announce(_announce(late, late_cert), NOW).peer_id == "late"


def test_tampered_or_garbage_certificate_is_dropped(admission: AdmissionKey) -> None:
    view = _view(admission)
    alice, cert = _peer(admission, "alice")
    # Flip one byte of the box key (offset: magic 4 + version 1 + 2 names + verify key).
    offset = 5 + 1 + len("alice") + 1 + len(NET) + 32 + 3
    tampered = bytearray(cert)
    tampered[offset] ^= 0x01
    assert _drop_reason(view, _announce(alice, bytes(tampered))) == "bad_certificate"
    assert _drop_reason(view, _announce(alice, b"\x00" * 200)) == "bad_certificate"
    assert _drop_reason(view, _announce(alice, cert[:-1])) == "bad_certificate"


def test_announce_signed_with_another_key_is_dropped(admission: AdmissionKey) -> None:
    alice, cert = _peer(admission, "alice")
    thief = Identity.generate("alice")  # same name, not the certified key
    msg = _announce(alice, cert, signer=thief)
    assert _drop_reason(_view(admission), msg) == "bad_signature"


def test_certificate_of_someone_else_is_a_sender_mismatch(admission: AdmissionKey) -> None:
    _alice, alice_cert = _peer(admission, "alice")
    mallory, _ = _peer(admission, "mallory")
    # Mallory replays Alice's certificate under her own sender name.
    msg = _announce(mallory, alice_cert, sender="mallory")
    assert _drop_reason(_view(admission), msg) == "sender_mismatch"


def test_replayed_older_announce_is_stale_and_same_one_is_idempotent(
    admission: AdmissionKey,
) -> None:
    view = _view(admission)
    alice, cert = _peer(admission, "alice")
    first = _announce(alice, cert, seq=10, model_id="m1")
    second = _announce(alice, cert, seq=20, model_id="m2")
    view.on_announce(first, NOW)
    assert view.on_announce(second, NOW + 1).model_id == "m2"
    assert _drop_reason(view, first, NOW + 2) == "stale_announce"
    again = view.on_announce(second, NOW + 5)  # retained copy after a reconnect
    assert again.last_seen == NOW + 1  # a copy proves no liveness
    assert view.on_leave(_leave(alice, seq=25)) == "alice"
    assert _drop_reason(view, second, NOW + 6) == "stale_announce"  # cannot be revived
    assert view.on_announce(_announce(alice, cert, seq=30), NOW + 7).seq == 30


def test_a_forgotten_peer_comes_back_with_its_last_announcement_not_an_older_one(
    admission: AdmissionKey,
) -> None:
    view = _view(admission)
    alice, cert = _peer(admission, "alice")
    first = _announce(alice, cert, seq=10)
    second = _announce(alice, cert, seq=20)
    view.on_announce(first, NOW)
    view.on_announce(second, NOW + 1)
    assert view.forget(["alice", "bob"]) == ["alice"]  # bob was never in the view
    assert "alice" not in view and view.peer_ids() == []
    assert _drop_reason(view, first, NOW + 2) == "stale_announce"
    assert view.on_announce(second, NOW + 3).last_seen == NOW + 3  # the retained copy
    view.forget(["alice"])  # forgotten again: a newer announcement re-admits it too
    assert view.on_announce(_announce(alice, cert, seq=30), NOW + 4).seq == 30
    assert _drop_reason(view, second, NOW + 5) == "stale_announce"


def test_signed_leave_removes_and_forged_leave_is_dropped(admission: AdmissionKey) -> None:
    view = _view(admission)
    alice, cert = _peer(admission, "alice")
    view.on_announce(_announce(alice, cert), NOW)

    with pytest.raises(DroppedError) as info:
        view.on_leave(_leave(Identity.generate("alice")))
    assert info.value.reason == "bad_signature"
    with pytest.raises(DroppedError) as info:
        view.on_leave(_leave(alice, sender="ghost"))
    assert info.value.reason == "unknown_sender"
    assert "alice" in view
    view.on_leave(_leave(alice))
    assert view.get("alice") is None


def test_silent_and_expired_peers_leave_the_live_set(admission: AdmissionKey) -> None:
    view = _view(admission)
    alice, alice_cert = _peer(admission, "alice")
    brief, brief_cert = _peer(admission, "brief", valid_for_s=50.0)
    view.on_announce(_announce(alice, alice_cert), NOW)
    view.on_announce(_announce(brief, brief_cert), NOW)
    assert {m.peer_id for m in view.live(NOW + 10)} == {"alice", "brief"}
    # brief's certificate ends at NOW+50, +30 s skew: gone at NOW+81 though not silent yet.
    view.on_announce(_announce(alice, alice_cert), NOW + 55)
    assert {m.peer_id for m in view.live(NOW + 81)} == {"alice"}
    # alice last heard at NOW+55: silent for more than 60 s at NOW+116.
    assert view.live(NOW + 116) == []
    assert sorted(view.expire(NOW + 116)) == ["alice", "brief"]
    assert len(view) == 0


def test_last_will_of_the_current_connection_removes_a_member(admission: AdmissionKey) -> None:
    view = _view(admission)
    alice, cert = _peer(admission, "alice")
    # The will is signed when the connection opens, before that connection's announcement,
    # so its seq is lower: the connection id, not the seq, decides.
    will = _leave(alice, connection=CONNECTION_A, seq=5)
    view.on_announce(_announce(alice, cert, seq=6, connection=CONNECTION_A), NOW)
    assert view.on_leave(will) == "alice"
    assert view.live(NOW) == [] and view.get("alice") is None


def test_will_or_leave_of_an_earlier_connection_changes_nothing(admission: AdmissionKey) -> None:
    view = _view(admission)
    alice, cert = _peer(admission, "alice")
    old_will = _leave(alice, connection=CONNECTION_A, seq=5)
    old_leave = _leave(alice, connection=CONNECTION_A, seq=8)
    view.on_announce(_announce(alice, cert, seq=6, connection=CONNECTION_A), NOW)
    view.on_announce(_announce(alice, cert, seq=20, connection=CONNECTION_B), NOW + 1)
    for replayed in (old_will, old_leave):
        with pytest.raises(DroppedError) as info:
            view.on_leave(replayed)
        assert info.value.reason == "stale_leave"
    assert view.get("alice") is not None and view.get("alice").connection == CONNECTION_B


def test_sampling_excludes_self_excluded_and_other_models(admission: AdmissionKey) -> None:
    view = _view(admission, self_id="me")
    me, me_cert = _peer(admission, "me")
    view.on_announce(_announce(me, me_cert), NOW)  # own announce comes back from the broker
    for i in range(6):
        ident, cert = _peer(admission, f"p{i}")
        view.on_announce(_announce(ident, cert), NOW)
    other_model, om_cert = _peer(admission, "cnn")
    view.on_announce(_announce(other_model, om_cert, model_id="cnn-digits"), NOW)
    other_size, os_cert = _peer(admission, "big")
    view.on_announce(_announce(other_size, os_cert, param_count=2000), NOW)

    counts: Counter[str] = Counter()
    for _ in range(300):
        picked = view.sample(2, NOW, model_id="mlp-digits", exclude={"p0"}, param_count=1000)
        assert len(picked) == 2 and len(set(picked)) == 2
        counts.update(picked)
    assert set(counts) == {"p1", "p2", "p3", "p4", "p5"}
    assert min(counts.values()) > 60  # roughly uniform: 120 expected each
    assert "me" not in {m.peer_id for m in view.live(NOW)}
    # Without a param_count filter the other-sized peer qualifies; other models never do.
    everyone = set(view.sample(10, NOW, model_id="mlp-digits"))
    assert everyone == {"p0", "p1", "p2", "p3", "p4", "p5", "big"}
    assert view.sample(3, NOW, model_id="cnn-digits") == ["cnn"]
    assert view.sample(0, NOW, model_id="mlp-digits") == []
    with pytest.raises(ValueError):
        view.sample(-1, NOW, model_id="mlp-digits")


def test_a_client_certificate_never_joins_the_training_view(admission: AdmissionKey) -> None:
    erin = Identity.generate("erin")
    cert = admission.issue(erin.public, valid_for_s=DAY, now=NOW, role="client").to_bytes()
    view = _view(admission)
    assert _drop_reason(view, _announce(erin, cert)) == "not_a_peer"
    assert "erin" not in view
