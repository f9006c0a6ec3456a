"""Typed errors raised by the crypto package.

Every failure a peer can meet on untrusted input has its own class so callers can count and log
drops by reason without parsing messages. All derive from :class:`CryptoError`.
"""

from __future__ import annotations


class CryptoError(Exception):
    """Base class of every error raised by ``crypto``."""


class KeyFileError(CryptoError):
    """A key file is missing, unreadable, truncated, foreign or of the wrong kind.

    The message always names the path and the problem.
    """


class CertificateError(CryptoError):
    """A peer certificate was rejected."""


class MalformedCertificateError(CertificateError):
    """The certificate bytes do not parse (bad magic, length, field or value)."""


class BadCertificateSignatureError(CertificateError):
    """The certificate is unsigned, or its signature does not verify (tampered / wrong key)."""


class ExpiredCertificateError(CertificateError):
    """The certificate is expired, or not valid yet, beyond the allowed clock skew."""


class ForeignNetworkError(CertificateError):
    """The certificate was issued for another network."""


class SignatureError(CryptoError):
    """A detached Ed25519 signature is malformed or does not verify."""


class SealError(CryptoError):
    """A sealed payload cannot be opened, or was sealed for a different context."""


class EncodingRangeError(CryptoError, ValueError):
    """A value is non-finite or too large to fixed-point encode without risk of wrap-around."""


class ReplayError(CryptoError):
    """A message was rejected by a replay window."""


class DuplicateMessageError(ReplayError):
    """This (sender, seq) pair was already accepted."""


class StaleMessageError(ReplayError):
    """The sequence number is too old to be tracked (below the sender's window)."""
