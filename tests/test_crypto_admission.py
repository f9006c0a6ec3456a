"""Admission keys and certificates: each rejection has its own error class."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.admission import AdmissionKey, Certificate, verify_certificate
from crypto.errors import (
    BadCertificateSignatureError,
    CertificateError,
    ExpiredCertificateError,
    ForeignNetworkError,
    KeyFileError,
    MalformedCertificateError,
)
from crypto.identity import Identity

NOW = 1_750_000_000.0
DAY = 86_400.0

NETWORK = AdmissionKey.generate("lab")
PEER = Identity.generate("alice")
CERT = NETWORK.issue(PEER.public, valid_for_s=DAY, now=NOW)


def verify(cert: Certificate, *, now: float = NOW, network: str = "lab",
           key: bytes | None = None, skew: float = 300.0):
    return verify_certificate(
        cert,
        network_id=network,
        admission_public_key=NETWORK.public_key if key is None else key,
        now=now,
        clock_skew_s=skew,
    )


def test_valid_certificate_round_trips_and_verifies() -> None:
    data = CERT.to_bytes()
    parsed = Certificate.from_bytes(data)
    assert parsed == CERT
    assert verify(parsed) == PEER.public
    assert parsed.public == PEER.public
    assert parsed.expires_at - parsed.issued_at == DAY


def test_unsigned_certificate() -> None:
    for signature in (b"", bytes(64)):
        unsigned = dataclasses.replace(CERT, signature=signature)
        with pytest.raises(BadCertificateSignatureError, match="unsigned"):
            verify(unsigned)
    with pytest.raises(ValueError):
        dataclasses.replace(CERT, signature=b"").to_bytes()


@pytest.mark.parametrize(
    "change",
    [
        {"peer_id": "mallory"},
        {"verify_key": bytes(32)},
        {"box_key": Identity.generate("x").public.box_key},
        {"expires_at": NOW + 365 * DAY},
        {"issued_at": NOW - 1},
    ],
)
def test_tampered_fields_break_the_signature(change: dict) -> None:
    with pytest.raises(BadCertificateSignatureError):
        verify(dataclasses.replace(CERT, **change))


@settings(max_examples=150, deadline=None)
@given(position=st.integers(0, 10_000), flip=st.integers(1, 255))
def test_any_tampered_byte_is_rejected(position: int, flip: int) -> None:
    data = bytearray(CERT.to_bytes())
    data[position % len(data)] ^= flip
    with pytest.raises(CertificateError):
        verify(Certificate.from_bytes(bytes(data)))


def test_signed_by_another_admission_key() -> None:
    rogue = AdmissionKey.generate("lab")
    forged = rogue.issue(PEER.public, valid_for_s=DAY, now=NOW)
    with pytest.raises(BadCertificateSignatureError):
        verify(forged)


def test_foreign_network() -> None:
    other = AdmissionKey.generate("other-net")
    foreign = other.issue(PEER.public, valid_for_s=DAY, now=NOW)
    with pytest.raises(ForeignNetworkError, match="other-net"):
        verify(foreign)
    # even with the right key of the other network, it is not a certificate for ours
    with pytest.raises(ForeignNetworkError):
        verify(foreign, key=other.public_key)


def test_expired_and_not_yet_valid_with_skew() -> None:
    skew = 300.0
    # inside the skew allowance on both sides
    assert verify(CERT, now=NOW - skew + 1) == PEER.public
    assert verify(CERT, now=NOW + DAY + skew - 1) == PEER.public
    with pytest.raises(ExpiredCertificateError, match="not valid yet"):
        verify(CERT, now=NOW - skew - 1)
    with pytest.raises(ExpiredCertificateError, match="expired"):
        verify(CERT, now=NOW + DAY + skew + 1)
    with pytest.raises(ExpiredCertificateError):
        verify(CERT, now=NOW + DAY + 1, skew=0.0)
    assert verify(CERT, now=NOW + DAY + 1000, skew=3600.0) == PEER.public


def test_bad_clock_arguments_are_refused() -> None:
    for now, skew in [(float("nan"), 300.0), (NOW, float("nan")), (NOW, -1.0), (float("inf"), 0)]:
        with pytest.raises(ValueError):
            verify(CERT, now=now, skew=skew)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"MCRT",
        b"XXXX" + CERT.to_bytes()[4:],
        CERT.to_bytes()[:-1],
        CERT.to_bytes() + b"\x00",
        CERT.to_bytes()[:5] + b"\x05ALICE" + CERT.to_bytes()[11:],
        CERT.to_bytes()[:4] + b"\x02" + CERT.to_bytes()[5:],
        b"\x00" * 10_000,
    ],
)
def test_malformed_bytes(data: bytes) -> None:
    with pytest.raises(MalformedCertificateError):
        Certificate.from_bytes(data)


def test_every_truncation_or_extension_is_malformed() -> None:
    data = CERT.to_bytes()
    for length in range(len(data)):
        with pytest.raises(MalformedCertificateError):
            Certificate.from_bytes(data[:length])
    for extra in (b"\x00", b"\xff" * 7):
        with pytest.raises(MalformedCertificateError):
            Certificate.from_bytes(data + extra)


def test_non_finite_or_inverted_times_are_malformed() -> None:
    for issued, expires in [(float("nan"), NOW), (NOW, float("inf")), (NOW, NOW - 1)]:
        body = dataclasses.replace(CERT, issued_at=issued, expires_at=expires).to_bytes()
        with pytest.raises(MalformedCertificateError):
            Certificate.from_bytes(body)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_bytes_only_raise_malformed(data: bytes) -> None:
    try:
        cert = Certificate.from_bytes(data)
    except MalformedCertificateError:
        return
    with pytest.raises(CertificateError):
        verify(cert)


def test_issue_rejects_bad_validity() -> None:
    for valid_for in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            NETWORK.issue(PEER.public, valid_for_s=valid_for, now=NOW)


def test_admission_key_file(tmp_path: Path) -> None:
    path = tmp_path / "lab.admission"
    NETWORK.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = AdmissionKey.load(path)
    assert loaded.network_id == "lab" and loaded.public_key == NETWORK.public_key
    reissued = loaded.issue(PEER.public, valid_for_s=DAY, now=NOW)
    assert verify(reissued) == PEER.public
    with pytest.raises(FileExistsError):
        AdmissionKey.generate("lab").save(path)
    path.write_bytes(path.read_bytes()[:25])
    with pytest.raises(KeyFileError, match="truncated"):
        AdmissionKey.load(path)
    with pytest.raises(KeyFileError, match="does not exist"):
        AdmissionKey.load(tmp_path / "missing")


def test_client_role_is_signed_and_peer_certificates_keep_their_layout() -> None:
    key = AdmissionKey.generate("net")
    who = Identity.generate("erin")
    peer = key.issue(who.public, valid_for_s=60, now=1000.0)
    client = key.issue(who.public, valid_for_s=60, now=1000.0, role="client")
    assert peer.to_bytes()[4] == 1 and client.to_bytes()[4] == 2
    assert Certificate.from_bytes(client.to_bytes()).role == "client"
    assert Certificate.from_bytes(peer.to_bytes()).role == "peer"
    verify_certificate(Certificate.from_bytes(client.to_bytes()), network_id="net",
                       admission_public_key=key.public_key, now=1000.0)
    # a client that rewrites its role to "peer" breaks the admission signature
    forged = dataclasses.replace(client, role="peer")
    with pytest.raises(BadCertificateSignatureError):
        verify_certificate(forged, network_id="net", admission_public_key=key.public_key,
                           now=1000.0)
    with pytest.raises(MalformedCertificateError, match="role"):
        raw = bytearray(client.to_bytes())
        raw[5] = 9
        Certificate.from_bytes(bytes(raw))
