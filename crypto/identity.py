"""Peer identities: an Ed25519 signing key and an X25519 box key per peer.

Security properties:
- ``sign`` produces a 64-byte detached Ed25519 signature; ``verify_signature`` accepts it only
  for the exact bytes signed under the matching verify key (EUF-CMA of Ed25519).
- Secret keys are persisted only through an atomic write with mode 0600, so a crash never
  leaves a truncated key and other local users never see it.
- Domain separation is the caller's duty: sign a byte string that starts with a context tag
  (the protocol's envelope does; certificates use their own tag in ``crypto.admission``).
"""

from __future__ import annotations

import logging
import stat
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.public
import nacl.signing

from crypto._keyfile import hex_field, load_key_file, name_field, save_key_file
from crypto.errors import SignatureError
from protocol.limits import ID_PATTERN, is_valid_id
from protocol.limits import PEER_ID_RE as PEER_ID_RE  # re-exported by crypto/__init__

log = logging.getLogger(__name__)

KEY_BYTES = 32
SIGNATURE_BYTES = 64
IDENTITY_KIND = "identity"


def check_name(name: str, what: str) -> str:
    """Return ``name`` if it is a valid peer/network id, else raise ValueError naming ``what``.

    The rule itself is protocol.limits.ID_PATTERN, the one definition every layer shares.
    """
    if not is_valid_id(name):
        raise ValueError(f"{what} {name!r} must match {ID_PATTERN}")
    return name


@dataclass(frozen=True)
class PublicIdentity:
    """The public half of a peer identity: what a certificate vouches for."""

    peer_id: str
    verify_key: bytes
    box_key: bytes

    def __post_init__(self) -> None:
        check_name(self.peer_id, "peer id")
        if len(self.verify_key) != KEY_BYTES or len(self.box_key) != KEY_BYTES:
            raise ValueError("verify_key and box_key must be 32 bytes each")


def warn_if_exposed(path: Path) -> None:
    """Log a warning when a secret key file is readable by group or others."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("key file %s is accessible by group/others (mode %o); use 0600",
                    path, stat.S_IMODE(mode))


class Identity:
    """One peer's secret keys. Never serialised except by :meth:`save`."""

    __slots__ = ("box_private_key", "peer_id", "signing_key")

    def __init__(
        self,
        peer_id: str,
        signing_key: nacl.signing.SigningKey,
        box_private_key: nacl.public.PrivateKey,
    ) -> None:
        self.peer_id = check_name(peer_id, "peer id")
        self.signing_key = signing_key
        self.box_private_key = box_private_key

    def __repr__(self) -> str:  # never print secret material
        return f"Identity(peer_id={self.peer_id!r})"

    @classmethod
    def generate(cls, peer_id: str) -> Identity:
        """Fresh keys from the OS CSPRNG (libsodium ``randombytes``)."""
        return cls(peer_id, nacl.signing.SigningKey.generate(), nacl.public.PrivateKey.generate())

    @property
    def public(self) -> PublicIdentity:
        return PublicIdentity(
            peer_id=self.peer_id,
            verify_key=bytes(self.signing_key.verify_key),
            box_key=bytes(self.box_private_key.public_key),
        )

    def sign(self, data: bytes) -> bytes:
        """Return the 64-byte detached Ed25519 signature of ``data``."""
        return self.signing_key.sign(bytes(data)).signature

    def save(self, path: Path, *, overwrite: bool = False) -> None:
        """Write the identity atomically, mode 0600; FileExistsError unless ``overwrite``."""
        save_key_file(
            Path(path),
            IDENTITY_KIND,
            {
                "peer_id": self.peer_id,
                "signing_seed": bytes(self.signing_key).hex(),
                "box_private_key": bytes(self.box_private_key).hex(),
            },
            overwrite=overwrite,
        )

    @classmethod
    def load(cls, path: Path) -> Identity:
        """Load an identity; KeyFileError naming the path and the problem on any failure."""
        path = Path(path)
        document = load_key_file(path, IDENTITY_KIND)
        peer_id = name_field(path, document, "peer_id", lambda v: check_name(v, "peer id"))
        seed = hex_field(path, document, "signing_seed", KEY_BYTES)
        box_secret = hex_field(path, document, "box_private_key", KEY_BYTES)
        warn_if_exposed(path)
        return cls(peer_id, nacl.signing.SigningKey(seed), nacl.public.PrivateKey(box_secret))


def verify_signature(verify_key: bytes, data: bytes, signature: bytes) -> None:
    """Raise SignatureError unless ``signature`` is a valid Ed25519 signature of ``data``."""
    if len(verify_key) != KEY_BYTES:
        raise SignatureError(f"verify key must be {KEY_BYTES} bytes, got {len(verify_key)}")
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(f"signature must be {SIGNATURE_BYTES} bytes, got {len(signature)}")
    try:
        nacl.signing.VerifyKey(bytes(verify_key)).verify(bytes(data), bytes(signature))
    except nacl.exceptions.BadSignatureError:
        raise SignatureError("signature does not verify") from None
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        # e.g. a verify key that is not a valid curve point
        raise SignatureError(f"signature check failed: {exc}") from None
