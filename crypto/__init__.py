"""Murmur crypto: identities, admission certificates, sealing, secret sharing, replay windows.

Pure: depends on numpy, PyNaCl and the standard library only. See docs/crypto.md.
"""

from crypto.admission import AdmissionKey, Certificate, verify_certificate
from crypto.errors import (
    BadCertificateSignatureError,
    CertificateError,
    CryptoError,
    DuplicateMessageError,
    EncodingRangeError,
    ExpiredCertificateError,
    ForeignNetworkError,
    KeyFileError,
    MalformedCertificateError,
    ReplayError,
    SealError,
    SignatureError,
    StaleMessageError,
)
from crypto.field import (
    FIELD_BYTES,
    FIELD_DTYPE,
    PRIME,
    FixedPoint,
    field_from_bytes,
    field_to_bytes,
    field_view,
)
from crypto.identity import PEER_ID_RE, Identity, PublicIdentity, check_name, verify_signature
from crypto.replay import ReplayWindow
from crypto.sealing import SealContext, open_sealed, seal
from crypto.shamir import Share, add_shares, reconstruct, split

__all__ = [
    "FIELD_BYTES",
    "FIELD_DTYPE",
    "PEER_ID_RE",
    "PRIME",
    "AdmissionKey",
    "BadCertificateSignatureError",
    "Certificate",
    "CertificateError",
    "CryptoError",
    "DuplicateMessageError",
    "EncodingRangeError",
    "ExpiredCertificateError",
    "FixedPoint",
    "ForeignNetworkError",
    "Identity",
    "KeyFileError",
    "MalformedCertificateError",
    "PublicIdentity",
    "ReplayError",
    "ReplayWindow",
    "SealContext",
    "SealError",
    "Share",
    "SignatureError",
    "StaleMessageError",
    "add_shares",
    "check_name",
    "field_from_bytes",
    "field_to_bytes",
    "field_view",
    "open_sealed",
    "reconstruct",
    "seal",
    "split",
    "verify_certificate",
    "verify_signature",
]
