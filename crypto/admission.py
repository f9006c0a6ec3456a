"""Network admission: an Ed25519 authority key that signs peer certificates.

A network is defined by its admission key. A certificate binds (peer id, network id, verify
key, box key, validity interval) under the admission key's signature, computed over a
domain-separated canonical encoding (``CERT_DOMAIN`` + the fixed field layout), so the
signature cannot be confused with a signature over any other Murmur structure.

:func:`verify_certificate` rejects, each with its own error class:
- bytes that do not parse -> MalformedCertificateError (raised by ``Certificate.from_bytes``);
- another network's certificate -> ForeignNetworkError;
- unsigned or tampered certificate, or one signed by another key -> BadCertificateSignatureError;
- expired or not yet valid beyond ``clock_skew_s`` -> ExpiredCertificateError.

Roles: a certificate is of role ``peer`` (trains, aggregates, serves) or ``client`` (may
only query serving peers for private predictions, docs/inference.md). The role is covered by
the admission key's signature, so a client cannot turn itself into a peer; training peers drop
an announcement whose certificate is not of role ``peer``. A peer certificate keeps the
version-1 layout byte for byte; any other role is version 2, with a role byte after the
version (one encoding per certificate).

Binary layout of ``Certificate.to_bytes`` (all integers big-endian)::

    magic   4 bytes  b"MCRT"
    version 1 byte   1 (role peer) or 2
    role    1 byte   version 2 only: 2 = client
    peer_id      u8 length + ASCII
    network_id   u8 length + ASCII
    verify_key   32 bytes (Ed25519)
    box_key      32 bytes (X25519)
    issued_at    f64 (Unix seconds)
    expires_at   f64 (Unix seconds)
    signature    64 bytes (Ed25519 by the admission key over CERT_DOMAIN + all bytes above)
"""

from __future__ import annotations

import dataclasses
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import nacl.signing

from crypto._keyfile import hex_field, load_key_file, name_field, save_key_file
from crypto.errors import (
    BadCertificateSignatureError,
    ExpiredCertificateError,
    ForeignNetworkError,
    MalformedCertificateError,
    SignatureError,
)
from crypto.identity import (
    KEY_BYTES,
    SIGNATURE_BYTES,
    PublicIdentity,
    check_name,
    verify_signature,
    warn_if_exposed,
)
from protocol.limits import is_valid_id

CERT_MAGIC = b"MCRT"
CERT_VERSION = 1
CERT_ROLE_VERSION = 2
ROLE_PEER = "peer"
ROLE_CLIENT = "client"
#: Role byte of a version-2 certificate (role peer is version 1 and has no role byte).
ROLE_CODES = {ROLE_CLIENT: 2}
CERT_DOMAIN = b"murmur/v1/certificate\x00"
ADMISSION_KIND = "admission-key"
_TIMES = struct.Struct(">dd")
_MAX_CERT_BYTES = 6 + 2 * 65 + 2 * KEY_BYTES + _TIMES.size + SIGNATURE_BYTES


def _encode_name(name: str) -> bytes:
    raw = name.encode("ascii")
    return bytes([len(raw)]) + raw


@dataclass(frozen=True)
class Certificate:
    """A peer certificate. ``signature`` is b"" (or zeros) when unsigned; ``role`` is
    ``"peer"`` or ``"client"`` (signed, module docstring)."""

    peer_id: str
    network_id: str
    verify_key: bytes
    box_key: bytes
    issued_at: float
    expires_at: float
    signature: bytes
    role: str = ROLE_PEER

    def _version_bytes(self) -> bytes:
        if self.role == ROLE_PEER:
            return bytes([CERT_VERSION])
        if self.role not in ROLE_CODES:
            raise ValueError(f"unknown certificate role {self.role!r}")
        return bytes([CERT_ROLE_VERSION, ROLE_CODES[self.role]])

    def signed_bytes(self) -> bytes:
        """The canonical encoding the admission key signs (without domain tag and signature)."""
        check_name(self.peer_id, "peer id")
        check_name(self.network_id, "network id")
        if len(self.verify_key) != KEY_BYTES or len(self.box_key) != KEY_BYTES:
            raise ValueError("verify_key and box_key must be 32 bytes each")
        return b"".join(
            (
                CERT_MAGIC,
                self._version_bytes(),
                _encode_name(self.peer_id),
                _encode_name(self.network_id),
                bytes(self.verify_key),
                bytes(self.box_key),
                _TIMES.pack(float(self.issued_at), float(self.expires_at)),
            )
        )

    def to_bytes(self) -> bytes:
        """Serialise; the signature must be present (64 bytes)."""
        if len(self.signature) != SIGNATURE_BYTES:
            raise ValueError("cannot serialise a certificate without a 64-byte signature")
        return self.signed_bytes() + bytes(self.signature)

    @classmethod
    def from_bytes(cls, data: bytes) -> Certificate:
        """Parse strictly; every defect raises MalformedCertificateError. Does not verify."""
        data = bytes(data)
        if len(data) > _MAX_CERT_BYTES:
            raise MalformedCertificateError(f"certificate too long ({len(data)} bytes)")
        if data[:4] != CERT_MAGIC:
            raise MalformedCertificateError("not a certificate (bad magic)")
        if len(data) < 5 or data[4] not in (CERT_VERSION, CERT_ROLE_VERSION):
            raise MalformedCertificateError("unsupported certificate version")
        role, offset = ROLE_PEER, 5
        if data[4] == CERT_ROLE_VERSION:
            roles = {code: name for name, code in ROLE_CODES.items()}
            if len(data) < 6 or data[5] not in roles:
                raise MalformedCertificateError("unknown certificate role")
            role, offset = roles[data[5]], 6
        names: list[str] = []
        for what in ("peer id", "network id"):
            if offset >= len(data):
                raise MalformedCertificateError(f"truncated before {what}")
            length = data[offset]
            raw = data[offset + 1 : offset + 1 + length]
            if len(raw) != length:
                raise MalformedCertificateError(f"truncated {what}")
            try:
                name = raw.decode("ascii")
            except UnicodeDecodeError:
                raise MalformedCertificateError(f"{what} is not ASCII") from None
            if not is_valid_id(name):
                raise MalformedCertificateError(f"invalid {what} {name!r}")
            names.append(name)
            offset += 1 + length
        rest = data[offset:]
        expected = 2 * KEY_BYTES + _TIMES.size + SIGNATURE_BYTES
        if len(rest) != expected:
            raise MalformedCertificateError(
                f"certificate body has {len(rest)} bytes after the names, expected {expected}"
            )
        verify_key = rest[:KEY_BYTES]
        box_key = rest[KEY_BYTES : 2 * KEY_BYTES]
        issued_at, expires_at = _TIMES.unpack_from(rest, 2 * KEY_BYTES)
        if not (math.isfinite(issued_at) and math.isfinite(expires_at)):
            raise MalformedCertificateError("validity times must be finite")
        if expires_at < issued_at:
            raise MalformedCertificateError("certificate expires before it is issued")
        signature = rest[2 * KEY_BYTES + _TIMES.size :]
        return cls(names[0], names[1], verify_key, box_key, issued_at, expires_at, signature,
                   role)

    @property
    def public(self) -> PublicIdentity:
        return PublicIdentity(self.peer_id, bytes(self.verify_key), bytes(self.box_key))


class AdmissionKey:
    """The certificate authority key of one network (Ed25519)."""

    __slots__ = ("network_id", "signing_key")

    def __init__(self, network_id: str, signing_key: nacl.signing.SigningKey) -> None:
        self.network_id = check_name(network_id, "network id")
        self.signing_key = signing_key

    def __repr__(self) -> str:  # never print secret material
        return f"AdmissionKey(network_id={self.network_id!r})"

    @classmethod
    def generate(cls, network_id: str) -> AdmissionKey:
        return cls(network_id, nacl.signing.SigningKey.generate())

    @property
    def public_key(self) -> bytes:
        """The 32-byte Ed25519 key peers pin to recognise this network."""
        return bytes(self.signing_key.verify_key)

    def issue(self, public: PublicIdentity, *, valid_for_s: float, now: float,
              role: str = ROLE_PEER) -> Certificate:
        """Sign a certificate of ``role`` for ``public`` valid over [now, now + valid_for_s]."""
        if not (math.isfinite(valid_for_s) and valid_for_s > 0 and math.isfinite(now)):
            raise ValueError("valid_for_s must be positive and times finite")
        unsigned = Certificate(
            peer_id=public.peer_id,
            network_id=self.network_id,
            verify_key=bytes(public.verify_key),
            box_key=bytes(public.box_key),
            issued_at=float(now),
            expires_at=float(now) + float(valid_for_s),
            signature=b"",
            role=role,
        )
        signature = self.signing_key.sign(CERT_DOMAIN + unsigned.signed_bytes()).signature
        return dataclasses.replace(unsigned, signature=signature)

    def save(self, path: Path, *, overwrite: bool = False) -> None:
        """Write atomically, mode 0600; FileExistsError unless ``overwrite``."""
        save_key_file(
            Path(path),
            ADMISSION_KIND,
            {"network_id": self.network_id, "signing_seed": bytes(self.signing_key).hex()},
            overwrite=overwrite,
        )

    @classmethod
    def load(cls, path: Path) -> AdmissionKey:
        """Load; KeyFileError naming the path and the problem on any failure."""
        path = Path(path)
        document = load_key_file(path, ADMISSION_KIND)
        network_id = name_field(path, document, "network_id", lambda v: check_name(v, "network id"))
        seed = hex_field(path, document, "signing_seed", KEY_BYTES)
        warn_if_exposed(path)
        return cls(network_id, nacl.signing.SigningKey(seed))


def verify_certificate(
    cert: Certificate,
    *,
    network_id: str,
    admission_public_key: bytes,
    now: float,
    clock_skew_s: float = 300.0,
) -> PublicIdentity:
    """Return the certified public identity, or raise the CertificateError subclass that applies.

    ``clock_skew_s`` widens the validity interval on both sides, because devices without a
    battery-backed clock (Raspberry Pi) may be off by minutes even after time sync.
    """
    if len(admission_public_key) != KEY_BYTES:
        raise ValueError("admission public key must be 32 bytes")
    if not (math.isfinite(now) and math.isfinite(clock_skew_s) and clock_skew_s >= 0):
        # a NaN clock would make every validity comparison false, i.e. accept anything
        raise ValueError("now must be finite and clock_skew_s finite and >= 0")
    if cert.network_id != network_id:
        raise ForeignNetworkError(
            f"certificate of {cert.peer_id!r} is for network {cert.network_id!r}, "
            f"not {network_id!r}"
        )
    if len(cert.signature) != SIGNATURE_BYTES or not any(cert.signature):
        raise BadCertificateSignatureError(f"certificate of {cert.peer_id!r} is unsigned")
    try:
        signed = CERT_DOMAIN + cert.signed_bytes()
    except ValueError as exc:
        raise MalformedCertificateError(str(exc)) from None
    try:
        verify_signature(admission_public_key, signed, cert.signature)
    except SignatureError:
        raise BadCertificateSignatureError(
            f"certificate of {cert.peer_id!r} has a bad signature (tampered or foreign key)"
        ) from None
    if now < cert.issued_at - clock_skew_s:
        raise ExpiredCertificateError(
            f"certificate of {cert.peer_id!r} is not valid yet "
            f"(issued_at {cert.issued_at:.0f}, now {now:.0f})"
        )
    if now > cert.expires_at + clock_skew_s:
        raise ExpiredCertificateError(
            f"certificate of {cert.peer_id!r} expired (expires_at {cert.expires_at:.0f}, "
            f"now {now:.0f})"
        )
    return cert.public
