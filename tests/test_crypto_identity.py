"""Identities, key files and detached signatures."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.admission import AdmissionKey
from crypto.errors import KeyFileError, SignatureError
from crypto.identity import Identity, PublicIdentity, check_name, verify_signature


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.generate("alice")


def test_check_name_accepts_and_rejects() -> None:
    assert check_name("peer-01_x", "peer id") == "peer-01_x"
    for bad in ["", "Alice", "-x", "a" * 65, "a/b", "a b", "ü"]:
        with pytest.raises(ValueError, match="peer id"):
            check_name(bad, "peer id")


def test_public_identity_has_32_byte_keys(alice: Identity) -> None:
    public = alice.public
    assert isinstance(public, PublicIdentity)
    assert len(public.verify_key) == 32 and len(public.box_key) == 32
    assert public.peer_id == "alice"
    assert "alice" in repr(alice) and public.verify_key.hex() not in repr(alice)


def test_identity_rejects_bad_peer_id() -> None:
    with pytest.raises(ValueError):
        Identity.generate("Not Valid")


def test_save_load_round_trip_with_0600(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "alice.key"
    alice.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = Identity.load(path)
    assert loaded.public == alice.public
    assert loaded.sign(b"x") == alice.sign(b"x")  # Ed25519 is deterministic
    # no temporary files left behind
    assert [p.name for p in tmp_path.iterdir()] == ["alice.key"]


def test_save_refuses_to_overwrite(tmp_path: Path, alice: Identity) -> None:
    path = tmp_path / "k"
    alice.save(path)
    other = Identity.generate("bob")
    with pytest.raises(FileExistsError):
        other.save(path)
    assert Identity.load(path).peer_id == "alice"
    other.save(path, overwrite=True)
    assert Identity.load(path).peer_id == "bob"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_load_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.key"
    with pytest.raises(KeyFileError, match=r"nope\.key.*does not exist"):
        Identity.load(path)


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="directory"):
        Identity.load(tmp_path)


@pytest.mark.parametrize("cut", [0, 1, 10, 40, -30, -2])
def test_load_truncated_file(tmp_path: Path, alice: Identity, cut: int) -> None:
    full = tmp_path / "full"
    alice.save(full)
    data = full.read_bytes()
    truncated = tmp_path / "cut.key"
    truncated.write_bytes(data[:cut])
    with pytest.raises(KeyFileError, match=r"cut\.key: .*truncated"):
        Identity.load(truncated)


def test_every_truncation_is_a_key_file_error(tmp_path: Path, alice: Identity) -> None:
    full = tmp_path / "full"
    alice.save(full)
    data = full.read_bytes()
    cut = tmp_path / "cut.key"
    for length in range(len(data) - 1):  # the last byte is a newline: dropping it is harmless
        cut.write_bytes(data[:length])
        with pytest.raises(KeyFileError, match=r"cut\.key: "):
            Identity.load(cut)


@pytest.mark.parametrize(
    "content",
    [
        b"\x89PNG\r\n\x1a\n\x00\x00binary",
        b'{"hello": "world"}',
        b"[1, 2, 3]",
        b"-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n",
    ],
)
def test_load_foreign_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "other.key"
    path.write_bytes(content)
    with pytest.raises(KeyFileError, match=r"other\.key: not a murmur key file"):
        Identity.load(path)


def test_wrong_kind_is_named(tmp_path: Path, alice: Identity) -> None:
    admission_path = tmp_path / "net.admission"
    AdmissionKey.generate("net").save(admission_path)
    with pytest.raises(KeyFileError, match=r"net\.admission.*'admission-key'.*'identity'"):
        Identity.load(admission_path)
    identity_path = tmp_path / "alice.key"
    alice.save(identity_path)
    with pytest.raises(KeyFileError, match=r"'identity'.*'admission-key'"):
        AdmissionKey.load(identity_path)


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("signing_seed", "zz", "not hex"),
        ("signing_seed", "00" * 31, "31 bytes"),
        ("box_private_key", None, "missing"),
        ("peer_id", "BAD ID", "must match"),
        ("version", 99, "version"),
        ("version", True, "version"),
    ],
)
def test_load_corrupt_fields(
    tmp_path: Path, alice: Identity, field: str, value: object, problem: str
) -> None:
    path = tmp_path / "k"
    alice.save(path)
    document = json.loads(path.read_text())
    if value is None:
        del document[field]
    else:
        document[field] = value
    path.write_text(json.dumps(document))
    with pytest.raises(KeyFileError, match=problem):
        Identity.load(path)


def test_load_warns_on_exposed_file(
    tmp_path: Path, alice: Identity, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "k"
    alice.save(path)
    os.chmod(path, 0o644)
    with caplog.at_level("WARNING"):
        Identity.load(path)
    assert "0600" in caplog.text


def test_signature_verifies(alice: Identity) -> None:
    signature = alice.sign(b"message")
    assert len(signature) == 64
    verify_signature(alice.public.verify_key, b"message", signature)


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=200),
    position=st.integers(0, 10_000),
    flip=st.integers(1, 255),
)
def test_any_tampered_byte_is_detected(data: bytes, position: int, flip: int) -> None:
    signer = _SIGNER
    signature = signer.sign(data)
    message_pos = position % len(data)
    tampered = bytearray(data)
    tampered[message_pos] ^= flip
    with pytest.raises(SignatureError):
        verify_signature(signer.public.verify_key, bytes(tampered), signature)
    bad_signature = bytearray(signature)
    bad_signature[position % 64] ^= flip
    with pytest.raises(SignatureError):
        verify_signature(signer.public.verify_key, data, bytes(bad_signature))


_SIGNER = Identity.generate("signer")


def test_signature_wrong_key_and_lengths(alice: Identity) -> None:
    other = Identity.generate("bob")
    signature = alice.sign(b"m")
    with pytest.raises(SignatureError):
        verify_signature(other.public.verify_key, b"m", signature)
    with pytest.raises(SignatureError, match="64 bytes"):
        verify_signature(alice.public.verify_key, b"m", signature[:-1])
    with pytest.raises(SignatureError, match="32 bytes"):
        verify_signature(b"short", b"m", signature)
